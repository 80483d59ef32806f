"""Issue 5 states: pause/resume (freezer), auto-resume on use, idle and wall-clock actions, timeout
extension, and durability of files across every transition (content checksums before and after)."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from corral import PolicyRejectedError, Sandbox
from corral.errors import SandboxNotRunningError
from tests.conftest import fresh_daemon, require


def _wait(sb, status: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while sb.refresh().status != status and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sb.info.status == status, sb.info


def _until(cond, what: str, timeout_s: float = 15) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.05)


def _counter(sb) -> int:  # type: ignore[no-untyped-def]
    try:
        return int(sb.files.read("/root/counter"))
    except FileNotFoundError:
        return 0


def _cpu_ns(sb) -> int:
    return int((Path("/sys/fs/cgroup/cpuacct/corral") / sb.id / "cpuacct.usage").read_text())


def _freezer(sb) -> str:
    return (Path("/sys/fs/cgroup/freezer/corral") / sb.id / "freezer.state").read_text().strip()


def _agent_pid(daemon, sb) -> int:
    out = subprocess.run(["crun", "--root", str(daemon.run_dir / "crun"), "state", sb.id], capture_output=True,
                         text=True, check=True).stdout
    import json

    return int(json.loads(out)["pid"])


def _checksums(sb) -> str:
    return sb.commands.run("find /root/data -type f | sort | xargs sha256sum").stdout


def _write_data(sb) -> dict[str, bytes]:
    files = {f"/root/data/f{i}": secrets.token_bytes(1000 * (i + 1)) for i in range(5)}
    for path, blob in files.items():
        sb.files.write(path, blob)
    return files


def test_pause_freezes_processes_and_resume_continues_them(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        files = _write_data(sb)
        sb.commands.run("i=0; while true; do i=$((i+1)); echo $i > /root/c.tmp; mv /root/c.tmp /root/counter; done",
                        background=True)
        _until(lambda: _counter(sb) > 0, "the loop counts")
        info = sb.pause()
        assert (info.status, info.reason) == ("paused", "Paused") and _freezer(sb) == "FROZEN"
        inside = Path(f"/proc/{_agent_pid(daemon, sb)}/root/root/counter")  # read without resuming it
        before, count = _cpu_ns(sb), inside.read_text()
        time.sleep(1)
        assert _cpu_ns(sb) == before  # zero CPU while paused
        assert inside.read_text() == count
        assert sb.resume().status == "running" and _freezer(sb) == "THAWED"
        _until(lambda: _counter(sb) > int(count), "the same process goes on counting")
        for path, blob in files.items():
            assert sb.files.read(path) == blob


def test_any_call_on_a_paused_sandbox_resumes_it_with_the_latency_reported(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.pause()
        r = sb.commands.run("echo back")
        assert r.stdout == "back\n"
        assert sb.refresh().status == "running" and sb.info.reason == "AutoResumed"
        with daemon.http() as h:
            h.post(f"/sandboxes/{sb.id}/pause")
            res = h.post(f"/sandboxes/{sb.id}/exec", json={"cmd": "true"}).json()
        assert 0 < res["resume_ms"] < 2000
        sb.pause()
        assert Sandbox.connect(sb.id).files.list("/root") is not None  # files API resumes too
        assert sb.refresh().status == "running"


def test_idle_sandbox_is_paused_and_busy_one_is_not(daemon, busybox):
    idle = Sandbox.create(template=busybox, idle_timeout_s=2, on_idle="pause")
    busy = Sandbox.create(template=busybox, idle_timeout_s=2, on_idle="stop")
    try:
        spinner = busy.commands.run("while true; do :; done", background=True)
        _wait(idle, "paused")
        assert idle.info.reason == "IdlePaused"
        time.sleep(1)
        assert busy.refresh().status == "running"  # CPU use counts as activity
        spinner.kill()
        _wait(busy, "stopped", 15)
        assert busy.info.reason == "Idle"
        assert busy.commands.run("echo up").stdout == "up\n"  # and it starts again on use
    finally:
        idle.kill()
        busy.kill()


def test_timeout_can_be_extended_and_can_pause_instead_of_stop(daemon, busybox):
    with Sandbox.create(template=busybox, timeout_s=2, on_timeout="pause") as sb:
        first = sb.info.timeout_at
        info = sb.set_timeout(timeout_s=6)
        assert info.timeout_at > first and info.policy.timeout_s == 6
        time.sleep(max(0.0, first - time.time()) + 1)
        assert time.time() < info.timeout_at - 1, "the machine was too slow to look between the deadlines"
        assert sb.refresh().status == "running"  # the old deadline has passed
        _wait(sb, "paused", 10)
        assert sb.info.reason == "TimeoutPaused"
        time.sleep(1.5)
        assert sb.refresh().status == "paused"  # no repeated action once paused


def test_hibernate_needs_a_hibernatable_sandbox(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        with pytest.raises(PolicyRejectedError, match="hibernatable"):
            sb.pause(to_disk=True)
        assert sb.refresh().status == "running"


def test_hibernate_checkpoints_processes_to_disk_and_restores_them(daemon, busybox):
    require("hibernation")
    with Sandbox.create(template=busybox, hibernatable=True) as sb:
        files = _write_data(sb)
        sb.commands.run("i=0; while true; do i=$((i+1)); echo $i > /root/c.tmp; mv /root/c.tmp /root/counter; "
                        "sleep 0.01; done", background=True, tag="counter")
        _until(lambda: _counter(sb) > 10, "the loop counts")
        info = sb.pause(to_disk=True)
        assert (info.status, info.reason) == ("hibernated", "Hibernated")
        assert not list(Path("/sys/fs/cgroup/memory/corral").glob(sb.id))  # no process, memory freed
        ck = daemon.data_dir / "sandboxes" / sb.id / "checkpoint" / "img"
        assert any(ck.glob("pages-*.img"))
        r = sb.commands.run("cat /root/counter")  # auto-restore
        count = int(r.stdout)
        assert count > 10 and sb.refresh().reason == "AutoResumed"
        _until(lambda: _counter(sb) > count, "the same loop goes on counting")
        assert [p.tag for p in sb.commands.list() if p.running] == ["counter"]  # the agent kept its table
        assert sb.commands.run("cat /sys/class/net/lo/operstate").stdout == "unknown\n"  # loopback is up
        for path, blob in files.items():
            assert sb.files.read(path) == blob
        sb.pause(to_disk=True)
        assert sb.resume().reason == "Restored"
        sb.pause(to_disk=True)
        sb.stop()  # a hibernated sandbox can be stopped: its checkpoint goes, its files stay
        assert not ck.parent.exists() and sb.refresh().status == "stopped"
        assert sb.files.read("/root/data/f0") == files["/root/data/f0"]


def test_hibernate_a_sandbox_with_inet_sockets(daemon, base):
    """A server listening on loopback and a client connected to it: CRIU (patched for Linux 6.16+,
    scripts/build-criu.sh) dumps them; the listener comes back, the open connection comes back closed."""
    require("hibernation")
    with Sandbox.create(template=base, hibernatable=True) as sb:
        sb.commands.run("cd /tmp && echo hello > page && exec python3 -m http.server 8000 --bind 127.0.0.1",
                        background=True, tag="server")
        sb.commands.run("python3 -c \"import socket,time\nfor _ in range(100):\n try: s=socket.create_connection("
                        "('127.0.0.1',8000)); break\n except OSError: time.sleep(0.05)\ntime.sleep(600)\"",
                        background=True, tag="client")
        r = sb.commands.run("for i in $(seq 300); do curl -sf http://127.0.0.1:8000/page && break; sleep 0.1; done")
        assert r.stdout == "hello\n"
        assert sb.pause(to_disk=True).status == "hibernated"
        assert sb.resume().status == "running"
        assert sb.commands.run("curl -sf http://127.0.0.1:8000/page").stdout == "hello\n"
        assert {p.tag for p in sb.commands.list() if p.running} >= {"server", "client"}


def test_idle_hibernate_and_a_daemon_restart_while_hibernated(busybox):
    require("hibernation")
    with fresh_daemon() as d:
        with d.http() as h:
            sid = h.post("/sandboxes", json={"template": "busybox", "idle_timeout_s": 1,
                                             "on_idle": "hibernate"}).json()["id"]
            h.post(f"/sandboxes/{sid}/exec", json={"cmd": "echo state > /root/s; sleep 1000", "background": True})
            deadline = time.monotonic() + 20
            while h.get(f"/sandboxes/{sid}").json()["status"] != "hibernated" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert h.get(f"/sandboxes/{sid}").json()["reason"] == "IdleHibernated"
        d.stop(signal.SIGKILL)
        d.start()
        with d.http() as h:
            assert h.get(f"/sandboxes/{sid}").json()["status"] == "hibernated"
            r = h.post(f"/sandboxes/{sid}/exec", json={"cmd": "cat /root/s; ps | grep -c '[s]leep 1000'"}).json()
            assert r["stdout"] == "state\n1\n" and r["resume_ms"] > 0


def test_only_a_running_sandbox_can_be_paused(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.stop()
        with pytest.raises(SandboxNotRunningError):
            sb.pause()


@pytest.mark.parametrize("how", ["stop-start", "daemon-kill9", "host-reboot"])
def test_files_survive_every_transition(busybox, how):
    with fresh_daemon() as d:
        with d.http() as h:
            sid = h.post("/sandboxes", json={"template": "busybox"}).json()["id"]
            for i in range(5):
                h.put(f"/sandboxes/{sid}/files", params={"path": f"/root/data/f{i}"}, content=secrets.token_bytes(5000))
            before = h.post(f"/sandboxes/{sid}/exec",
                            json={"cmd": "find /root/data -type f | sort | xargs sha256sum"}).json()["stdout"]
            h.post(f"/sandboxes/{sid}/pause")
            h.post(f"/sandboxes/{sid}/resume")
            if how == "stop-start":
                h.post(f"/sandboxes/{sid}/stop")
        if how == "daemon-kill9":
            d.stop(signal.SIGKILL)
            d.start()
        elif how == "host-reboot":
            # Everything stops as in a power cut: the daemon dies, every container is killed, mounts go.
            d.stop(signal.SIGKILL)
            subprocess.run(["crun", "--root", str(d.run_dir / "crun"), "kill", "--all", sid, "KILL"])
            subprocess.run(["crun", "--root", str(d.run_dir / "crun"), "delete", "-f", sid])
            d.start()
        with d.http() as h:
            after = h.post(f"/sandboxes/{sid}/exec",
                           json={"cmd": "find /root/data -type f | sort | xargs sha256sum"}).json()
            assert after["stdout"] == before and before.count("\n") == 5
            assert (after["resume_ms"] > 0) == (how in ("stop-start", "host-reboot"))


def test_paused_sandbox_survives_a_daemon_restart(busybox):
    with fresh_daemon() as d:
        with d.http() as h:
            sid = h.post("/sandboxes", json={"template": "busybox"}).json()["id"]
            h.post(f"/sandboxes/{sid}/exec", json={"cmd": "echo 1 > /root/x"})
            h.post(f"/sandboxes/{sid}/pause")
        d.stop()
        d.start()
        with d.http() as h:
            assert h.get(f"/sandboxes/{sid}").json()["status"] == "paused"
            assert h.post(f"/sandboxes/{sid}/exec", json={"cmd": "cat /root/x"}).json()["stdout"] == "1\n"

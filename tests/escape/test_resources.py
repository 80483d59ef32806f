"""Resource exhaustion stays inside the sandbox's cgroups; teardown leaves nothing behind.

ATTACKS.md rows G1, G2, G9, B7, B8, G10. Each attack gets its own sandbox with small limits.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

from tests.escape.escape_support import host_pids_named, inside, kill_quietly

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory", "cpu", "cpuacct", "freezer", "blkio", "devices", "cpuset")


def _cgroup_dirs(sandbox_id: str) -> list[Path]:
    return [p for c in CONTROLLERS if (p := CGROUP_ROOT / c / "corral" / sandbox_id).exists()]


def _procs_in_cgroup(sandbox_id: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if f"/corral/{sandbox_id}" in (p / "cgroup").read_text():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def _health_s(daemon, h=None) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    if h is not None:
        assert h.get("/health").status_code == 200
    else:
        with daemon.http() as h:
            assert h.get("/health").status_code == 200
    return time.monotonic() - t0


BOMB = """
    # A fork bomb that keeps trying: every process forks as fast as it can, forever. The parent
    # counts what fork() says for a while, writes the tally to a file (the agent may be busy or
    # gone), and then stays, so the bomb's process group has a live leader to be killed through.
    import errno
    def bomb():
        while True:
            try:
                if os.fork() == 0:
                    continue
            except OSError:
                time.sleep(0.01)
    forked, eagain, other = 0, 0, {}
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        try:
            pid = os.fork()
        except OSError as e:
            if e.errno == errno.EAGAIN:
                eagain += 1
            else:
                other[ename(e.errno)] = other.get(ename(e.errno), 0) + 1
            time.sleep(0.002)
            continue
        if pid == 0:
            bomb()
        forked += 1
    with open("/tmp/bomb.json.tmp", "w") as f:
        json.dump(dict(forked=forked, eagain=eagain, other=other), f)
    os.rename("/tmp/bomb.json.tmp", "/tmp/bomb.json")
    while True:
        time.sleep(60)
"""


def _start_bomb(sb, seconds: float):  # type: ignore[no-untyped-def]
    from tests.escape.escape_support import script

    sb.files.write("/tmp/bomb.py", script(BOMB))
    return sb.commands.run(["python3", "/tmp/bomb.py", str(seconds)], background=True)


def _bomb_tally(daemon, sb, timeout_s: float = 20) -> dict:  # type: ignore[no-untyped-def]
    """The bomb's tally, read on the host through the sandbox's root (no agent needed)."""
    path = inside(daemon, sb, "/tmp/bomb.json")
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, "the fork bomb wrote no tally"
        time.sleep(0.05)
    return dict(json.loads(path.read_text()))


def test_fork_bomb_stops_at_pids_max_and_the_host_stays_responsive(daemon, base):
    from corral import Sandbox

    sb = Sandbox.create(template=base, resources={"pids_max": 64, "memory_mib": 256})
    token = f"corral-escape-survivor-{secrets.token_hex(6)}"
    try:
        pids_dir = CGROUP_ROOT / "pids" / "corral" / sb.id
        assert (pids_dir / "pids.max").read_text().strip() == "64"
        # A would-be survivor: double fork + setsid + nohup, reparented away from its command.
        sb.commands.run(f"(setsid nohup bash -c 'exec -a {token} sleep 1000' >/dev/null 2>&1 &) ; true")
        deadline = time.monotonic() + 10  # it runs in the background: give it a moment to exec
        while not host_pids_named(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(host_pids_named(token)) == 1
        _start_bomb(sb, 4)
        # Meanwhile, on the host: fork+exec and the daemon's API stay fast. Nothing here talks to
        # the sandbox's agent while the bomb runs (see the next test for why).
        worst_exec, worst_health = 0.0, 0.0
        end = time.monotonic() + 4.5
        with daemon.http() as h:  # one client: what is timed is the daemon's answer, not TLS set-up
            while time.monotonic() < end:
                t0 = time.monotonic()
                subprocess.run(["true"], check=True)
                worst_exec = max(worst_exec, time.monotonic() - t0)
                worst_health = max(worst_health, _health_s(daemon, h))
                time.sleep(0.05)
        res = _bomb_tally(daemon, sb)
        assert res["eagain"] > 0 and res["other"] == {}, res  # fork failed with EAGAIN, nothing else
        assert 0 < res["forked"] < 64, res
        assert 60 <= int((pids_dir / "pids.current").read_text()) <= 64  # full (agent threads come and go)
        events = dict(ln.split() for ln in (pids_dir / "pids.events").read_text().splitlines())
        assert int(events["max"]) > 0
        # A starved host would take many seconds; 3 s leaves room for a busy 2-core machine.
        assert worst_exec < 3.0, f"host fork+exec took {worst_exec:.2f}s during the bomb"
        assert worst_health < 3.0, f"daemon /health took {worst_health:.2f}s during the bomb"
        assert len(_procs_in_cgroup(sb.id)) >= 60  # the bomb is still going when the sandbox is killed
    finally:
        sb.kill()
        deadline = time.monotonic() + 5  # a killed task may still be on its way out
        while (host_pids_named(token) or _procs_in_cgroup(sb.id)) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = host_pids_named(token)
        for pid in survivors:
            kill_quietly(pid)
    # Teardown took everything: the bomb, the setsid'd survivor, and the cgroups themselves (delete
    # returns once they are gone).
    assert _procs_in_cgroup(sb.id) == []
    assert survivors == []
    assert _cgroup_dirs(sb.id) == []


def test_agent_survives_a_fork_bomb_and_the_bomb_can_be_killed(daemon, base):
    from corral import Sandbox

    sb = Sandbox.create(template=base, resources={"pids_max": 64, "memory_mib": 256})
    try:
        bomb = _start_bomb(sb, 2)
        _bomb_tally(daemon, sb)
        pids_dir = CGROUP_ROOT / "pids" / "corral" / sb.id
        assert int((pids_dir / "pids.current").read_text()) >= 60  # full, give or take exiting tasks
        # With every pid taken, the agent must still answer and be able to stop the bomb: the
        # bomb's processes share its process group, which the agent signals.
        listed = {p.pid: p.running for p in sb.commands.list()}
        assert listed[bomb.pid] is True
        sb.commands.kill(bomb.pid)
        deadline = time.monotonic() + 10
        while int((pids_dir / "pids.current").read_text()) > 5:
            assert time.monotonic() < deadline, "the bomb survived being killed"
            time.sleep(0.05)
        assert sb.commands.run("echo ok").stdout == "ok\n"
        assert sb.refresh().status == "running"
    finally:
        sb.kill()
    assert _cgroup_dirs(sb.id) == []


def test_memory_hog_is_oom_killed_inside_its_own_cgroup(daemon, base):
    from corral import Sandbox

    sb = Sandbox.create(template=base, resources={"memory_mib": 64})
    try:
        mem_dir = CGROUP_ROOT / "memory" / "corral" / sb.id
        assert int((mem_dir / "memory.limit_in_bytes").read_text()) == 64 << 20
        r = sb.commands.run(["python3", "-c",
                             "chunks = []\n"
                             "for i in range(64):\n"
                             "    chunks.append(b'\\x01' * (8 << 20))  # 8 MiB, every page touched\n"
                             "    print(i, flush=True)\n"
                             "print('survived', flush=True)\n"], timeout_s=120)
        assert (r.exit_code, r.signal) == (137, 9), r
        assert "survived" not in r.stdout
        assert 2 <= len(r.stdout.split()) < 16  # it got going, and died near 64 MiB, not 512
        oom = dict(ln.split() for ln in (mem_dir / "memory.oom_control").read_text().splitlines())
        assert int(oom["oom_kill"]) >= 1
        # Only the hog died: the same sandbox still answers, and so does the daemon.
        assert sb.commands.run("echo ok").stdout == "ok\n"
        assert daemon.proc.poll() is None and _health_s(daemon) < 5
        # Swap is limited too (memory+swap == memory): no spilling the hog onto the host's swap.
        memsw = mem_dir / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert int(memsw.read_text()) == 64 << 20
    finally:
        sb.kill()
    assert _cgroup_dirs(sb.id) == []


def test_shm_hog_is_oom_killed_without_taking_the_agent(daemon, base):
    from corral import Sandbox

    sb = Sandbox.create(template=base, resources={"memory_mib": 64})
    try:
        r = sb.commands.run("head -c 100M /dev/zero > /dev/shm/fill", timeout_s=60)
        assert r.exit_code != 0  # out of memory (killed) or out of space, but a result
        sb.files.remove("/dev/shm/fill")  # done by the agent itself: no new process needed
        assert sb.commands.run("echo ok").stdout == "ok\n"
    finally:
        sb.kill()
    assert _cgroup_dirs(sb.id) == []


def test_output_flood_is_capped_by_the_daemon(daemon, base):
    from corral import Sandbox

    sb = Sandbox.create(template=base)
    try:
        r = sb.commands.run("head -c 40M /dev/zero | tr '\\0' x; echo done >&2", timeout_s=120)
        assert r.exit_code == 0 and r.stderr == "done\n"
        assert r.truncated_bytes > 0
        assert len(r.stdout) + r.truncated_bytes == 40 << 20
        assert len(r.stdout) <= 16 << 20  # the daemon's max_output_bytes per stream
        assert sb.commands.run("echo ok").stdout == "ok\n"
        assert _health_s(daemon) < 5
    finally:
        sb.kill()

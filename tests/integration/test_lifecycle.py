"""Sandbox lifecycle over the API: create, stop/start keeping files, timeouts, deletion, restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral import PolicyRejectedError, Sandbox, SandboxNotFoundError
from tests.conftest import Daemon, free_port, fresh_daemon, traversable_tmp


def test_stop_start_keeps_the_filesystem_and_ends_processes(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.files.write("/root/kept.txt", b"kept")
        sb.commands.run("echo etc-change > /etc/motd")
        p = sb.commands.run("sleep 1000", background=True)
        assert sb.stop().status == "stopped"
        assert sb.refresh().reason == "Stopped"
        assert sb.start().status == "running"
        assert sb.files.read("/root/kept.txt") == b"kept"
        assert sb.commands.run("cat /etc/motd").stdout == "etc-change\n"
        assert p.pid not in {x.pid for x in sb.commands.list() if x.running}
        assert sb.commands.run("pgrep sleep || echo none").stdout.strip() == "none"


def test_list_connect_and_kill(daemon, busybox):
    sb = Sandbox.create(template=busybox, metadata={"owner": "test"})
    assert sb.id.startswith("sb-") and len(sb.id) == 15
    assert sb.id in {s.id for s in Sandbox.list()}
    again = Sandbox.connect(sb.id)
    assert again.info.metadata == {"owner": "test"} and again.commands.run("echo x").stdout == "x\n"
    sb.kill()
    assert sb.id not in {s.id for s in Sandbox.list()}
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(sb.id)
    assert not (daemon.data_dir / "sandboxes" / sb.id).exists()
    assert not list(Path("/sys/fs/cgroup/pids/corral").glob(sb.id))


def test_resources_are_applied_to_the_cgroup(daemon, busybox):
    with Sandbox.create(template=busybox, resources={"memory_mib": 96, "pids_max": 77, "cpu_cores": 0.5}) as sb:
        cg = Path("/sys/fs/cgroup")
        assert (cg / "memory/corral" / sb.id / "memory.limit_in_bytes").read_text().strip() == str(96 << 20)
        assert (cg / "pids/corral" / sb.id / "pids.max").read_text().strip() == "77"
        assert (cg / "cpu/corral" / sb.id / "cpu.cfs_quota_us").read_text().strip() == "50000"


def test_wall_clock_timeout_stops_the_sandbox(daemon, busybox):
    with Sandbox.create(template=busybox, timeout_s=2) as sb:
        assert sb.info.timeout_at and sb.info.timeout_at - time.time() <= 2.5
        sb.files.write("/root/f", b"survives")
        deadline = time.monotonic() + 15
        while sb.refresh().status == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (sb.info.status, sb.info.reason) == ("stopped", "Timeout")
        sb.start()
        assert sb.files.read("/root/f") == b"survives"


def test_host_root_mode_is_read_only_with_a_writable_workspace(daemon, busybox):
    with pytest.raises(PolicyRejectedError, match="allow_weaker_isolation"):
        Sandbox.create(template=busybox, root="host")
    with Sandbox.create(template=busybox, root="host", allow_weaker_isolation=True) as sb:
        assert "root=host" in sb.info.weakenings[0]
        r = sb.commands.run("touch /etc/corral-x; echo $?; touch /usr/corral-x 2>&1")
        assert "Read-only file system" in r.stdout and not Path("/etc/corral-x").exists()
        assert sb.commands.run("echo w > /workspace/w && cat /workspace/w").stdout == "w\n"
        # The daemon's data (api key, database, other sandboxes) is masked, its socket absent.
        assert sb.commands.run(f"ls -A {daemon.data_dir} | wc -l").stdout.strip() == "0"
        assert sb.commands.run(f"test -e {daemon.run_dir}/corral.sock && echo present || echo absent"
                               ).stdout.strip() == "absent"
        assert sb.commands.run("python3 -c 'print(1+1)'").stdout == "2\n"  # host tools are usable


def _daemon(tmp: Path) -> Daemon:
    d = Daemon(data_dir=tmp / "data", run_dir=tmp / "run", port=free_port(), proc=None, log_path=tmp / "corrald.log")
    d.start()
    return d


def _api(d: Daemon) -> httpx.Client:
    return d.http()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_daemon_restart_readopts_running_sandboxes_and_cleans_up_dead_ones(busybox, how):
    tmp = traversable_tmp()
    d = _daemon(tmp)
    orphan_cgroups = [Path("/sys/fs/cgroup") / c / "corral" / f"sb-0c{os.getpid():010x}"[:15] for c in ("pids", "memory")]
    try:
        with _api(d) as h:
            live = h.post("/sandboxes", json={"template": "busybox"}).json()["id"]
            dead = h.post("/sandboxes", json={"template": "busybox"}).json()["id"]
            h.post(f"/sandboxes/{live}/exec", json={"cmd": "echo state > /root/state; sleep 1000 &"})
            bg = h.post(f"/sandboxes/{live}/exec", json={"cmd": "sleep 1000", "background": True}).json()["pid"]
        d.stop(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        # While the daemon is down: one sandbox dies, and an orphan appears (a directory no record knows).
        subprocess.run(["crun", "--root", str(d.run_dir / "crun"), "kill", "--all", dead, "KILL"], check=True)
        orphan = d.data_dir / "sandboxes" / "sb-0123456789ab"
        (orphan / "upper").mkdir(parents=True)
        # ... and cgroups of a sandbox nobody knows (a crash between creating them and the record).
        for cg in orphan_cgroups:
            cg.mkdir()
        d.start()
        with _api(d) as h:
            info = {s["id"]: s for s in h.get("/sandboxes").json()["sandboxes"]}
            assert info[live]["status"] == "running"
            assert (info[dead]["status"], info[dead]["reason"]) == ("stopped", "LostWhileDaemonDown")
            r = h.post(f"/sandboxes/{live}/exec", json={"cmd": "cat /root/state"}).json()
            assert r["stdout"] == "state\n"
            procs = h.get(f"/sandboxes/{live}/processes").json()["processes"]
            assert any(p["pid"] == bg and p["running"] for p in procs)  # the agent kept its processes
            assert not orphan.exists()
            assert [cg for cg in orphan_cgroups if cg.exists()] == []
            # The dead sandbox starts again with its files.
            assert h.post(f"/sandboxes/{dead}/start").json()["status"] == "running"
            audit = h.get("/audit").json()["records"]
            starts = [a for a in audit if a["action"] == "daemon.start"]
            assert len(starts) == 2 and "sb-0123456789ab" in json.dumps(starts[-1]["detail"])
    finally:
        d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        for cg in orphan_cgroups:
            if cg.exists():
                cg.rmdir()


def test_crashed_sandbox_is_marked_exited(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        state = json.loads(subprocess.run(["crun", "--root", str(daemon.run_dir / "crun"), "state", sb.id],
                                          capture_output=True, text=True, check=True).stdout)
        pid = state["pid"]
        subprocess.run(["kill", "-9", str(pid)], check=True)
        deadline = time.monotonic() + 10
        while sb.refresh().status == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (sb.info.status, sb.info.reason) == ("stopped", "Exited")


def test_audit_records_every_call_and_detects_tampering(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.commands.run("echo audited")
        sb.files.write("/tmp/a", b"1")
        with daemon.http() as h:
            recs = h.get("/audit", params={"target": sb.id}).json()["records"]
            actions = [r["action"] for r in recs]
            assert actions[:3] == ["sandbox.create", "sandbox.exec", "files.write"]
            exec_rec = recs[1]
            assert exec_rec["detail"]["cmd"] == "echo audited" and exec_rec["result"] == "200"
            assert exec_rec["key_id"].startswith("key-")
            unauth = httpx.get(daemon.url + "/v1/sandboxes")
            assert unauth.status_code == 401 and unauth.json()["error"]["code"] == "Unauthenticated"
            last = h.get("/audit", params={"limit": 10000}).json()["records"]
            assert any(r["result"] == "401 Unauthenticated" and r["key_id"] is None for r in last)
            assert h.get("/audit/verify").json()["ok"] is True
    # An attacker with write access to the database file edits one record.
    db = sqlite3.connect(daemon.data_dir / "corral.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET result='200' WHERE seq=1")
    seq = exec_rec["seq"]
    (original,) = db.execute("SELECT detail FROM audit WHERE seq=?", (seq,)).fetchone()
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET detail=? WHERE seq=?", (original.replace("echo audited", "ls"), seq))
    db.commit()
    try:
        with daemon.http() as h:
            v = h.get("/audit/verify").json()
        assert v["ok"] is False and "modified" in v["message"]
        out = subprocess.run([sys.executable, "-m", "corral.cli.main", "audit", "verify"], capture_output=True, text=True, env=daemon.env)
        assert out.returncode == 1 and "TAMPERED" in out.stdout
    finally:
        db.execute("UPDATE audit SET detail=? WHERE seq=?", (original, seq))
        db.execute("CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
                   "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")
        db.commit()
        db.close()
    with daemon.http() as h:
        assert h.get("/audit/verify").json()["ok"] is True


def test_warm_pool_serves_default_policy_creates_and_is_cleaned_up(busybox):
    with fresh_daemon() as d, d.http() as h:
        first = h.post("/sandboxes", json={"template": "busybox"}).json()
        assert first["timing"]["from_pool"] is False  # nothing was warm yet; now the pool fills
        deadline = time.monotonic() + 20
        while h.get("/health").json()["warm_pool"].get("busybox", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        claimed = h.post("/sandboxes", json={"template": "busybox", "timeout_s": 600,
                                             "metadata": {"who": "pool"}}).json()
        assert claimed["timing"]["from_pool"] is True and claimed["metadata"] == {"who": "pool"}
        assert 590 < claimed["timeout_at"] - time.time() <= 600
        r = h.post(f"/sandboxes/{claimed['id']}/exec", json={"cmd": "echo $CORRAL_SANDBOX_ID; hostname"}).json()
        assert r["stdout"] == "\nsandbox\n"  # the agent's own variables never reach commands
        custom = h.post("/sandboxes", json={"template": "busybox", "env": {"A": "b"}}).json()
        assert custom["timing"]["from_pool"] is False  # a policy the pool cannot serve boots fresh
        pooled = {p.name for p in (d.data_dir / "sandboxes").iterdir()} - {first["id"], claimed["id"], custom["id"]}
        deadline = time.monotonic() + 20
        while not pooled and time.monotonic() < deadline:
            time.sleep(0.1)
            pooled = {p.name for p in (d.data_dir / "sandboxes").iterdir()} - {
                first["id"], claimed["id"], custom["id"]}
        assert pooled and not any(s["id"] in pooled for s in h.get("/sandboxes").json()["sandboxes"])
    # fresh_daemon's cleanup stopped the daemon: the pooled sandbox went with it (checked by the
    # session's nothing_left_behind fixture), while listed sandboxes were deleted through the API.

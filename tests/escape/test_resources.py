"""Resource exhaustion stays inside the sandbox's cgroups; teardown leaves nothing behind.

ATTACKS.md rows G1, G2, G9, B7, B8, G10. Each attack gets its own sandbox with small limits.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

from escape_support import attack, kill_quietly

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


def _host_pids_with(token: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if token.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def _health_s(daemon) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    with daemon.http() as h:
        assert h.get("/health").status_code == 200
    return time.monotonic() - t0


BOMB = """
    # A fork bomb that keeps trying: every process forks as fast as it can, forever.
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
    done(forked=forked, eagain=eagain, other=other)
"""


def test_fork_bomb_stops_at_pids_max_and_the_host_stays_responsive(daemon, base):
    from corral import Sandbox

    sb = Sandbox.create(template=base, resources={"pids_max": 64, "memory_mib": 256})
    token = f"corral-escape-survivor-{secrets.token_hex(6)}"
    try:
        pids_dir = CGROUP_ROOT / "pids" / "corral" / sb.id
        assert (pids_dir / "pids.max").read_text().strip() == "64"
        # A would-be survivor: double fork + setsid + nohup, reparented away from its command.
        sb.commands.run(f"(setsid nohup bash -c 'exec -a {token} sleep 1000' >/dev/null 2>&1 &) ; true")
        assert len(_host_pids_with(token)) == 1
        sb.files.write("/tmp/bomb.py", __import__("escape_support").script(BOMB))
        bomb = sb.commands.run(["python3", "/tmp/bomb.py", "4"], background=True, timeout_s=60)
        # Meanwhile, on the host: fork+exec and the daemon's API stay fast.
        worst_exec, worst_health = 0.0, 0.0
        end = time.monotonic() + 4.5
        while time.monotonic() < end:
            t0 = time.monotonic()
            subprocess.run(["true"], check=True)
            worst_exec = max(worst_exec, time.monotonic() - t0)
            worst_health = max(worst_health, _health_s(daemon))
            time.sleep(0.05)
        r = bomb.wait()
        assert r.exit_code == 0, r
        res = __import__("json").loads(r.stdout.splitlines()[-1])
        assert res["eagain"] > 0 and res["other"] == {}, res  # fork failed with EAGAIN, nothing else
        assert 0 < res["forked"] < 64, res
        assert int((pids_dir / "pids.current").read_text()) <= 64
        events = dict(ln.split() for ln in (pids_dir / "pids.events").read_text().splitlines())
        assert int(events["max"]) > 0
        assert worst_exec < 2.0, f"host fork+exec took {worst_exec:.2f}s during the bomb"
        assert worst_health < 2.0, f"daemon /health took {worst_health:.2f}s during the bomb"
        procs = _procs_in_cgroup(sb.id)
        assert len(procs) >= 60  # the bomb is still going when the sandbox is killed
    finally:
        sb.kill()
    # Teardown took everything: the bomb, the setsid'd survivor, and the cgroups themselves.
    assert _procs_in_cgroup(sb.id) == []
    assert _host_pids_with(token) == []
    assert _cgroup_dirs(sb.id) == []
    for pid in _host_pids_with(token):
        kill_quietly(pid)


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

"""Processes outside the sandbox: invisible, unsignalable, untraceable; the agent survives attacks.

ATTACKS.md rows B2, C1, C15, D2, D6, J5. A host canary (a `sleep` with a unique argv) stands in for
any host process; the daemon's own process is attacked too. Each test checks on the host that the
target is still alive and untraced afterwards.
"""

from __future__ import annotations

import secrets
import time

import pytest

from tests.escape.escape_support import NR, attack, host_pids_with, kill_quietly

AGENT_MARK = "/.corral/agent/agent.py"


def _health(daemon) -> int:  # type: ignore[no-untyped-def]
    with daemon.http() as h:
        return int(h.get("/health").status_code)


def test_host_processes_are_invisible(shared_sb, host_canary, daemon):
    r = attack(shared_sb, """
        host_pid, daemon_pid, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        procs = cmdlines()
        done(procs={str(k): v for k, v in procs.items()}, seen=[p for p, c in procs.items() if token in c and p != os.getpid()],
             host_pid_dir=os.path.exists(f"/proc/{host_pid}"), daemon_pid_dir=os.path.exists(f"/proc/{daemon_pid}"))
    """, host_canary.pid, daemon.proc.pid, host_canary.token)
    assert r["seen"] == [] and not r["host_pid_dir"] and not r["daemon_pid_dir"], r
    # Only the agent (PID 1) and the attack itself exist in the sandbox's pid namespace.
    procs = {int(k): v for k, v in r["procs"].items()}
    assert AGENT_MARK in procs.pop(1)
    assert len(procs) == 1 and next(iter(procs.values())).startswith("python3 /tmp/attack-"), procs
    assert host_canary.alive()


def test_signals_to_host_pids_are_esrch(shared_sb, host_canary, daemon):
    r = attack(shared_sb, f"""
        host_pid, daemon_pid = int(sys.argv[1]), int(sys.argv[2])
        res = {{}}
        for name, pid in (("canary", host_pid), ("daemon", daemon_pid)):
            res[name + "_kill"] = sc({NR["kill"]}, pid, 9)
            res[name + "_kill_pgrp"] = sc({NR["kill"]}, -pid, 9)
            res[name + "_probe"] = sc({NR["kill"]}, pid, 0)
            res[name + "_tgkill"] = sc(234, pid, pid, 9)
            res[name + "_pidfd_open"] = sc({NR["pidfd_open"]}, pid, 0)
        done(res=res)
    """, host_canary.pid, daemon.proc.pid)
    assert r == {"res": {f"{who}_{what}": "ESRCH" for who in ("canary", "daemon")
                         for what in ("kill", "kill_pgrp", "probe", "tgkill", "pidfd_open")}}
    assert host_canary.alive()
    assert daemon.proc.poll() is None and _health(daemon) == 200


def test_kill_everything_from_inside_leaves_the_host_and_the_agent(shared_sb, host_canary, daemon):
    victim = shared_sb.commands.run("sleep 1000", background=True)
    r = attack(shared_sb, f"""
        import signal
        res = dict(kill_all=sc({NR["kill"]}, -1, 9))
        end = time.monotonic() + 10  # SIGKILLed: gone as soon as it is scheduled to exit
        while any("sleep 1000" in c for c in cmdlines().values()) and time.monotonic() < end:
            time.sleep(0.02)
        victim_gone = not any("sleep 1000" in c for c in cmdlines().values())
        # PID 1 of a pid namespace ignores default-action signals sent from inside it.
        for s in ("SIGKILL", "SIGSTOP", "SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGSEGV", "SIGQUIT", "SIGABRT"):
            res["pid1_" + s] = sc({NR["kill"]}, 1, int(getattr(signal, s)))
        time.sleep(0.2)
        # PID 1 (the agent) wakes for the signals it handles: sample its state until it rests again.
        end = time.monotonic() + 10
        while (state := [l.split()[1] for l in open("/proc/1/status") if l.startswith("State:")][0]) != "S" \
                and state not in ("T", "t", "Z", "X") and time.monotonic() < end:
            time.sleep(0.02)
        done(res=res, victim_gone=victim_gone, pid1_state=state)
    """)
    assert r["res"] == {"kill_all": "OK", **{f"pid1_{s}": "OK" for s in (
        "SIGKILL", "SIGSTOP", "SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGSEGV", "SIGQUIT", "SIGABRT")}}
    assert r["victim_gone"] is True  # the attack really ran: it killed what it could see
    assert r["pid1_state"] == "S"  # not stopped, not dead
    assert victim.wait().signal == 9
    assert shared_sb.commands.run("echo ok").stdout == "ok\n"
    assert host_canary.alive()
    assert daemon.proc.poll() is None and _health(daemon) == 200


def test_ptrace_and_cross_process_memory_are_denied(shared_sb, host_canary):
    r = attack(shared_sb, f"""
        host_pid = int(sys.argv[1])
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
        local = ctypes.create_string_buffer(64)
        iov_l = (ctypes.c_void_p * 2)(ctypes.addressof(local), 64)
        iov_r = (ctypes.c_void_p * 2)(0x400000, 64)
        pidfd1 = libc.syscall(ctypes.c_long({NR["pidfd_open"]}), ctypes.c_long(1), ctypes.c_long(0))
        res = dict(
            attach_host=sc({NR["ptrace"]}, 16, host_pid, 0, 0),  # PTRACE_ATTACH
            seize_host=sc({NR["ptrace"]}, 0x4206, host_pid, 0, 0),  # PTRACE_SEIZE
            attach_agent=sc({NR["ptrace"]}, 16, 1, 0, 0),
            attach_own_child=sc({NR["ptrace"]}, 16, child, 0, 0),
            vm_readv_host=sc({NR["process_vm_readv"]}, host_pid, ctypes.byref(iov_l), 1, ctypes.byref(iov_r), 1, 0),
            vm_readv_agent=sc({NR["process_vm_readv"]}, 1, ctypes.byref(iov_l), 1, ctypes.byref(iov_r), 1, 0),
            vm_writev_agent=sc({NR["process_vm_writev"]}, 1, ctypes.byref(iov_l), 1, ctypes.byref(iov_r), 1, 0),
            pidfd_open_host=sc({NR["pidfd_open"]}, host_pid, 0),
            pidfd_getfd_agent_listener=sc({NR["pidfd_getfd"]}, pidfd1, 3, 0),  # the agent's socket
            kcmp_agent=sc({NR["kcmp"]}, 1, os.getpid(), 0, 3, 0),
            agent_mem=oserr(os.open, "/proc/1/mem", os.O_RDONLY),
            agent_environ=oserr(os.open, "/proc/1/environ", os.O_RDONLY),
            agent_maps=oserr(os.open, "/proc/1/maps", os.O_RDONLY),
            agent_fd3=oserr(os.open, "/proc/1/fd/3", os.O_RDWR),
            agent_fd3_link=oserr(os.readlink, "/proc/1/fd/3"),
            agent_root=oserr(os.listdir, "/proc/1/root/"),
            agent_cwd=oserr(os.readlink, "/proc/1/cwd"),
            agent_exe=oserr(os.readlink, "/proc/1/exe"),
            agent_exe_write=oserr(os.open, "/proc/1/exe", os.O_WRONLY),  # CVE-2019-5736 style
        )
        os.kill(child, 9)
        os.waitpid(child, 0)
        done(res=res, pidfd1_ok=pidfd1 >= 0)
    """, host_canary.pid)
    eperm = ("attach_host", "seize_host", "attach_agent", "attach_own_child", "vm_readv_host", "vm_readv_agent",
             "vm_writev_agent", "pidfd_getfd_agent_listener", "kcmp_agent")
    eacces = ("agent_mem", "agent_environ", "agent_maps", "agent_fd3", "agent_fd3_link", "agent_root",
              "agent_cwd", "agent_exe", "agent_exe_write")
    assert r == {"res": {**dict.fromkeys(eperm, "EPERM"), "pidfd_open_host": "ESRCH",
                         **dict.fromkeys(eacces, "EACCES")}, "pidfd1_ok": True}
    assert host_canary.alive()  # also checks TracerPid: 0 and State: S


@pytest.fixture
def other_sandbox(daemon, base):  # type: ignore[no-untyped-def]
    from corral import Sandbox

    sb = Sandbox.create(template=base)
    yield sb
    sb.kill()


def test_other_sandboxes_processes_and_ipc_are_invisible(shared_sb, other_sandbox):
    token = f"corral-escape-other-{secrets.token_hex(6)}"
    key = secrets.randbelow(1 << 30) + 1
    # The neighbour: a process with a unique argv and a SysV shared memory segment with a known key.
    other_sandbox.files.write("/tmp/neighbour.py", f"""
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
shmid = libc.shmget({key}, 4096, 0o1666)  # IPC_CREAT | 0666
print(shmid, flush=True)
time.sleep(600)
""")
    neighbour = other_sandbox.commands.run(f"exec -a {token} python3 /tmp/neighbour.py", background=True)
    deadline = time.monotonic() + 10
    while not (pids := host_pids_with(token)):
        assert time.monotonic() < deadline, "neighbour process did not start"
        time.sleep(0.05)
    host_pid = pids[0]
    try:
        r = attack(shared_sb, f"""
            host_pid, token, key = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
            seen = [p for p, c in cmdlines().items() if token in c and p != os.getpid()]
            res = dict(kill=sc({NR["kill"]}, host_pid, 9), pidfd_open=sc({NR["pidfd_open"]}, host_pid, 0),
                       ptrace=sc({NR["ptrace"]}, 16, host_pid, 0, 0),
                       shmget=sc(29, key, 4096, 0o666))  # attach to the neighbour's segment by key
            done(res=res, seen=seen)
        """, host_pid, token, key)
        assert r == {"res": {"kill": "ESRCH", "pidfd_open": "ESRCH", "ptrace": "EPERM", "shmget": "ENOENT"},
                     "seen": []}
        # The neighbour still runs, in its own sandbox.
        assert host_pid in host_pids_with(token)
        running = {p.pid: p.running for p in other_sandbox.commands.list()}
        assert running[neighbour.pid] is True
    finally:
        for pid in host_pids_with(token):
            kill_quietly(pid)

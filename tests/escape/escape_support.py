"""Helpers for escape tests: attack scripts run inside a sandbox, host-side canaries.

An attack is a Python script run by the sandbox's own python3. It starts with PRELUDE (raw
syscalls through ctypes, errno names) and prints one JSON object as its last line, which the test
asserts exactly. Each script checks its own side effects from inside (a mount that must not exist,
a namespace inode that must not change); the host side checks the rest (canaries still alive, host
files unchanged, listeners that saw nothing).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRELUDE = r'''
import ctypes, errno, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def ename(e):
    return errno.errorcode.get(e, str(e))

def _arg(a):
    # ints go in as longs (negative fds and bit 63 included); pointers, buffers, None as they are
    return ctypes.c_long(a) if isinstance(a, int) else a

def sc(nr, *args):
    """Raw syscall: 'OK' (and the result in LAST) or the errno name."""
    global LAST
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    LAST = r
    return "OK" if r >= 0 else ename(ctypes.get_errno())

def oserr(fn, *a, **kw):
    """Run a Python call: 'OK' or the errno name of the OSError it raised."""
    try:
        fn(*a, **kw)
        return "OK"
    except OSError as e:
        return ename(e.errno)

def mountpoints():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]

def ns(name):
    return os.readlink(f"/proc/self/ns/{name}")

def cmdlines():
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    out[int(p)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                pass
    return out

def done(**kw):
    print(json.dumps(kw), flush=True)
'''

# x86_64 syscall numbers used by the attacks.
NR = dict(
    ioctl=16, mknod=133, personality=135, pivot_root=155, chroot=161, swapon=167, swapoff=168,
    reboot=169, iopl=172, ioperm=173, init_module=175, delete_module=176, mount=165, umount2=166,
    syslog=103, ptrace=101, kill=62, clone=56, acct=163, settimeofday=164, keyctl=250, add_key=248,
    request_key=249, kexec_load=246, kexec_file_load=320, unshare=272, perf_event_open=298,
    name_to_handle_at=303, open_by_handle_at=304, setns=308, process_vm_readv=310,
    process_vm_writev=311, kcmp=312, finit_module=313, bpf=321, userfaultfd=323,
    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428, move_mount=429,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434, clone3=435,
    pidfd_getfd=438, mount_setattr=442, uselib=134, quotactl=179, lookup_dcookie=212,
    clock_settime=227, adjtimex=159, vhangup=153,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080


def script(code: str) -> str:
    return PRELUDE + "\n" + textwrap.dedent(code)


def attack(sb: Any, code: str, *args: object, timeout_s: float = 60, expect_exit: int | None = 0) -> dict[str, Any]:
    """Run an attack script inside ``sb`` and return the JSON object it printed last."""
    path = f"/tmp/attack-{secrets.token_hex(4)}.py"
    sb.files.write(path, script(code))
    r = sb.commands.run(["python3", path, *map(str, args)], timeout_s=timeout_s)
    if expect_exit is not None:
        assert r.exit_code == expect_exit, f"attack script exited {r.exit_code}: {r.stderr[-3000:]}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"attack printed no result (exit {r.exit_code}): {r.stdout[-2000:]} {r.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


@dataclass
class HostCanary:
    """A host process with a unique argv that no sandbox may see, signal or trace."""

    proc: subprocess.Popen[bytes]
    token: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        state = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("State:"))
        tracer = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("TracerPid:"))
        return self.token.encode() in cmdline and state == "S" and tracer == "0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_host_canary() -> HostCanary:
    token = f"corral-escape-canary-{secrets.token_hex(6)}"
    proc = subprocess.Popen(["bash", "-c", f"exec -a {token} sleep 600"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    c = HostCanary(proc, token)
    deadline = time.monotonic() + 5
    while not c.alive():
        assert time.monotonic() < deadline, "host canary did not start"
        time.sleep(0.01)
    return c


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def inside(daemon, sb, path: str) -> Path:  # type: ignore[no-untyped-def]
    """A path in the sandbox's filesystem seen from the host through its init's root (no agent needed;
    its writable layer lives on a disk mounted in the daemon's namespace only)."""
    out = subprocess.run(["crun", "--root", str(daemon.run_dir / "crun"), "state", sb.id], capture_output=True,
                         text=True, check=True).stdout
    return Path(f"/proc/{json.loads(out)['pid']}/root{path}")


def host_pids_with(token: str) -> list[int]:
    """Host pids whose command line contains ``token`` (canaries, survivors)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if token.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def host_pids_named(argv0: str) -> list[int]:
    """Host pids whose argv[0] is exactly ``argv0`` (a process that finished its ``exec -a``).

    Matching anywhere in the command line also finds the shells that started it (their ``-c``
    script names the token) and misses a process in the middle of execve (its command line reads
    empty for a moment): a wait on that can see the token come and go.
    """
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().split(b"\0", 1)[0] == argv0.encode():
                    out.append(int(p.name))
            except OSError:
                pass
    return out

"""The exec guard of one sandbox: a fanotify permission group over every exec-capable mount of the
sandbox, answered by a thread of the daemon after hashing what is about to run.

How each gap that fanotify alone leaves is closed:
- ``ld.so ./file`` maps the file without an exec: a dynamic loader executed as the program (not as
  the interpreter the kernel loads for a dynamic binary) is its own decision (rule ``loader``). The
  kernel opens a binary's interpreter in the same execve right after the binary itself, so an exec
  of a loader counts as "interpreter" only when the same thread's previous event was an allowed ELF
  whose PT_INTERP resolves (in the sandbox's root) to this very file, with the same syscall
  registers, within a short time.
- memfd executables: ``vm.memfd_noexec=2`` in the sandbox's pid namespace (enforce mode), so a
  memfd can never be executable; /dev, /dev/shm, /proc and /sys are mounted noexec.
- Corral's own runtime (the agent's Python and loader, bound at /.corral/rt) is denied by identity.
- A file changed between our hash and the kernel's deny-write on it: the event's file is checked
  again shortly after it was allowed; a changed file kills the process that execs it. Files changed
  less than ``FRESH_S`` ago are hashed only once they are older than that, so any later change shows
  in their ctime even with coarse timestamps.
- A guard that cannot decide (unreadable, too large, crashed handler) denies in enforce mode.
- The daemon going away: in enforce mode the group's fd is also held by a small holder process, so
  the marks survive a daemon restart; execs wait in the kernel until the daemon adopts the group
  again (fail closed rather than unguarded).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.execguard import elf, kernel
from corral.policy.execpolicy import ExecPlan, decide

log = logging.getLogger("corral.execguard")

FRESH_S = 0.05  # well above the coarsest ctime granularity (one jiffy)
INTERP_WINDOW_S = 2.0
INTERP_CACHE_S = 1.0
VERIFY_AFTER_S = 0.02
CACHE_MAX = 20000
HOLDER_FD = 3

Sink = Callable[[str, dict[str, Any]], None]
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass
class _Pending:
    key: tuple[int, int]
    regs: str
    t: float


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), s)


# Kernel pseudo filesystems hold no file a sandbox can write, and fanotify refuses some of them.
PSEUDO_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "securityfs", "debugfs",
                       "tracefs", "bpf", "pstore", "configfs", "binfmt_misc", "fusectl", "hugetlbfs"})


def exec_mounts(pid: int) -> list[tuple[int, str]]:
    """(mount id, mount point inside the sandbox) of every visible mount that allows exec. Of mounts
    stacked on one mount point only the top one is reachable, and listed."""
    top: dict[str, tuple[int, bool]] = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mp = _unescape(fields[4])
            top.pop(mp, None)  # a later mount on the same point covers the earlier one
            top[mp] = (int(fields[0]), "noexec" in fields[5].split(",") or fstype in PSEUDO_FS)
    return [(mid, mp) for mp, (mid, skip) in top.items() if not skip]


def _mark_sandbox_mount(group: int, root_fd: int, mnt_id: int, mp: str) -> None:
    """Mark the mount ``mnt_id`` at ``mp`` inside the sandbox. The path is walked inside the
    sandbox's root with no symlink allowed on the way (the sandbox may be running and could swap a
    directory for a link to aim the mark elsewhere, even at a host mount); the object reached must
    be on that very mount, and it is marked through its descriptor, not by name again."""
    fd = kernel.open_in_root(root_fd, mp, no_symlinks=True)
    try:
        got = kernel.mount_id(fd)
        if got != mnt_id:
            raise OSError(f"{mp} leads to mount {got}, not {mnt_id} (the sandbox changed it while it was armed)")
        kernel.mark_mount(group, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _regs(tid: int) -> str:
    """The syscall a thread is blocked in, with its arguments, stack and instruction pointers. A thread
    that just queued an event may not be asleep yet ("running"): wait for it to block on our answer."""
    for i in range(200):
        try:
            with open(f"/proc/{tid}/syscall") as f:
                regs = f.read().strip()
        except OSError:
            return ""
        if regs != "running":
            return regs
        time.sleep(0 if i < 20 else 0.0001)
    return ""


def _status(tid: int) -> tuple[int, int, int]:
    """(tgid, ppid, pid inside the sandbox) of a thread; zeros if it is gone."""
    tgid = ppid = nspid = 0
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    tgid = int(line.split()[1])
                elif line.startswith("PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith("NSpid:"):
                    nspid = int(line.split()[-1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return tgid, ppid, nspid


def spawn_holder(group: int) -> int:
    """A process that only holds the group open (as fd 3), outside the sandbox, in its own session."""
    return os.posix_spawn("/bin/sleep", ["sleep", "infinity"], {},
                          file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                                        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
                                        (os.POSIX_SPAWN_DUP2, group, HOLDER_FD)],
                          setsid=True)


def is_holder(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[:2] != [b"sleep", b"infinity"]:
                return False
        return os.readlink(f"/proc/{pid}/fd/{HOLDER_FD}") == "anon_inode:[fanotify]"
    except OSError:
        return False


def holder_group(holder_pid: int) -> int:
    """Take the group back from a holder left by an earlier daemon."""
    if not is_holder(holder_pid):
        raise ProcessLookupError(f"process {holder_pid} is not a guard holder")
    pidfd = os.pidfd_open(holder_pid)
    try:
        return kernel.pidfd_getfd(pidfd, HOLDER_FD)
    finally:
        os.close(pidfd)


class ExecGuard:
    def __init__(self, sandbox_id: str, plan: ExecPlan, sink: Sink,
                 runtime_ids: frozenset[tuple[int, int]] = frozenset()):
        self.sandbox_id = sandbox_id
        self.plan = plan
        self.sink = sink
        self.runtime_ids = runtime_ids
        self.group = -1
        self.holder_pid: int | None = None
        self.cache: dict[tuple[int, int], tuple[tuple[int, int, int], elf.FileFacts]] = {}
        self.pending: dict[int, _Pending] = {}
        self._interp_cache: dict[str, tuple[tuple[int, int] | None, float]] = {}
        self.verify: deque[tuple[float, int, tuple[int, int, int], int, str]] = deque()
        self.decisions = 0
        self.failed: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- setup -------------------------------------------------------------------------------
    def arm(self, init_pid: int) -> list[str]:
        """Create the group and mark every exec-capable mount of the sandbox. Returns the mount points."""
        self.group = kernel.fanotify_init()
        try:
            found = exec_mounts(init_pid)
            root_fd = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for mnt_id, mp in found:
                    _mark_sandbox_mount(self.group, root_fd, mnt_id, mp)
            finally:
                os.close(root_fd)
            mounts = [mp for _, mp in found]
            if self.plan.mode == "enforce":
                self.holder_pid = spawn_holder(self.group)
        except BaseException:
            os.close(self.group)
            self.group = -1
            raise
        self._start()
        return mounts

    def adopt(self, holder_pid: int) -> None:
        self.group = holder_group(holder_pid)
        self.holder_pid = holder_pid
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"execguard-{self.sandbox_id}", daemon=True)
        self._thread.start()

    def close(self, keep_holder: bool = False) -> None:
        """Stop answering. keep_holder=True (daemon shutdown): the holder keeps the marks, so execs
        wait for the next daemon instead of running unguarded."""
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.holder_pid and not keep_holder:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.holder_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.holder_pid, 0)
            self.holder_pid = None
        while self.verify:
            with contextlib.suppress(OSError):
                os.close(self.verify.popleft()[1])
        for fd in (self.group, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.group = -1

    def set_plan(self, plan: ExecPlan) -> None:
        self.plan = plan

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.group, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop:
                timeout = None
                if self.verify:
                    timeout = max(0, int((self.verify[0][0] - time.monotonic()) * 1000) + 1)
                ready = poller.poll(timeout)
                if self._stop:
                    break
                if any(fd == self.group for fd, _ in ready):
                    try:
                        buf = os.read(self.group, kernel.EVENT.size * 256)
                    except BlockingIOError:
                        buf = b""
                    off = 0
                    while off + kernel.EVENT.size <= len(buf):
                        length, _ver, _, _mlen, mask, efd, tid = kernel.EVENT.unpack_from(buf, off)
                        off += max(length, kernel.EVENT.size)
                        self._event(mask, efd, tid)
                self._verify_due()
        except Exception as e:  # the guard must never die silently: in enforce mode it takes the sandbox down
            log.exception("exec guard of %s failed", self.sandbox_id)
            self.failed = f"{type(e).__name__}: {e}"
            self.sink(self.sandbox_id, {"kind": "guard", "verdict": "error", "rule": "guard-failed",
                                        "message": self.failed[:300], "mode": self.plan.mode})

    def _event(self, mask: int, efd: int, tid: int) -> None:
        if efd < 0:  # queue overflow: cannot happen with permission events, but never ignore it
            self.sink(self.sandbox_id, {"kind": "guard", "verdict": "error", "rule": "overflow", "mode": self.plan.mode})
            return
        enforce = self.plan.mode == "enforce"
        allow, keep = True, False
        detail: dict[str, Any] = {"kind": "exec", "mode": self.plan.mode}
        try:
            allow, keep = self._decide(efd, tid, detail)
        except Exception as e:  # fail closed
            detail.update(verdict="deny" if enforce else "would-deny", rule="guard-error",
                          message=f"{type(e).__name__}: {e}"[:300])
            allow = not enforce
            keep = False
        finally:
            self.decisions += 1
            # The event first, the answer second: by the time the exec fails in the sandbox (and the
            # command that ran it returns), its denial is already in the daemon's hands.
            with contextlib.suppress(Exception):
                self.sink(self.sandbox_id, detail)
            try:
                kernel.respond(self.group, efd, allow)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the process died meanwhile
                    log.warning("exec guard of %s could not answer: %s", self.sandbox_id, e)
            if not keep:
                os.close(efd)

    def _facts(self, efd: int, st: os.stat_result) -> tuple[os.stat_result, elf.FileFacts]:
        key = (st.st_dev, st.st_ino)
        ident = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = self.cache.get(key)
        if hit is not None and hit[0] == ident:
            return st, hit[1]
        for _ in range(3):
            age = time.time() - st.st_ctime_ns / 1e9
            if age < FRESH_S:
                time.sleep(FRESH_S - max(age, 0.0))
                st = os.fstat(efd)
                ident = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            facts = elf.facts(efd, st.st_size, self.plan.max_hash_bytes)
            st2 = os.fstat(efd)
            if (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns) == ident:
                if len(self.cache) >= CACHE_MAX:
                    self.cache.clear()
                self.cache[key] = (ident, facts)
                return st, facts
            st = st2
            ident = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        raise RuntimeError("the file kept changing while it was hashed")

    def _decide(self, efd: int, tid: int, detail: dict[str, Any]) -> tuple[bool, bool]:
        enforce = self.plan.mode == "enforce"
        try:
            path = os.readlink(f"/proc/self/fd/{efd}")
        except OSError:
            path = "?"
        tgid, ppid, nspid = _status(tid)
        detail.update(path=path[:1024], pid=nspid or tid, host_pid=tgid or tid, ppid=ppid)
        st = os.fstat(efd)
        if not stat.S_ISREG(st.st_mode):
            detail.update(verdict="deny" if enforce else "would-deny", rule="not-a-regular-file")
            return not enforce, False
        key = (st.st_dev, st.st_ino)
        try:
            st, facts = self._facts(efd, st)
        except elf.TooLargeError as e:
            detail.update(verdict="deny" if enforce else "would-deny", rule="too-large", message=str(e))
            return not enforce, False
        detail["sha256"] = facts.sha256
        pend = self.pending.pop(tid, None)
        as_interp = (pend is not None and pend.key == key and time.monotonic() - pend.t < INTERP_WINDOW_S
                     and bool(pend.regs) and pend.regs == _regs(tid))
        if as_interp:
            detail["kind"] = "interpreter"
        loader = facts.sha256 in self.plan.loaders or elf.is_loader_name(path)
        verdict = decide(self.plan, facts.sha256, as_program_loader=loader and not as_interp,
                         corral_runtime=key in self.runtime_ids)
        detail["rule"] = verdict.rule
        if facts.interp and not as_interp and (verdict.allowed or not enforce):  # the exec goes on
            p = self._pending(tid, facts.interp)
            if p is not None:
                self.pending[tid] = p
        if not verdict.allowed:
            detail["verdict"] = "deny" if enforce else "would-deny"
            return not enforce, False
        detail["verdict"] = "allow"
        if enforce:
            self.verify.append((time.monotonic() + VERIFY_AFTER_S, efd, (st.st_size, st.st_mtime_ns, st.st_ctime_ns),
                                tid, path))
            return True, True
        return True, False

    def _pending(self, tid: int, interp: str) -> _Pending | None:
        """Where the kernel will find this binary's interpreter, if the exec can get that far. The
        answer is cached briefly: a stale one can only fail to match (the loader rule then applies)."""
        now = time.monotonic()
        hit = self._interp_cache.get(interp)
        if hit is not None and now - hit[1] < INTERP_CACHE_S:
            return None if hit[0] is None else _Pending(hit[0], _regs(tid), now)
        p = self._resolve_interp(tid, interp)
        self._interp_cache[interp] = (p.key if p else None, now)
        return p

    @staticmethod
    def _resolve_interp(tid: int, interp: str) -> _Pending | None:
        try:
            root = os.open(f"/proc/{tid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fd = kernel.open_in_root(root, interp)
        except OSError:
            return None
        finally:
            os.close(root)
        try:
            st = os.fstat(fd)
            # The kernel would fail to open such an interpreter without asking us: no expectation
            # may linger for a later, direct exec of the loader to use.
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or os.fstatvfs(fd).f_flag & os.ST_NOEXEC:
                return None
            return _Pending((st.st_dev, st.st_ino), _regs(tid), time.monotonic())
        finally:
            os.close(fd)

    def _verify_due(self) -> None:
        now = time.monotonic()
        while self.verify and self.verify[0][0] <= now:
            _, efd, ident, tid, path = self.verify.popleft()
            try:
                st = os.fstat(efd)
                if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != ident:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(tid, signal.SIGKILL)
                    self.sink(self.sandbox_id, {"kind": "exec", "mode": self.plan.mode, "verdict": "killed",
                                                "rule": "modified-during-exec", "path": path[:1024],
                                                "host_pid": tid})
            finally:
                os.close(efd)


async def set_memfd_noexec(init_pid: int) -> None:
    """vm.memfd_noexec=2 for the sandbox's pid namespace (not namespaced for crun's config, but the
    kernel keeps it per pid namespace): no memfd can ever be executable there."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(init_pid), "-p", "--", "/bin/sh", "-c",
        "echo 2 > /proc/sys/vm/memfd_noexec && cat /proc/sys/vm/memfd_noexec",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    out, err = await proc.communicate()
    if proc.returncode != 0 or out.strip() != b"2":
        raise OSError(f"could not set vm.memfd_noexec=2 in the sandbox's pid namespace: "
                      f"{err.decode(errors='replace').strip() or out.decode(errors='replace').strip()}")

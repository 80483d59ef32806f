"""ctypes bindings for what the guard needs from the kernel: fanotify, openat2, pidfd_getfd."""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.syscall.restype = ctypes.c_long

FAN_CLOEXEC = 0x1
FAN_CLASS_CONTENT = 0x4
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_TID = 0x100
FAN_MARK_ADD = 0x1
FAN_MARK_MOUNT = 0x10
FAN_OPEN_EXEC_PERM = 0x40000
FAN_ALLOW = 0x1
FAN_DENY = 0x2
AT_FDCWD = -100

EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
RESPONSE = struct.Struct("=iI")  # struct fanotify_response

SYS_OPENAT2 = 437
SYS_PIDFD_GETFD = 438
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
RESOLVE_NO_SYMLINKS = 0x04


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def fanotify_init() -> int:
    """A permission-class group reporting thread ids; blocking reads (the guard polls it)."""
    fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE | FAN_REPORT_TID,
                             os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
    if fd < 0:
        raise _err("fanotify_init")
    return int(fd)


def mount_id(fd: int) -> int:
    """The id of the mount an open file is on (as the first field of /proc/<pid>/mountinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id for fd {fd}")


def mark_mount(fd: int, path: str) -> None:
    if _libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN_EXEC_PERM, AT_FDCWD, path.encode()) != 0:
        raise _err(f"fanotify_mark {path}")


def respond(group: int, event_fd: int, allow: bool) -> None:
    os.write(group, RESPONSE.pack(event_fd, FAN_ALLOW if allow else FAN_DENY))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int = os.O_PATH | os.O_CLOEXEC, *, no_symlinks: bool = False) -> int:
    """openat2 with RESOLVE_IN_ROOT: resolve ``path`` as the process whose root is ``root_fd`` would,
    absolute symlinks included, without leaving that root (``no_symlinks``: a link anywhere on the
    way is an error, ELOOP)."""
    how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | (RESOLVE_NO_SYMLINKS if no_symlinks else 0))
    fd = _libc.syscall(SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        raise _err(f"openat2 {path}")
    return int(fd)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        raise _err("pidfd_getfd")
    return int(fd)


def available() -> tuple[bool, str]:
    try:
        fd = fanotify_init()
    except OSError as e:
        return False, f"fanotify permission events unavailable ({e.strerror})"
    os.close(fd)
    return True, "fanotify FAN_OPEN_EXEC_PERM"


def bpf_lsm() -> tuple[bool, str]:
    try:
        with open("/sys/kernel/security/lsm") as f:
            lsms = f.read().strip().split(",")
    except OSError:
        return False, "securityfs not readable"
    if "bpf" not in lsms:
        return False, f"the bpf LSM is not enabled (active: {','.join(lsms)})"
    return False, "the bpf LSM is enabled, but Corral does not ship a BPF LSM program yet"

"""Size-limited filesystems as sparse ext4 images on loop devices.

A sandbox's writable layer and every volume live on one: filling it gives ENOSPC inside the sandbox
only, and the host filesystem is charged only for blocks actually written. mount(8) reuses the loop
device already attached to an image, so mounting an image again (after a daemon restart, while a
running sandbox still holds it) shares the same superblock instead of corrupting it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidRequestError, RuntimeUnavailableError

MIN_MIB = 16


@dataclass(frozen=True)
class Usage:
    size_bytes: int
    used_bytes: int
    free_bytes: int


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeUnavailableError(f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[-300:]}",
                                      hint="needs e2fsprogs and loop devices (`corral doctor`)")


def create(image: Path, size_mib: int, owner: int) -> None:
    """A sparse ext4 image whose root directory belongs to ``owner`` (root inside the sandbox)."""
    if size_mib < MIN_MIB:
        raise InvalidRequestError(f"a disk must be at least {MIN_MIB} MiB")
    tmp = image.with_name(image.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size_mib << 20)
    # No reserved blocks; lazy init keeps mkfs at a few ms whatever the size.
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"lazy_itable_init=1,lazy_journal_init=1,root_owner={owner}:{owner}",
         "-L", "corral", str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, image)


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def mount(image: Path, mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        return
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(mountpoint))


def unmount(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        # The loop device detaches itself (autoclear) once no mount of it remains anywhere.
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def usage(mountpoint: Path) -> Usage:
    st = os.statvfs(mountpoint)
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    return Usage(size_bytes=size, used_bytes=size - st.f_bfree * st.f_frsize, free_bytes=free)

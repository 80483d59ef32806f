"""Portable backups: a snapshot chain (and the sandbox's policy) as a tar archive, and its safe import.

Archive layout (plain or gzip tar):
  corral-backup.json        {"format": 1, "kind", "template", "policy", "metadata", "layers": [...]}
  layers/<n>/<path>         layer n's files, bottom layer first; only regular files, dirs and symlinks
Owners are stored relative to the sandbox uid range (root inside = 0), so an archive moves between
hosts with other ranges. Overlay markers travel in the JSON (whiteouts, opaque dirs), never as device
entries.

Import trusts nothing in the archive: absolute paths, '..', NUL bytes, links, devices, fifos,
duplicate or over-deep names, owners outside the range and size or count bombs are refused before
anything is used, and files are created with O_NOFOLLOW below directories opened one component at a
time, so a symlink entry can never redirect a later write.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corral.errors import InvalidRequestError, PayloadTooLargeError
from corral.policy import defaults
from corral.storage.snapshots import OPAQUE, _walk

FORMAT = 1
MANIFEST = "corral-backup.json"


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 8 << 30  # uncompressed
    max_entries: int = 500_000
    max_depth: int = 64
    max_name: int = 4096


def export(out: IO[bytes], layers: list[Path], meta: dict[str, Any]) -> None:
    """Write ``layers`` (bottom first) and ``meta`` as a gzip tar to ``out``."""
    manifest: dict[str, Any] = {"format": FORMAT, **meta, "layers": []}
    with tarfile.open(fileobj=out, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:
        entries: list[tuple[tarfile.TarInfo, Path | None]] = []
        for n, layer in enumerate(layers):
            whiteouts, opaque = [], []
            for rel, st in _walk(layer):
                src = layer / rel
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    whiteouts.append(rel)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    try:
                        if os.getxattr(src, OPAQUE) == b"y":
                            opaque.append(rel)
                    except OSError:
                        pass
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    continue
                ti = tarfile.TarInfo(f"layers/{n}/{rel}")
                ti.mode = stat.S_IMODE(st.st_mode) & 0o777  # no setuid/setgid/sticky in archives
                ti.uid, ti.gid = max(0, st.st_uid - defaults.UID_BASE), max(0, st.st_gid - defaults.UID_BASE)
                ti.mtime = int(st.st_mtime)
                if stat.S_ISDIR(st.st_mode):
                    ti.type = tarfile.DIRTYPE
                    entries.append((ti, None))
                elif stat.S_ISLNK(st.st_mode):
                    ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(src)
                    entries.append((ti, None))
                else:
                    ti.size = st.st_size
                    entries.append((ti, src))
            manifest["layers"].append({"whiteouts": whiteouts, "opaque": opaque})
        data = json.dumps(manifest, indent=1).encode()
        head = tarfile.TarInfo(MANIFEST)
        head.size, head.mode = len(data), 0o644
        tar.addfile(head, io.BytesIO(data))
        for ti, path in entries:
            if path is None:
                tar.addfile(ti)
            else:
                with open(path, "rb") as f:
                    tar.addfile(ti, f)


def _check_name(name: str, limits: Limits) -> list[str]:
    if "\x00" in name or len(name) > limits.max_name or name.startswith("/") or "\\" in name:
        raise InvalidRequestError(f"archive entry {name[:200]!r} has an unsafe name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise InvalidRequestError(f"archive entry {name[:200]!r} escapes the archive root")
    if len(parts) > limits.max_depth:
        raise InvalidRequestError(f"archive entry {name[:200]!r} is nested deeper than {limits.max_depth}")
    return parts


def _open_dir(root_fd: int, parts: list[str]) -> int:
    """Open a directory below root_fd one component at a time, never following a symlink."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as e:
        os.close(fd)
        raise InvalidRequestError(f"archive path {'/'.join(parts)!r} goes through a non-directory: {e.strerror}") from None
    return fd


def import_archive(src: IO[bytes], staging: Path, limits: Limits = Limits()) -> tuple[dict[str, Any], list[Path]]:
    """Unpack a backup into ``staging/<n>`` layer trees; returns its manifest and the layer dirs (bottom first)."""
    staging.mkdir(parents=True)
    manifest: dict[str, Any] | None = None
    total = count = 0
    seen: set[str] = set()
    root_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with tarfile.open(fileobj=src, mode="r|*") as tar:
            for ti in tar:
                count += 1
                if count > limits.max_entries:
                    raise PayloadTooLargeError(f"the archive has more than {limits.max_entries} entries")
                if ti.name == MANIFEST:
                    if manifest is not None or not ti.isfile() or ti.size > 64 << 20:
                        raise InvalidRequestError("the archive has a bad or duplicate manifest")
                    f = tar.extractfile(ti)
                    assert f is not None
                    try:
                        manifest = json.loads(f.read())
                    except ValueError:
                        raise InvalidRequestError("the archive's manifest is not JSON") from None
                    continue
                parts = _check_name(ti.name, limits)
                if parts[0] != "layers" or len(parts) < 3 or not parts[1].isdigit():
                    raise InvalidRequestError(f"unexpected archive entry {ti.name[:200]!r}")
                key = "/".join(parts)
                if key in seen:
                    raise InvalidRequestError(f"archive entry {ti.name[:200]!r} appears twice")
                seen.add(key)
                if not (ti.isfile() or ti.isdir() or ti.issym()):
                    raise InvalidRequestError(f"archive entry {ti.name[:200]!r} is a link, device or fifo: refused")
                if not (0 <= ti.uid < defaults.UID_COUNT and 0 <= ti.gid < defaults.UID_COUNT):
                    raise InvalidRequestError(f"archive entry {ti.name[:200]!r} has an owner outside the sandbox range")
                total += max(ti.size, 0)
                if total > limits.max_bytes:
                    raise PayloadTooLargeError(f"the archive unpacks to more than {limits.max_bytes} bytes")
                layer_dir = staging / parts[1]
                layer_dir.mkdir(exist_ok=True)
                parent_fd = _open_dir(root_fd, parts[1:-1])
                try:
                    name, mode = parts[-1], ti.mode & 0o777
                    uid, gid = ti.uid + defaults.UID_BASE, ti.gid + defaults.UID_BASE
                    if ti.isdir():
                        try:
                            os.mkdir(name, 0o700, dir_fd=parent_fd)
                        except FileExistsError:
                            pass
                        dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
                        os.fchown(dfd, uid, gid)
                        os.fchmod(dfd, mode)
                        os.close(dfd)
                    elif ti.issym():
                        os.symlink(ti.linkname, name, dir_fd=parent_fd)  # data only: never followed here
                        os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
                    else:
                        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o600, dir_fd=parent_fd)
                        with os.fdopen(fd, "wb") as out:
                            f = tar.extractfile(ti)
                            assert f is not None
                            left = ti.size
                            while left > 0:
                                chunk = f.read(min(left, 1 << 20))
                                if not chunk:
                                    raise InvalidRequestError(f"archive entry {ti.name[:200]!r} is truncated")
                                out.write(chunk)
                                left -= len(chunk)
                            os.fchown(out.fileno(), uid, gid)
                            os.fchmod(out.fileno(), mode)
                        os.utime(name, (ti.mtime, ti.mtime), dir_fd=parent_fd, follow_symlinks=False)
                finally:
                    os.close(parent_fd)
    except tarfile.TarError as e:
        raise InvalidRequestError(f"not a readable tar archive: {e}") from None
    finally:
        os.close(root_fd)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidRequestError("the archive is not a Corral backup (no corral-backup.json of format 1)")
    layers_meta = manifest.get("layers")
    if not isinstance(layers_meta, list) or not layers_meta or len(layers_meta) > 128:
        raise InvalidRequestError("the backup lists no layers")
    layers = []
    for n, lm in enumerate(layers_meta):
        d = staging / str(n)
        d.mkdir(exist_ok=True)
        dfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for rel in lm.get("whiteouts", []):
                parts = _check_name(str(rel), limits)
                pfd = _open_dir(dfd, [str(n), *parts[:-1]])
                try:
                    os.mknod(parts[-1], stat.S_IFCHR, 0, dir_fd=pfd)
                    os.chown(parts[-1], defaults.UID_BASE, defaults.UID_BASE, dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)
            for rel in lm.get("opaque", []):
                parts = _check_name(str(rel), limits)
                pfd = _open_dir(dfd, [str(n), *parts])
                try:
                    os.setxattr(f"/proc/self/fd/{pfd}", OPAQUE, b"y")
                finally:
                    os.close(pfd)
        finally:
            os.close(dfd)
        layers.append(d)
    return manifest, layers

"""Snapshots: a sandbox's writable layer, stored content-addressed and deduplicated.

Every regular file goes once into the blob store, keyed by its content hash and the metadata an inode
carries (mode, owner): ``blobs/ab/<sha256>-<mode>-<uid>-<gid>``. A snapshot's layer is a directory tree
whose files are hard links to those blobs, so files shared by several snapshots cost nothing twice and a
blob is in use exactly while its link count is above one. A layer is read-only once made and becomes an
overlay lower layer of the sandboxes forked from it. Overlay's own markers are kept: whiteouts (0/0
character devices) and opaque directories (``trusted.overlay.opaque``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OPAQUE = "trusted.overlay.opaque"
CHUNK = 1 << 20


@dataclass
class LayerStats:
    files: int = 0
    size_bytes: int = 0  # bytes of regular files in the layer
    new_bytes: int = 0  # bytes that were not in the blob store before


def _blob_key(digest: str, st: os.stat_result) -> str:
    return f"{digest}-{stat.S_IMODE(st.st_mode):o}-{st.st_uid}-{st.st_gid}"


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below root (parents before children), as paths relative to root."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for ent in entries:
            sub = f"{rel}/{ent.name}" if rel else ent.name
            st = ent.stat(follow_symlinks=False)
            yield sub, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)


class SnapshotStore:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.layers = root / "layers"

    def layer(self, snapshot_id: str) -> Path:
        return self.layers / snapshot_id

    def capture(self, snapshot_id: str, upper: Path) -> LayerStats:
        """Copy ``upper`` into a new layer, storing each file's content once. The caller freezes the sandbox."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.layers.mkdir(parents=True, exist_ok=True)
        tmp = self.layers / f".tmp-{snapshot_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        stats = LayerStats()
        dirs: list[tuple[Path, os.stat_result]] = []
        try:
            for rel, st in _walk(upper):
                src, dst = upper / rel, tmp / rel
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    dst.mkdir()
                    try:
                        if os.getxattr(src, OPAQUE) == b"y":
                            os.setxattr(dst, OPAQUE, b"y")
                    except OSError:
                        pass
                    dirs.append((dst, st))
                elif stat.S_ISREG(mode):
                    self._store_file(src, dst, st, stats)
                elif stat.S_ISLNK(mode):
                    os.symlink(os.readlink(src), dst)
                    os.lchown(dst, st.st_uid, st.st_gid)
                elif stat.S_ISCHR(mode) and st.st_rdev == 0:  # an overlay whiteout: "deleted below"
                    os.mknod(dst, stat.S_IFCHR | 0o000, 0)
                    os.lchown(dst, st.st_uid, st.st_gid)
                elif stat.S_ISFIFO(mode):
                    os.mkfifo(dst, stat.S_IMODE(mode))
                    os.lchown(dst, st.st_uid, st.st_gid)
                # sockets and other devices cannot be made by a sandbox and are not kept
            for d, st in reversed(dirs):  # children first: setting modes last keeps dirs writable meanwhile
                os.chown(d, st.st_uid, st.st_gid)
                os.chmod(d, stat.S_IMODE(st.st_mode))
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.chmod(tmp, 0o755)
            tmp.rename(self.layer(snapshot_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return stats

    def _store_file(self, src: Path, dst: Path, st: os.stat_result, stats: LayerStats) -> None:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            digest = _hash_fd(fd)
            key = _blob_key(digest, st)
            blob = self.blobs / key[:2] / key
            if not blob.exists():
                blob.parent.mkdir(exist_ok=True)
                part = blob.with_name(blob.name + f".part-{os.getpid()}")
                os.lseek(fd, 0, os.SEEK_SET)
                with open(part, "wb") as out:
                    while chunk := os.read(fd, CHUNK):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.chown(part, st.st_uid, st.st_gid)
                os.chmod(part, stat.S_IMODE(st.st_mode))
                os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.replace(part, blob)
                stats.new_bytes += st.st_size
        finally:
            os.close(fd)
        os.link(blob, dst)
        stats.files += 1
        stats.size_bytes += st.st_size

    def remove(self, snapshot_id: str) -> int:
        """Delete a layer and every blob no other layer links to; returns the bytes freed."""
        shutil.rmtree(self.layer(snapshot_id), ignore_errors=True)
        return self.collect_garbage()

    def collect_garbage(self) -> int:
        freed = 0
        if not self.blobs.is_dir():
            return 0
        for sub in self.blobs.iterdir():
            for blob in sub.iterdir():
                st = blob.stat()
                if st.st_nlink <= 1:
                    freed += st.st_size
                    blob.unlink()
        return freed

    def unique_bytes(self, snapshot_id: str) -> int:
        """Bytes only this layer holds (its blobs have no other layer linking them)."""
        total = 0
        for _rel, st in _walk(self.layer(snapshot_id)):
            if stat.S_ISREG(st.st_mode) and st.st_nlink <= 2:
                total += st.st_size
        return total

    def blob_bytes(self) -> int:
        if not self.blobs.is_dir():
            return 0
        return sum(b.stat().st_size for sub in self.blobs.iterdir() for b in sub.iterdir())


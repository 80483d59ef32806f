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
import json
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPAQUE = "trusted.overlay.opaque"
CHUNK = 1 << 20


@dataclass
class LayerStats:
    files: int = 0
    size_bytes: int = 0  # bytes of regular files in the layer
    new_bytes: int = 0  # bytes that were not in the blob store before


def _blob_key(digest: str, st: os.stat_result) -> str:
    mode = stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)  # what the blob will carry
    return f"{digest}-{mode:o}-{st.st_uid}-{st.st_gid}"


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
        self._lock = threading.Lock()
        self.blobs = root / "blobs"
        self.layers = root / "layers"

    def layer(self, snapshot_id: str) -> Path:
        return self.layers / snapshot_id

    def capture(self, snapshot_id: str, upper: Path, cache: Path | None = None) -> LayerStats:
        """Copy ``upper`` into a new layer, storing each file's content once. The caller freezes the sandbox.

        ``cache`` remembers each file's blob by inode, size, mtime and ctime, so a file unchanged since the
        sandbox's previous snapshot is linked without being read again (unchanged files cost nothing).
        """
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.layers.mkdir(parents=True, exist_ok=True)
        tmp = self.layers / f".tmp-{snapshot_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        stats = LayerStats()
        dirs: list[tuple[Path, os.stat_result]] = []
        files: list[tuple[str, Path, Path, os.stat_result]] = []
        known: dict[str, list[Any]] = {}
        if cache is not None:
            try:
                known = json.loads(cache.read_text())
            except (OSError, ValueError):
                known = {}
        seen: dict[str, list[Any]] = {}
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
                    files.append((rel, src, dst, st))
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
            todo = []
            for rel, src, dst, st in files:
                ident = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
                hit = known.get(rel)
                if hit is not None and hit[:4] == ident and (self.blobs / hit[4][:2] / hit[4]).exists():
                    os.link(self.blobs / hit[4][:2] / hit[4], dst)
                    stats.files += 1
                    stats.size_bytes += st.st_size
                    seen[rel] = hit
                else:
                    todo.append((rel, src, dst, st, ident))
            # Two workers: hashing (OpenSSL, GIL released) is the bottleneck, not the disk.
            with ThreadPoolExecutor(max_workers=2) as pool:
                for rel, key, ident in pool.map(lambda t: (t[0], self._store_file(t[1], t[2], t[3], stats), t[4]),
                                                todo):
                    seen[rel] = [*ident, key]
            if cache is not None:
                cache.write_text(json.dumps(seen))
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

    def _store_file(self, src: Path, dst: Path, st: os.stat_result, stats: LayerStats) -> str:
        # One pass: hash while copying into a staging blob (as fast as cp); drop it if the content is known.
        part = self.blobs / f".part-{os.getpid()}-{threading.get_ident()}"
        h = hashlib.sha256()
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with open(part, "wb") as out:
                while chunk := os.read(fd, CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.close(fd)
        key = _blob_key(h.hexdigest(), st)
        blob = self.blobs / key[:2] / key
        with self._lock:
            if blob.exists():
                part.unlink()
            else:
                blob.parent.mkdir(exist_ok=True)
                os.chown(part, st.st_uid, st.st_gid)
                # Blobs lie on the host's file system: never setuid/setgid there (a local user could
                # run one a sandbox planted; inside a sandbox no_new_privs makes the bits inert).
                os.chmod(part, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
                os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.replace(part, blob)
                stats.new_bytes += st.st_size
            os.link(blob, dst)
            stats.files += 1
            stats.size_bytes += st.st_size
        return key

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

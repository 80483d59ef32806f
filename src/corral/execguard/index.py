"""Index a root filesystem's executables: content hashes, program names and dynamic loaders.

Built once per template (cached next to it, keyed by the template's build time) so names in an
exec policy resolve to hashes and ``allow: ["template"]`` knows what the template ships.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from corral.execguard import elf, kernel
from corral.policy.execpolicy import ExecIndex

INDEX_FILE = "exec-index.json"
INDEX_VERSION = 1
MAX_BYTES = 1 << 30
HOST_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def build(rootfs: Path, only_dirs: tuple[str, ...] | None = None) -> ExecIndex:
    files: dict[str, str] = {}
    loaders: set[str] = set()
    links: list[tuple[str, str]] = []  # (path inside, name) of symlinks to resolve afterwards
    by_identity: dict[tuple[int, int], str] = {}
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tops = [rootfs / d.lstrip("/") for d in only_dirs] if only_dirs else [rootfs]
        for top in tops:
            if not top.is_dir() or top.is_symlink():
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if not (dirpath == str(rootfs) and d in ("proc", "sys", "dev"))]
                for name in filenames:
                    host = os.path.join(dirpath, name)
                    inside = "/" + os.path.relpath(host, rootfs)
                    st = os.lstat(host)
                    if stat.S_ISLNK(st.st_mode):
                        links.append((inside, name))
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    loader = elf.is_loader_name(name)
                    if not (st.st_mode & 0o111 or loader):
                        continue
                    digest = _hash(host, st.st_size)
                    if digest is None:
                        continue
                    files[inside] = digest
                    by_identity[(st.st_dev, st.st_ino)] = digest
                    if loader:
                        loaders.add(digest)
        names: dict[str, set[str]] = {}
        for inside, digest in files.items():
            names.setdefault(os.path.basename(inside), set()).add(digest)
        for inside, name in links:
            try:
                fd = kernel.open_in_root(root_fd, inside.lstrip("/"))
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            digest = by_identity.get((st.st_dev, st.st_ino))
            if digest is not None:
                names.setdefault(name, set()).add(digest)
    finally:
        os.close(root_fd)
    return ExecIndex(files=files, names={k: tuple(sorted(v)) for k, v in names.items()},
                     loaders=frozenset(loaders), complete=only_dirs is None)


def _hash(path: str, size: int) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return elf.facts(fd, size, MAX_BYTES).sha256
    except (OSError, elf.TooLargeError):
        return None
    finally:
        os.close(fd)


def load_or_build(template_dir: Path, rootfs: Path, built_at: float) -> ExecIndex:
    cache = template_dir / INDEX_FILE
    try:
        data = json.loads(cache.read_text())
        if data.get("version") == INDEX_VERSION and data.get("built_at") == built_at:
            return ExecIndex(files=data["files"], names={k: tuple(v) for k, v in data["names"].items()},
                             loaders=frozenset(data["loaders"]), complete=True)
    except (OSError, ValueError, KeyError):
        pass
    idx = build(rootfs)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": INDEX_VERSION, "built_at": built_at, "files": idx.files,
                               "names": {k: list(v) for k, v in idx.names.items()},
                               "loaders": sorted(idx.loaders)}))
    os.replace(tmp, cache)
    return idx


def host_index() -> ExecIndex:
    """root='host' sandboxes: the host's program directories (no template to index)."""
    return build(Path("/"), HOST_DIRS)


def runtime_identities(runtime_dir: Path) -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of every regular file of the agent runtime: the guard denies exec'ing them."""
    out = set()
    for dirpath, _, filenames in os.walk(runtime_dir):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                out.add((st.st_dev, st.st_ino))
    return frozenset(out)

"""Root filesystem layers: templates (debootstrap, busybox) and the agent's own Python runtime.

Every layer is built into a temporary directory and renamed into place only when complete, so an
interrupted build never leaves a half layer that looks usable.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidRequestError, RuntimeUnavailableError, TemplateNotFoundError
from corral.policy import defaults

Progress = Callable[[str], None]
BUILTIN_TEMPLATES = ("base", "busybox")
BASE_PACKAGES = ("python3", "git", "bash", "coreutils", "ca-certificates", "curl")
BASE_SUITE = "bookworm"
AGENT_RUNTIME_VERSION = 1
_PY_EXCLUDE_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                    "site-packages", "pydoc_data", "distutils", "unittest", "sqlite3", "venv",
                    "curses", "dbm", "xmlrpc", "wsgiref", "msilib"}
_DYNLOAD_EXCLUDE = re.compile(r"^(_test|_tkinter|_curses|xx|_xx|readline|_ctypes_test|ossaudiodev|nis|spwd|_sqlite3)")


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    rootfs: str
    built_at: float
    size_bytes: int
    files: int
    description: str
    setuid_cleared: bool = False  # no setuid/setgid file left in the layer (see shift_ownership)


def _noop(_: str) -> None:
    pass


class TemplateStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str) -> TemplateInfo | None:
        if not _TEMPLATE_NAME.fullmatch(name):  # names come from requests and archives: never a path
            return None
        meta = self.path(name) / "meta.json"
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        return TemplateInfo(**data)

    def list_built(self) -> list[TemplateInfo]:
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                info = self.get(d.name)
                if info:
                    out.append(info)
        return out

    def build(self, name: str, progress: Progress = _noop, force: bool = False) -> TemplateInfo:
        if name not in BUILTIN_TEMPLATES:
            raise TemplateNotFoundError(f"no template named {name!r}")
        existing = self.get(name)
        if existing and not force:
            progress(f"template {name} already built")
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        # Several daemons may share a template directory: one builds, the others wait for it.
        with open(self.root / f".lock-{name}", "w") as lock:
            if not _try_lock(lock.fileno()):
                progress(f"waiting for another build of template {name}")
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                existing = self.get(name)
                if existing and not force:
                    return existing
            return self._build_locked(name, progress)

    def _build_locked(self, name: str, progress: Progress) -> TemplateInfo:
        tmp = self.root / f".build-{name}-{os.getpid()}-{time.monotonic_ns()}"
        rootfs = tmp / "rootfs"
        rootfs.mkdir(parents=True)
        try:
            t0 = time.monotonic()
            if name == "busybox":
                desc = "busybox: a static busybox and nothing else (no Python, no libc)"
                _build_busybox(rootfs, progress)
            else:
                desc = f"base: Debian {BASE_SUITE} minbase + {', '.join(BASE_PACKAGES)}"
                _build_debian(rootfs, progress)
            _finish_rootfs(rootfs)
            progress("shifting ownership into the sandbox uid range")
            files, size = shift_ownership(rootfs, defaults.UID_BASE)
            info = TemplateInfo(name=name, rootfs=str(self.path(name) / "rootfs"), built_at=time.time(),
                                size_bytes=size, files=files, description=desc, setuid_cleared=True)
            (tmp / "meta.json").write_text(json.dumps(info.__dict__))
            final = self.path(name)
            if final.exists():
                old = self.root / f".old-{name}-{time.monotonic_ns()}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
            progress(f"template {name} built in {time.monotonic() - t0:.1f}s ({files} files, {size >> 20} MiB)")
            return info
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, name: str) -> None:
        if not self.path(name).exists():
            raise TemplateNotFoundError(f"no template named {name!r}")
        shutil.rmtree(self.path(name))

    def clear_setuid(self) -> list[str]:
        """Templates built before layers were kept free of setuid/setgid files: clear those bits
        once (a local host user could otherwise run them as the sandboxes' uid); the names done."""
        done = []
        for info in self.list_built():
            if info.setuid_cleared:
                continue
            for dirpath, _dirs, files in os.walk(info.rootfs):
                for name in files:
                    p = os.path.join(dirpath, name)
                    st = os.lstat(p)
                    if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                        os.chmod(p, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            meta = self.path(info.name) / "meta.json"
            tmp = meta.with_name(f".meta-{os.getpid()}.json")
            tmp.write_text(json.dumps({**info.__dict__, "setuid_cleared": True}))
            os.replace(tmp, meta)
            done.append(info.name)
        return done

    def cleanup_partial(self) -> list[str]:
        """Remove build directories left by an interrupted build."""
        removed = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith((".build-", ".old-")):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
        return removed


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _build_busybox(rootfs: Path, progress: Progress) -> None:
    bb = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(bb) or "statically linked" not in _file_kind(bb):
        raise RuntimeUnavailableError("the busybox template needs a static busybox",
                                      hint="apt-get install busybox-static")
    progress("installing busybox")
    (rootfs / "bin").mkdir()
    shutil.copy2(bb, rootfs / "bin" / "busybox")
    out = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in out:
        if applet != "busybox":
            os.symlink("busybox", rootfs / "bin" / applet)
    for d in ("etc", "root", "tmp", "var/tmp", "usr/bin", "dev", "proc", "sys"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "var" / "tmp", 0o1777)


def _file_kind(path: str) -> str:
    try:
        return subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
    except FileNotFoundError:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        return "statically linked" if b"ld-linux" not in head and head.startswith(b"\x7fELF") else ""


def debian_mirror() -> str:
    env = os.environ.get("CORRAL_DEBIAN_MIRROR")
    if env:
        return env
    for src in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = src.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(https?://\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def _build_debian(rootfs: Path, progress: Progress) -> None:
    if not shutil.which("debootstrap"):
        raise RuntimeUnavailableError("building the base template needs debootstrap",
                                      hint="apt-get install debootstrap")
    mirror = debian_mirror()
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, str(rootfs), mirror]
    progress(f"debootstrap {BASE_SUITE} from {mirror} (about a minute)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith(("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")):
            if not line.endswith("..."):
                progress(line[3:])
        elif line.startswith(("I: ", "W: ", "E: ")):
            progress(line[3:])
    if proc.wait() != 0:
        raise RuntimeUnavailableError("debootstrap failed: " + " | ".join(tail[-5:]),
                                      hint="check that the Debian mirror is reachable (CORRAL_DEBIAN_MIRROR)")
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)


def _finish_rootfs(rootfs: Path) -> None:
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hostname").write_text(defaults.HOSTNAME + "\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost {defaults.HOSTNAME}\n::1\tlocalhost ip6-localhost\n")
    for d in ("workspace", ".corral/rt", ".corral/agent", "proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)


def shift_ownership(root: Path, base: int) -> tuple[int, int]:
    """Map the layer's owners into the sandbox's uid range (root inside = ``base`` outside)."""
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            if not name and dirpath != str(root):
                continue
            st = os.lstat(p)
            # No setuid/setgid file in a layer: inside a sandbox no_new_privs makes the bits inert,
            # but the layer lies on the host's own file system, where a local user could run it and
            # become the sandboxes' uid (which owns every layer). chown clears them on Linux; say it.
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            if st.st_uid >= base:
                continue
            os.lchown(p, st.st_uid + base, st.st_gid + base)
            files += 1
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return files, size


# ---- the agent's runtime ------------------------------------------------------------------------
def agent_runtime_dir(data_dir: Path) -> Path:
    return data_dir / "agent-runtime" / f"py{sys.version_info[0]}{sys.version_info[1]}-v{AGENT_RUNTIME_VERSION}"


def ensure_agent_runtime(data_dir: Path) -> Path:
    """A self-contained copy of this Python (binary, loader, libraries, trimmed stdlib).

    Bound read-only into every sandbox so the agent runs in images without Python or with another
    libc. Built once per Python version.
    """
    dest = agent_runtime_dir(data_dir)
    if (dest / "ok").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    (tmp / "lib").mkdir()
    exe = os.path.realpath(sys.executable)
    shutil.copy2(exe, tmp / "bin" / "python3")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    dst_std = tmp / "lib" / ver
    sos: list[str] = [exe]

    def ignore(d: str, names: list[str]) -> set[str]:
        skip = set()
        for n in names:
            full = os.path.join(d, n)
            if n in _PY_EXCLUDE_DIRS or n.startswith("config-"):
                skip.add(n)
            elif d.endswith("__pycache__") and ".opt-" in n:
                skip.add(n)
            elif d.endswith("lib-dynload"):
                if _DYNLOAD_EXCLUDE.match(n):
                    skip.add(n)
                else:
                    sos.append(full)
        return skip

    shutil.copytree(stdlib, dst_std, ignore=ignore, symlinks=False)
    libs: dict[str, str] = {}
    for so in sos:
        out = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line) or re.match(r"\s*(/\S+ld-linux\S*)\s", line)
            if m:
                name, path = (m.group(1), m.group(2)) if m.lastindex == 2 else (os.path.basename(m.group(1)), m.group(1))
                libs[os.path.basename(name)] = path
    if "ld-linux-x86-64.so.2" not in libs:
        libs["ld-linux-x86-64.so.2"] = "/lib64/ld-linux-x86-64.so.2"
    for name, path in libs.items():
        shutil.copy2(os.path.realpath(path), tmp / "lib" / name)
    for dirpath, _dirs, files in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for f in files:
            p = os.path.join(dirpath, f)
            os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
    (tmp / "ok").write_text(exe + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def install_agent_source(data_dir: Path, src: Path) -> Path:
    """Copy the agent's files under the data dir, content-addressed.

    Sandboxes bind this copy, never the checkout: the checkout may sit below a directory that the
    sandbox's uid cannot traverse (/root), and its path would show in the sandbox's mountinfo.
    """
    import hashlib

    files = sorted(p for p in src.glob("*.py") if p.name != "__init__.py")
    digest = hashlib.sha256(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)).hexdigest()[:16]
    dest = data_dir / "agent" / digest
    if not (dest / "ok").exists():
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in files:
            shutil.copyfile(p, tmp / p.name)
            os.chmod(tmp / p.name, 0o644)
        (tmp / "ok").write_text("")
        os.chmod(tmp, 0o755)
        os.chmod(dest.parent, 0o755)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


_TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def validate_template_name(name: str) -> str:
    if not _TEMPLATE_NAME.fullmatch(name):
        raise InvalidRequestError(f"invalid template name {name!r}")
    return name


@dataclass(frozen=True)
class RootPath:
    """Where a path leads inside a tree: ``path`` (absolute, no link in it) and what is there:
    ``file`` (a regular file), ``dir``, ``missing`` (the last names do not exist) or ``other``."""

    path: str
    kind: str


_O_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def resolve_in_root(root: str, path: str, *, max_links: int = 40, max_steps: int = 4096) -> RootPath | None:
    """Where ``path`` leads inside the tree at ``root``, symlinks followed as a process chrooted
    there would follow them (absolute targets start again at ``root``, ``..`` stops at it). None
    where that process would get an error (a link loop, a name below a non-directory, ``..`` after
    a missing name), for a tree that takes more than ``max_steps`` names to walk, or for a path
    that is not printable ASCII. A dangling link's target is returned as ``missing``.

    The walk holds a descriptor of each directory and looks at one name at a time relative to it
    (``O_NOFOLLOW``): the kernel never follows a link of the tree against the host's own root,
    whatever the tree (an untrusted image) says, and the cost of a step does not grow with depth.
    """
    todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    names: list[str] = []
    fds = [os.open(root, _O_DIR)]
    links = steps = 0
    try:
        while todo:
            steps += 1
            if steps > max_steps:
                return None
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if names:
                    names.pop()
                    os.close(fds.pop())
                continue
            try:
                st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            except FileNotFoundError:
                rest = [n for n in reversed(todo) if n not in ("", ".")]
                if ".." in rest:  # a chrooted process gets ENOENT here: nothing to say where it leads
                    return None
                return _root_path([*names, name, *rest], "missing")
            except OSError:
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > max_links:
                    return None
                try:
                    target = os.readlink(name, dir_fd=fds[-1])
                except OSError:
                    return None
                if target.startswith("/"):
                    while len(fds) > 1:
                        os.close(fds.pop())
                    names = []
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    fds.append(os.open(name, _O_DIR, dir_fd=fds[-1]))
                except OSError:
                    return None
                names.append(name)
                continue
            if any(n not in ("", ".") for n in todo):
                return None  # a name below a file
            names.append(name)
            return _root_path(names, "file" if stat.S_ISREG(st.st_mode) else "other")
        return _root_path(names, "dir")
    finally:
        for fd in fds:
            os.close(fd)


def _root_path(names: list[str], kind: str) -> RootPath | None:
    path = "/" + "/".join(names)
    if not (path.isascii() and path.isprintable()):
        return None
    return RootPath(path, kind)


def read_in_root(root: str, path: str, limit: int) -> bytes | None:
    """The first ``limit`` bytes of the regular file ``path`` leads to inside ``root`` (links
    followed within the root only); None if it leads to anything else. Opened one name at a time
    with ``O_NOFOLLOW``, so a link swapped in after the walk makes the read fail, not escape."""
    found = resolve_in_root(root, path)
    if found is None or found.kind != "file":
        return None
    parts = found.path.strip("/").split("/")
    fds = [os.open(root, _O_DIR)]
    try:
        for name in parts[:-1]:
            fds.append(os.open(name, _O_DIR, dir_fd=fds[-1]))
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fds[-1])
        fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        out = bytearray()
        while len(out) < limit and (chunk := os.read(fd, min(1 << 20, limit - len(out)))):
            out += chunk
        return bytes(out)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)

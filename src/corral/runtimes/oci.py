"""OCI container runtime: bundles run by crun (runc as a fallback), rootfs on overlayfs.

Layout per sandbox under ``<data_dir>/sandboxes/<id>/``:
  disk.img        the sandbox's size-limited disk (sparse ext4), mounted at disk/ while it runs:
    disk/upper/, disk/work/   its own overlay layer (kept across stop/start)
    disk/workspace/           host mode only: the writable workspace
  rootfs/         the merged overlay while running (template mode) or a tmpfs of read-only binds
  run/            host-only (0700): agent.sock, crun.log; never mounted into the sandbox
  bundle/         config.json
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import resource
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from corral.errors import RuntimeUnavailableError
from corral.policy import defaults
from corral.policy.compile import AGENT_DIR, CA_STORES, WORKSPACE, SandboxPaths, compile_oci
from corral.policy.spec import SandboxPolicy
from corral.runtimes.images import resolve_in_root
from corral.runtimes.probe import criu_binary
from corral.storage import disk

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
log = logging.getLogger("corral.runtime")
CGROUP_DRAIN_S = 5.0  # how long stop waits for killed tasks to leave the sandbox's cgroups
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer", "blkio", "cpuset", "devices",
                      "net_cls", "net_prio", "systemd", "unified")


def _mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {dst}: {os.strerror(e)}")


def _umount(path: str) -> bool:
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(e, f"umount {path}: {os.strerror(e)}")
    return True


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def enter_private_mount_namespace() -> bool:
    """Give the daemon its own mount namespace and hide the cgroup2 mount of a hybrid layout.

    crun 1.8 refuses hybrid cgroups ("cgroups in hybrid mode not supported"); in a private mount
    namespace without /sys/fs/cgroup/unified it sees a plain v1 layout. Sandbox mounts made by the
    daemon live in this namespace too, so they vanish with the daemon instead of leaking on the host.
    Must run before the daemon starts any thread. Returns whether the cgroup2 mount was hidden.
    """
    if _libc.unshare(CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        raise RuntimeUnavailableError(f"cannot create a mount namespace: {os.strerror(e)}",
                                      hint="corral up must run as root")
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    # crun applies the sandbox's rlimits from its own process and can only lower them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if is_mountpoint("/sys/fs/cgroup/unified"):
        _umount("/sys/fs/cgroup/unified")
        # crun still writes a cgroup.procs file under unified/<path>; give it a private tmpfs, so
        # nothing lands in the host's /sys/fs/cgroup tmpfs (it vanishes with this namespace).
        _mount("corral-unified", "/sys/fs/cgroup/unified", "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")
        return True
    return False


def find_oci_runtime() -> str | None:
    for name in ("crun", "runc"):
        p = shutil.which(name)
        if p:
            return p
    return None


@dataclass
class RunningInfo:
    sandbox_id: str
    status: str  # running | stopped | paused | created
    pid: int | None


# Files of the root that a networked sandbox sees replaced: the resolver (Corral's DNS on the
# gateway) and the system CA store (its roots + Corral's CA).
NET_FILES = (("/etc/resolv.conf", "resolv.conf"), *((store, "ca.pem") for store in CA_STORES))


# Never a place for a network file, whatever an image's links say: kernel and device file systems,
# Corral's own mounts (the agent, its runtime, socket and network dir).
_NET_FILES_NEVER = ("/proc", "/sys", "/dev", AGENT_DIR)


def _net_files(rootfs: str, net_dir: Path, host_root: bool, avoid: tuple[str, ...] = ()
               ) -> tuple[tuple[str, str], ...]:
    """Where the sandbox's resolv.conf and CA bundle are bound: at the file each well-known path
    leads to inside the root (links followed within the root, as the sandbox's libc would).
    ``avoid``: mount destinations this view of the root does not show (volumes, the workspace,
    masked dirs); nothing is bound at or below them."""
    out = []
    seen = set()
    never = (*_NET_FILES_NEVER, *avoid)
    for dest, name in NET_FILES:
        found = resolve_in_root(rootfs, dest)
        if found is None or found.path in seen or \
                any(found.path == d or found.path.startswith(d.rstrip("/") + "/") for d in never):
            continue
        # A missing resolv.conf is created as the mountpoint: in the sandbox's own layer (busybox has
        # none; an image's stub link into /run), or in the fresh /run or /tmp of host mode
        # (systemd-resolved's stub link points there); without it libc would ask 127.0.0.1, which
        # has no resolver in the sandbox. A missing CA store is not invented.
        creatable = found.kind == "missing" and dest == "/etc/resolv.conf" and \
            found.path.startswith(("/run/", "/tmp/") if host_root else ("/etc/", "/run/", "/tmp/"))
        if found.kind == "file" or creatable:
            seen.add(found.path)
            out.append((found.path, str(net_dir / name)))
    return tuple(out)


class OciRuntime:
    def __init__(self, data_dir: Path, state_dir: Path, agent_src: Path, agent_runtime: Path, binary: str | None = None):
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.agent_src = agent_src
        self.agent_runtime = agent_runtime
        self.binary = binary or find_oci_runtime() or ""
        self.sandboxes = data_dir / "sandboxes"
        # Hibernatable sandboxes run on runc, which can drive CRIU (crun 1.8 is built without it).
        self.runc = shutil.which("runc")
        self.criu = criu_binary()[0]

    # ---- paths -------------------------------------------------------------------------------
    def dir(self, sandbox_id: str) -> Path:
        return self.sandboxes / sandbox_id

    def hibernatable(self, sandbox_id: str) -> bool:
        return (self.dir(sandbox_id) / "run" / "engine").exists()

    def socket_path(self, sandbox_id: str) -> str:
        if self.hibernatable(sandbox_id):
            return str(self.dir(sandbox_id) / "sock" / "agent.sock")
        return str(self.dir(sandbox_id) / "run" / "agent.sock")

    def _engine(self, sandbox_id: str | None) -> tuple[str, Path]:
        if sandbox_id is not None and self.hibernatable(sandbox_id) and self.runc:
            return self.runc, self.state_dir.parent / "runc"
        return self.binary, self.state_dir

    def _cmd(self, *args: str, sandbox_id: str | None = None) -> list[str]:
        binary, root = self._engine(sandbox_id)
        return [binary, "--root", str(root), *args]

    # ---- lifecycle ---------------------------------------------------------------------------
    def prepare(self, sandbox_id: str, policy: SandboxPolicy) -> None:
        d = self.dir(sandbox_id)
        for sub in ("rootfs", "run", "bundle", "disk"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)
        os.chmod(d / "run", 0o700)
        if not (d / "disk.img").exists():
            disk.create(d / "disk.img", policy.resources.disk_mib, defaults.UID_BASE, self.data_dir / "disk-blanks")

    def upper_dir(self, sandbox_id: str) -> Path:
        return self.dir(sandbox_id) / "disk" / "upper"

    def mount_disk(self, sandbox_id: str) -> Path:
        d = self.dir(sandbox_id)
        disk.mount(d / "disk.img", d / "disk")
        for sub, mode in (("upper", 0o755), ("work", 0o700), ("workspace", 0o755)):
            p = d / "disk" / sub
            if not p.exists():
                p.mkdir(mode=mode)
                if sub != "work":
                    os.chown(p, defaults.UID_BASE, defaults.UID_BASE)
        return d / "disk"

    def unmount_disk(self, sandbox_id: str) -> None:
        disk.unmount(self.dir(sandbox_id) / "disk")

    def _mount_rootfs(self, sandbox_id: str, policy: SandboxPolicy, lowerdirs: list[str]) -> str:
        d = self.dir(sandbox_id)
        rootfs = str(d / "rootfs")
        if is_mountpoint(rootfs):
            _umount(rootfs)
        mnt = self.mount_disk(sandbox_id)
        if policy.root == "host":
            self._host_rootfs(rootfs)
        else:
            # No redirect_dir/metacopy: the upper layer then holds whole files and plain directories, which
            # is what snapshots copy.
            opts = (f"lowerdir={':'.join(lowerdirs)},upperdir={mnt / 'upper'},workdir={mnt / 'work'},"
                    "redirect_dir=off,metacopy=off")
            _mount("overlay", rootfs, "overlay", MS_NOSUID | MS_NODEV, opts)
        return rootfs

    @staticmethod
    def _host_rootfs(rootfs: str) -> None:
        """A tmpfs root holding read-only binds of the host's top-level directories.

        Nothing is created on the host: mountpoints for /proc, /workspace, /.corral... live in the tmpfs.
        """
        _mount("tmpfs", rootfs, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        fresh = {"proc", "sys", "dev", "run", "tmp", "workspace", ".corral", "lost+found"}
        for ent in os.scandir("/"):
            dst = os.path.join(rootfs, ent.name)
            if ent.name in fresh:
                continue
            if ent.is_symlink():
                os.symlink(os.readlink(ent.path), dst)
            elif ent.is_dir(follow_symlinks=False):
                os.mkdir(dst)
                _mount(ent.path, dst, None, MS_BIND, None)
                _mount("none", dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        for d in ("proc", "sys", "dev", "run", "tmp", "workspace", ".corral/rt", ".corral/agent", ".corral/net"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)

    # ---- volumes -----------------------------------------------------------------------------
    def volume_dir(self, name: str) -> Path:
        return self.data_dir / "volumes" / name

    def create_volume(self, name: str, size_mib: int) -> None:
        d = self.volume_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)
        disk.create(d / "volume.img", size_mib, defaults.UID_BASE)

    def mount_volume(self, name: str) -> Path:
        d = self.volume_dir(name)
        disk.mount(d / "volume.img", d / "mnt")
        return d / "mnt"

    def remove_volume(self, name: str) -> None:
        disk.unmount(self.volume_dir(name) / "mnt")
        shutil.rmtree(self.volume_dir(name), ignore_errors=True)

    def volume_usage(self, name: str) -> disk.Usage | None:
        mnt = self.volume_dir(name) / "mnt"
        return disk.usage(mnt) if disk.is_mounted(mnt) else None

    async def start(self, sandbox_id: str, policy: SandboxPolicy, lowerdirs: list[str],
                    net_dir: Path | None = None, net_env: dict[str, str] | None = None) -> None:
        """Boot the sandbox; ``lowerdirs`` are its read-only layers, topmost first. A networked
        sandbox brings ``net_dir`` (ca.pem, resolv.conf) and its proxy/CA variables."""
        if not self.binary:
            raise RuntimeUnavailableError("no OCI runtime (crun or runc) is installed", hint="apt-get install crun")
        d = self.dir(sandbox_id)
        if policy.hibernatable:
            if not (self.runc and self.criu):
                raise RuntimeUnavailableError("this sandbox is hibernatable, which needs runc and CRIU 4.x",
                                              hint="run scripts/build-criu.sh; `corral doctor` shows hibernation")
            (d / "run" / "engine").write_text("runc\n")
            (d / "sock").mkdir(exist_ok=True)
            os.chown(d / "sock", defaults.UID_BASE, defaults.UID_BASE)
            os.chmod(d / "sock", 0o700)
        else:
            (d / "run" / "engine").unlink(missing_ok=True)
        rootfs = self._mount_rootfs(sandbox_id, policy, lowerdirs)
        masked = (str(self.data_dir), str(self.state_dir)) if policy.root == "host" else ()
        net_files: tuple[tuple[str, str], ...] = ()
        if net_dir:  # walks the image's links: off the event loop
            avoid = (*policy.volumes, *masked, *((WORKSPACE,) if policy.root == "host" else ()))
            net_files = await asyncio.to_thread(_net_files, rootfs, net_dir, policy.root == "host", avoid)
        paths = SandboxPaths(
            rootfs=rootfs, agent_src=str(self.agent_src),
            agent_runtime=str(self.agent_runtime),
            workspace=str(d / "disk" / "workspace") if policy.root == "host" else None,
            masked_dirs=masked,
            volumes=tuple((dest, str(self.mount_volume(v.name)), v.read_only) for dest, v in policy.volumes.items()),
            agent_sock_dir=str(d / "sock") if policy.hibernatable else None,
            net_dir=str(net_dir) if net_dir else None,
            net_files=net_files,
            net_env=tuple(sorted((net_env or {}).items())),
        )
        nofile = min(defaults.NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        plan = compile_oci(sandbox_id, policy, paths, nofile=nofile)
        (d / "bundle" / "config.json").write_text(json.dumps(plan.config))
        if policy.hibernatable:
            await self._spawn(sandbox_id, "run", "-d", "--pid-file", str(d / "run" / "pid"), "-b", str(d / "bundle"),
                              sandbox_id)
            return
        sock_path = self.socket_path(sandbox_id)
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        # The daemon owns the listening socket; the agent inherits it as fd 3. The path stays on
        # the host side, so nothing in the sandbox can connect to it (or reach the daemon).
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(sock_path)
            os.chmod(sock_path, 0o600)
            listener.listen(128)
            log = os.open(d / "run" / "crun.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                pid = os.posix_spawn(
                    self.binary,
                    self._cmd("run", "-d", "--preserve-fds", "1", "--pid-file", str(d / "run" / "pid"),
                              "-b", str(d / "bundle"), sandbox_id),
                    {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                    file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                  (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2),
                                  (os.POSIX_SPAWN_DUP2, listener.fileno(), 3)],
                )
            finally:
                os.close(log)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        finally:
            listener.close()
        if os.waitstatus_to_exitcode(status) != 0:
            tail = (d / "run" / "crun.log").read_text(errors="replace").strip().splitlines()[-3:]
            await self.stop(sandbox_id)
            raise RuntimeUnavailableError(f"the OCI runtime could not start sandbox {sandbox_id}: {' | '.join(tail)}")

    async def _spawn(self, sandbox_id: str, *args: str, restoring: bool = False) -> None:
        """Run the engine with the sandbox's stdio on /dev/null (CRIU cannot carry host files), errors to a log."""
        d = self.dir(sandbox_id)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "CRIU_CONFIG_FILE": str(self.criu_config(restoring))}
        proc = await asyncio.create_subprocess_exec(
            *self._cmd("--criu", self.criu or "criu", *args, sandbox_id=sandbox_id), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env, cwd=str(d / "bundle"))
        _, err = await proc.communicate()
        if proc.returncode != 0:
            (d / "run" / "crun.log").write_bytes(err)
            tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
            raise RuntimeUnavailableError(f"runc {args[0]} failed for sandbox {sandbox_id}: {tail}")

    CRIU_CONFIG = ("# written by corrald\n"
                   "# iptables is not installed here; nftables locks the network while CRIU dumps.\n"
                   "network-lock nftables\n"
                   "# A networked sandbox's veth is removed before the dump: its TCP connections cannot be\n"
                   "# restored, so they are dumped (and restored) closed instead of failing the dump.\n"
                   "tcp-close\n")

    # Restored tasks stay stopped until the daemon has armed the exec guard and wired the network
    # again (continue_restored): nothing a sandbox restores runs before its policy is back in force.
    CRIU_RESTORE_CONFIG = CRIU_CONFIG + "# restore only: tasks stay stopped until the daemon continues them\nleave-stopped\n"

    def criu_config(self, restoring: bool = False) -> Path:
        p = self.data_dir / ("criu-restore.conf" if restoring else "criu.conf")
        text = self.CRIU_RESTORE_CONFIG if restoring else self.CRIU_CONFIG
        try:
            current = p.read_text()
        except OSError:
            current = ""
        if current != text:
            p.write_text(text)
        return p

    def checkpoint_dir(self, sandbox_id: str) -> Path:
        return self.dir(sandbox_id) / "checkpoint"

    async def checkpoint(self, sandbox_id: str) -> None:
        """Hibernate: dump every process to disk with CRIU (the container is gone afterwards)."""
        ck = self.checkpoint_dir(sandbox_id)
        shutil.rmtree(ck, ignore_errors=True)
        ck.mkdir(mode=0o700)
        (ck / "img").mkdir(mode=0o711)  # CRIU restores as the sandbox's uid and must reach the images
        (ck / "work").mkdir(mode=0o700)
        await self._spawn(sandbox_id, "checkpoint", "--image-path", str(ck / "img"), "--work-path", str(ck / "work"),
                          sandbox_id)
        self.remove_cgroups(sandbox_id)
        rootfs = str(self.dir(sandbox_id) / "rootfs")
        if is_mountpoint(rootfs):
            _umount(rootfs)
        disk.unmount(self.dir(sandbox_id) / "disk")

    async def restore(self, sandbox_id: str, policy: SandboxPolicy, lowerdirs: list[str]) -> None:
        d = self.dir(sandbox_id)
        ck = self.checkpoint_dir(sandbox_id)
        self._mount_rootfs(sandbox_id, policy, lowerdirs)
        for v in policy.volumes.values():
            self.mount_volume(v.name)
        (ck / "restore-work").mkdir(mode=0o700, exist_ok=True)
        await self._spawn(sandbox_id, "restore", "-d", "--image-path", str(ck / "img"), "--work-path",
                          str(ck / "restore-work"), "--pid-file", str(d / "run" / "pid"), "-b", str(d / "bundle"),
                          sandbox_id, restoring=True)
        shutil.rmtree(ck, ignore_errors=True)
        # The restored network namespace comes back with loopback down; bring it up from outside (the
        # sandbox itself has no CAP_NET_ADMIN).
        pid = self.read_pid(sandbox_id)
        if pid:
            proc = await asyncio.create_subprocess_exec("nsenter", "-t", str(pid), "-n", "ip", "link", "set", "lo", "up",
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            await proc.wait()

    async def continue_restored(self, sandbox_id: str) -> None:
        """Let the tasks of a restored sandbox run (CRIU left them stopped: see CRIU_RESTORE_CONFIG)."""
        rc, out = await self._run("kill", "--all", sandbox_id, "CONT", sandbox_id=sandbox_id)
        if rc != 0:
            raise RuntimeUnavailableError(f"could not continue restored sandbox {sandbox_id}: {out.strip()[-300:]}")

    async def _run(self, *args: str, sandbox_id: str | None = None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(*self._cmd(*args, sandbox_id=sandbox_id),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace")

    def _freezer(self, sandbox_id: str) -> Path | None:
        p = Path("/sys/fs/cgroup/freezer/corral") / sandbox_id / "freezer.state"
        return p if p.exists() else None

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process (cgroup freezer): memory kept, no CPU."""
        state = self._freezer(sandbox_id)
        if state is not None:  # the v1 freezer directly: what `crun pause` does, without a process
            state.write_text("FROZEN")
            for _ in range(2000):
                if state.read_text().strip() == "FROZEN":
                    return
                await asyncio.sleep(0.001)
        rc, out = await self._run("pause", sandbox_id, sandbox_id=sandbox_id)
        if rc != 0:
            raise RuntimeUnavailableError(f"could not pause sandbox {sandbox_id}: {out.strip()[-300:]}")
        # Callers rely on it (snapshots and backups walk the sandbox's layer while it is paused: a
        # process still running could swap a directory it listed for a link): frozen, or an error.
        if state is not None and state.read_text().strip() != "FROZEN":
            state.write_text("THAWED")
            raise RuntimeUnavailableError(f"could not pause sandbox {sandbox_id}: its tasks did not freeze",
                                          hint="a task in uninterruptible sleep holds the freezer; try again")

    async def resume(self, sandbox_id: str) -> None:
        state = self._freezer(sandbox_id)
        if state is not None:
            state.write_text("THAWED")
            return
        rc, out = await self._run("resume", sandbox_id, sandbox_id=sandbox_id)
        if rc != 0:
            raise RuntimeUnavailableError(f"could not resume sandbox {sandbox_id}: {out.strip()[-300:]}")

    def cpu_usage_ns(self, sandbox_id: str) -> int:
        try:
            return int((Path("/sys/fs/cgroup/cpuacct/corral") / sandbox_id / "cpuacct.usage").read_text())
        except (OSError, ValueError):
            return 0

    async def stop(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox and release its runtime state; keep its files."""
        sid = sandbox_id
        await self._run("resume", sid, sandbox_id=sid)  # frozen tasks do not die until thawed
        await self._run("kill", "--all", sid, "KILL", sandbox_id=sid)
        rc, out = await self._run("delete", "--force", sid, sandbox_id=sid)
        if rc != 0 and "does not exist" not in out and "not exist" not in out:
            # The cgroup may still hold exiting processes for a moment.
            await asyncio.sleep(0.05)
            await self._run("delete", "--force", sid, sandbox_id=sid)
        shutil.rmtree(self.checkpoint_dir(sid), ignore_errors=True)
        # SIGKILLed tasks take a moment to exit (a fork bomb's 64 take several): a cgroup cannot be
        # removed while it holds one, and stop must not return with the sandbox's cgroups left behind.
        started = time.monotonic()
        killed_again = False
        while self.cgroup_has_tasks(sandbox_id) and time.monotonic() - started < CGROUP_DRAIN_S:
            if not killed_again and time.monotonic() - started > 1:
                # Still there after a second (thawed late, or forked before the first kill landed).
                killed_again = True
                await self._run("kill", "--all", sid, "KILL", sandbox_id=sid)
            await asyncio.sleep(0.01)
        self.remove_cgroups(sandbox_id)
        if self.cgroup_dirs(sandbox_id):
            log.warning("sandbox %s: cgroups still hold tasks after stop; the next daemon start removes them",
                        sandbox_id)
        rootfs = str(self.dir(sandbox_id) / "rootfs")
        if is_mountpoint(rootfs):
            _umount(rootfs)
        disk.unmount(self.dir(sandbox_id) / "disk")
        try:
            os.unlink(self.socket_path(sandbox_id))
        except FileNotFoundError:
            pass

    async def destroy(self, sandbox_id: str) -> None:
        await self.stop(sandbox_id)
        shutil.rmtree(self.dir(sandbox_id), ignore_errors=True)

    async def list_containers(self) -> list[RunningInfo]:
        out_all: list[RunningInfo] = []
        engines = [(self.binary, self.state_dir)] + ([(self.runc, self.state_dir.parent / "runc")] if self.runc else [])
        for binary, root in engines:
            proc = await asyncio.create_subprocess_exec(binary, "--root", str(root), "list", "--format", "json",
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
            try:
                data = json.loads(out or b"[]") or []
            except ValueError:
                continue
            out_all += [RunningInfo(c["id"], c.get("status", ""), c.get("pid")) for c in data]
        return out_all

    def read_pid(self, sandbox_id: str) -> int | None:
        try:
            return int((self.dir(sandbox_id) / "run" / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def agent_log_tail(self, sandbox_id: str) -> str:
        try:
            lines = (self.dir(sandbox_id) / "run" / "crun.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])

    # ---- cgroups -----------------------------------------------------------------------------
    def cgroup_dirs(self, sandbox_id: str) -> list[Path]:
        return [p for c in CGROUP_CONTROLLERS if (p := Path("/sys/fs/cgroup") / c / "corral" / sandbox_id).is_dir()]

    def cgroup_ids(self) -> set[str]:
        out: set[str] = set()
        for c in CGROUP_CONTROLLERS:
            base = Path("/sys/fs/cgroup") / c / "corral"
            if base.is_dir():
                out.update(p.name for p in base.iterdir() if p.is_dir())
        return out

    def cgroup_has_tasks(self, sandbox_id: str) -> bool:
        for p in self.cgroup_dirs(sandbox_id):
            if p.parts[-3] == "unified":  # a plain file crun wrote in the tmpfs stand-in: no tasks there
                continue
            try:
                if (p / "cgroup.procs").read_text().strip():
                    return True
            except OSError:
                pass
        return False

    def remove_cgroups(self, sandbox_id: str) -> None:
        for p in self.cgroup_dirs(sandbox_id):
            if p.parts[-3] == "unified":  # the daemon's private tmpfs stand-in, see above
                shutil.rmtree(p, ignore_errors=True)
                continue
            for child in sorted(p.rglob("*"), key=lambda x: -len(x.parts)):
                if child.is_dir():
                    try:
                        child.rmdir()
                    except OSError:
                        pass
            try:
                p.rmdir()
            except OSError:
                pass

    def memory_events(self, sandbox_id: str) -> dict[str, int]:
        p = Path("/sys/fs/cgroup/memory/corral") / sandbox_id / "memory.oom_control"
        try:
            return {k: int(v) for k, v in (ln.split() for ln in p.read_text().splitlines())}
        except (OSError, ValueError):
            return {}

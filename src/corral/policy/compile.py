"""Compile a SandboxPolicy into an OCI runtime plan (the bundle's config.json). Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.errors import PolicyRejectedError
from corral.policy import defaults
from corral.policy.spec import SandboxPolicy

AGENT_DIR = "/.corral"  # where the agent, its runtime and its socket live inside every sandbox
WORKSPACE = "/workspace"
NET_DIR = f"{AGENT_DIR}/net"  # networked sandboxes: ca.pem (system roots + Corral's CA) and resolv.conf
# The system CA stores of the usual distributions (Debian/Ubuntu/Alpine, Fedora/RHEL, Alpine/macOS
# style): a networked sandbox's roots are read from the first one its root has, and its ca.pem is
# bound over each one there.
CA_STORES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


@dataclass(frozen=True)
class SandboxPaths:
    """Host-side paths the plan refers to; the runtime creates them."""

    rootfs: str  # the merged overlay (template mode) or read-only bind of / (host mode)
    agent_src: str  # the agent's source, bound read-only at /.corral/agent
    agent_runtime: str  # a self-contained Python for the agent, bound read-only at /.corral/rt
    workspace: str | None  # host mode only: bound read-write at /workspace
    volumes: tuple[tuple[str, str, bool], ...] = ()  # (destination, host source, read_only)
    agent_sock_dir: str | None = None  # hibernatable sandboxes: the agent's own socket dir, at /.corral/sock
    masked_dirs: tuple[str, ...] = ()  # host mode only: host dirs hidden behind an empty tmpfs
    # networked sandboxes: files bound read-only over existing files of the root (resolv.conf, the CA
    # bundle over the system store), the sandbox's network dir at /.corral/net, and its variables
    net_files: tuple[tuple[str, str], ...] = ()  # (destination, host source)
    net_dir: str | None = None
    net_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class OciPlan:
    config: dict[str, Any]
    cgroup_path: str


def agent_argv() -> list[str]:
    rt = f"{AGENT_DIR}/rt"
    # The agent runs on Corral's own Python, loaded by its own dynamic loader, so it works in images
    # with no Python or another libc (busybox, alpine).
    return [f"{rt}/lib/ld-linux-x86-64.so.2", "--library-path", f"{rt}/lib",
            f"{rt}/bin/python3", "-S", "-s", "-B", "-u", f"{AGENT_DIR}/agent/agent.py"]


def seccomp_profile() -> dict[str, Any]:
    syscalls: list[dict[str, Any]] = []
    for errno in sorted({e for _, e, _ in defaults.DENIED_SYSCALLS}):
        names = [n for n, e, _ in defaults.DENIED_SYSCALLS if e == errno]
        syscalls.append({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno})
    for req, _reason in defaults.DENIED_IOCTLS:
        # The kernel reads ioctl's cmd as 32 bits: compare only those, or TIOCSTI | 1<<32 gets past
        # the rule and still works (CVE-2019-10063).
        syscalls.append({"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": defaults.EPERM,
                         "args": [{"index": 1, "value": 0xFFFFFFFF, "valueTwo": req, "op": "SCMP_CMP_MASKED_EQ"}]})
    # One rule per namespace flag: MASKED_EQ(flag, flag) matches when that bit is set.
    flag = 1
    while flag <= defaults.CLONE_NAMESPACE_FLAGS:
        if defaults.CLONE_NAMESPACE_FLAGS & flag:
            syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": defaults.EPERM,
                             "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
        flag <<= 1
    allowed = set(defaults.ALLOWED_SOCKET_FAMILIES)
    for family in range(0, 46):
        if family not in allowed:
            syscalls.append({"names": ["socket", "socketpair"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": 97,  # EAFNOSUPPORT: what programs expect for a missing family
                             "args": [{"index": 0, "value": family, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]})
    syscalls.append({"names": ["socket", "socketpair"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
                     "args": [{"index": 0, "value": 46, "valueTwo": 0, "op": "SCMP_CMP_GE"}]})
    # SOCK_RAW / SOCK_PACKET (type & 0xf in {3, 10}) for inet families: no raw packets (E9).
    # Raw AF_NETLINK stays allowed: getifaddrs() and iproute2 need it, and it is netns-scoped.
    for family in (2, 10):  # AF_INET, AF_INET6
        for sock_type in (3, 10):
            syscalls.append({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": defaults.EPERM,
                             "args": [{"index": 0, "value": family, "valueTwo": 0, "op": "SCMP_CMP_EQ"},
                                      {"index": 1, "value": 0xF, "valueTwo": sock_type, "op": "SCMP_CMP_MASKED_EQ"}]})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        # Only the native ABI: i386 (int 0x80) and x32 syscalls are killed by libseccomp's
        # bad-arch action, so they cannot sidestep the rules above (C16).
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    }


def _bind(dst: str, src: str, *opts: str) -> dict[str, Any]:
    return {"destination": dst, "type": "bind", "source": src, "options": ["rbind", *opts]}


def require_consent(policy: SandboxPolicy) -> None:
    """Fail closed: a policy weaker than the default needs allow_weaker_isolation spelled out."""
    weak = policy.weakenings()
    if weak and not policy.allow_weaker_isolation:
        raise PolicyRejectedError(f"this sandbox would be weaker than the default ({'; '.join(weak)})",
                                  hint="pass allow_weaker_isolation=true to accept it, or drop the option")


def compile_oci(sandbox_id: str, policy: SandboxPolicy, paths: SandboxPaths,
                nofile: int = defaults.NOFILE) -> OciPlan:
    require_consent(policy)
    res = policy.resources
    quarter = max(1, res.memory_mib // defaults.TMPFS_FRACTION)
    shm_mib, tmp_mib, run_mib = min(defaults.SHM_MAX_MIB, quarter), min(defaults.TMP_MAX_MIB, quarter), min(16, quarter)
    env = {"PATH": defaults.PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "xterm"}
    env.update(policy.env)
    env.update(dict(paths.net_env))  # the proxy and CA trust of a networked sandbox are not the caller's to change
    # The agent's own variables win (it strips them from commands' environments).
    env.update({"PYTHONHOME": f"{AGENT_DIR}/rt", "PYTHONDONTWRITEBYTECODE": "1", "CORRAL_SANDBOX_ID": sandbox_id})
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "noexec", "strictatime", "mode=755", f"size={defaults.DEV_SIZE}"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_mib}m"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        _bind(f"{AGENT_DIR}/rt", paths.agent_runtime, "ro", "nosuid", "nodev"),
        _bind(f"{AGENT_DIR}/agent", paths.agent_src, "ro", "nosuid", "nodev", "noexec"),
    ]
    if paths.agent_sock_dir:
        mounts.append(_bind(f"{AGENT_DIR}/sock", paths.agent_sock_dir, "rw", "nosuid", "nodev", "noexec"))
        env["CORRAL_AGENT_LISTEN"] = f"{AGENT_DIR}/sock/agent.sock"
    if paths.net_dir:
        mounts.append(_bind(NET_DIR, paths.net_dir, "ro", "nosuid", "nodev", "noexec"))
    if policy.root == "host":
        mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777", f"size={tmp_mib}m"]})
        mounts.append({"destination": "/run", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=755", f"size={run_mib}m"]})
    # After host mode's fresh /run and /tmp (a resolv.conf that the host's /etc links into /run lands
    # in that tmpfs, not under it); before volumes, masked dirs and the workspace, which the runtime
    # never binds into (their places are excluded when the files are placed).
    for dest, source in paths.net_files:
        mounts.append(_bind(dest, source, "ro", "nosuid", "nodev", "noexec"))
    for dest, source, read_only in paths.volumes:
        mounts.append(_bind(dest, source, "ro" if read_only else "rw", "nosuid", "nodev"))
    if policy.root == "host":
        for d in paths.masked_dirs:
            mounts.append({"destination": d, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "noexec", "mode=755", "size=1m", "ro"]})
        if paths.workspace:
            mounts.append(_bind(WORKSPACE, paths.workspace, "rw", "nosuid", "nodev"))
    cgroup_path = f"corral/{sandbox_id}"
    resources: dict[str, Any] = {
        "memory": {"limit": res.memory_mib * 1024 * 1024, "swap": res.memory_mib * 1024 * 1024},
        "pids": {"limit": res.pids_max},
        "cpu": {"period": 100000, "quota": int(res.cpu_cores * 100000)},
    }
    caps = list(defaults.CAPABILITIES)
    config: dict[str, Any] = {
        "ociVersion": "1.0.0",
        "hostname": defaults.HOSTNAME,
        "root": {"path": paths.rootfs, "readonly": policy.root == "host"},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": agent_argv(),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "noNewPrivileges": True,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")} | {"inheritable": [], "ambient": []},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
                {"type": "RLIMIT_CORE", "hard": defaults.CORE_SIZE, "soft": defaults.CORE_SIZE},
            ],
            "oomScoreAdj": 500,  # the sandbox dies before the daemon when the host runs short
        },
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": defaults.UID_BASE, "size": defaults.UID_COUNT}],
            "gidMappings": [{"containerID": 0, "hostID": defaults.UID_BASE, "size": defaults.UID_COUNT}],
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user", "cgroup")],
            "cgroupsPath": cgroup_path,
            "resources": resources,
            "maskedPaths": list(defaults.MASKED_PATHS),
            "readonlyPaths": list(defaults.READONLY_PATHS),
            "seccomp": seccomp_profile(),
            "rootfsPropagation": "private",
        },
    }
    return OciPlan(config=config, cgroup_path=cgroup_path)

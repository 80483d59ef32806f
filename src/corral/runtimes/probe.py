"""Host feature probe behind `corral doctor`: what this host supports for isolation, and why not.

Tests use the same probe to decide what to require: a feature the probe finds must work.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Feature:
    name: str
    available: bool
    detail: str
    required: bool = False


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0] if out else ""


def cgroup_layout() -> str:
    mounts = _read("/proc/self/mounts").splitlines()
    fstypes = {line.split()[1]: line.split()[2] for line in mounts if len(line.split()) > 2}
    top = fstypes.get("/sys/fs/cgroup")
    if top == "cgroup2":
        return "v2"
    if any(t == "cgroup" for t in fstypes.values()):
        return "hybrid" if "/sys/fs/cgroup/unified" in fstypes else "v1"
    return "none"


def landlock_abi() -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
        return int(libc.syscall(444, None, 0, 1))
    except Exception:
        return -1


def probe() -> list[Feature]:
    f: list[Feature] = []
    root = os.geteuid() == 0
    f.append(Feature("root", root, "the daemon runs as root" if root else "corral up must run as root", True))
    crun, runc = shutil.which("crun"), shutil.which("runc")
    if crun:
        f.append(Feature("oci-runtime", True, f"crun: {_version(crun)}", True))
    elif runc:
        f.append(Feature("oci-runtime", True, f"runc (crun not found): {_version(runc)}", True))
    else:
        f.append(Feature("oci-runtime", False, "neither crun nor runc is installed (apt-get install crun)", True))
    maxns = _read("/proc/sys/user/max_user_namespaces").strip()
    userns = maxns not in ("", "0")
    f.append(Feature("user-namespaces", userns,
                     f"max_user_namespaces={maxns}" if userns else "user namespaces are disabled", True))
    overlay = "overlay" in _read("/proc/filesystems")
    f.append(Feature("overlayfs", overlay, "overlay in /proc/filesystems" if overlay else "overlay module missing", True))
    seccomp = "Seccomp:" in _read("/proc/self/status")
    f.append(Feature("seccomp", seccomp, "seccomp filters supported" if seccomp else "kernel without seccomp", True))
    layout = cgroup_layout()
    ctrls = {c for c in ("memory", "pids", "cpu") if Path(f"/sys/fs/cgroup/{c}").is_dir()} if layout != "v2" else \
        set(_read("/sys/fs/cgroup/cgroup.controllers").split())
    missing = {"memory", "pids", "cpu"} - ctrls
    detail = f"layout {layout}; controllers: {', '.join(sorted(ctrls)) or 'none'}"
    if layout == "hybrid":
        detail += "; crun 1.8 refuses hybrid layouts, so the daemon hides the cgroup2 mount in its own mount namespace"
    f.append(Feature("cgroups", not missing, detail + (f"; missing {', '.join(sorted(missing))}" if missing else ""), True))
    abi = landlock_abi()
    f.append(Feature("landlock", abi > 0, f"ABI {abi}" if abi > 0 else "not available (not yet used by Corral)"))
    deb = shutil.which("debootstrap")
    f.append(Feature("template-base", bool(deb), "debootstrap builds the base template" if deb
                     else "apt-get install debootstrap to build the base template"))
    bb = shutil.which("busybox")
    f.append(Feature("template-busybox", bool(bb), "busybox builds the busybox template" if bb
                     else "apt-get install busybox-static for the busybox template"))
    f.append(hibernation())
    f.append(exec_guard())
    f.append(egress_network())
    runsc = shutil.which("runsc")
    f.append(Feature("gvisor", bool(runsc), "runsc found (tier not yet wired)" if runsc else "runsc not installed"))
    kvm = os.path.exists("/dev/kvm")
    f.append(Feature("microvm", False, "/dev/kvm present but the microVM tier is not implemented yet" if kvm
                     else "no /dev/kvm: microVMs unavailable"))
    return f


CRIU_CANDIDATES = ("/opt/corral-criu/sbin/criu", "/usr/local/sbin/criu", "/usr/sbin/criu")


def criu_binary() -> tuple[str | None, str]:
    for path in CRIU_CANDIDATES:
        if os.path.exists(path):
            ver = _version(path)
            return path, ver
    return None, ""


def hibernation() -> Feature:
    path, ver = criu_binary()
    if path is None:
        return Feature("hibernation", False, "needs CRIU 4.x (bookworm's 3.17 fails on this kernel; "
                                             "scripts/build-criu.sh builds trixie's 4.1.1); not found")
    if not any(f"Version: {n}" in ver or f"criu {n}" in ver.lower() for n in ("4.", "5.")):
        return Feature("hibernation", False, f"{path} is not CRIU 4.x ({ver.strip() or 'no version'})")
    if not shutil.which("runc"):
        return Feature("hibernation", False, f"{path} found, but hibernatable sandboxes run on runc: apt-get install runc")
    return Feature("hibernation", True, f"CRIU {ver.strip().removeprefix('Version: ')} at {path}, driven by runc; "
                                        "sandboxes created with hibernatable=true can pause(to_disk=True)")


def exec_guard() -> Feature:
    from corral.execguard import kernel

    ok, why = kernel.available()
    _, lsm = kernel.bpf_lsm()
    if not ok:
        return Feature("exec-guard", False, f"{why}; sandboxes with an exec policy are refused. BPF LSM: {lsm}")
    return Feature("exec-guard", True, f"active backend: {why} (+ vm.memfd_noexec=2 per sandbox, loader rule); "
                                       f"BPF LSM: {lsm}")


def egress_network() -> Feature:
    """What networked sandboxes (network=) need: nftables and iproute2, run as root."""
    missing = [b for b in ("nft", "ip", "nsenter") if not shutil.which(b)]
    if missing:
        return Feature("egress-network", False, f"{', '.join(missing)} not installed (apt-get install nftables "
                                                "iproute2 util-linux); networked sandboxes are refused")
    if os.geteuid() != 0:
        return Feature("egress-network", False, "needs root (veth pairs and nftables)")
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return Feature("egress-network", False, f"nftables unusable: {r.stderr.strip()[:200]}; networked sandboxes "
                                                "are refused")
    return Feature("egress-network", True, "veth + nftables (every TCP connection to the egress proxy, UDP/53 to "
                                           "Corral's resolver, everything else dropped)")


def runtime_name() -> str | None:
    for name in ("crun", "runc"):
        if shutil.which(name):
            return name
    return None

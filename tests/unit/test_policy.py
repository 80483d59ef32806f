"""Sandbox policy: the user-facing spec, its defaults, and what compile_oci makes of it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from corral.policy import compile as pc
from corral.policy import defaults
from corral.policy.spec import ResourcePolicy, SandboxPolicy

SID = "sb-0123456789ab"
TEMPLATE_PATHS = pc.SandboxPaths(rootfs="/var/lib/corral/sandboxes/sb-0123456789ab/rootfs",
                                 agent_src="/usr/lib/corral/agent", agent_runtime="/usr/lib/corral/rt",
                                 workspace=None)
HOST_PATHS = pc.SandboxPaths(rootfs="/var/lib/corral/sandboxes/sb-0123456789ab/rootfs",
                             agent_src="/usr/lib/corral/agent", agent_runtime="/usr/lib/corral/rt",
                             workspace="/var/lib/corral/sandboxes/sb-0123456789ab/workspace",
                             masked_dirs=("/var/lib/corral", "/run/corral"))


def compiled(policy: SandboxPolicy | None = None, paths: pc.SandboxPaths = TEMPLATE_PATHS) -> dict[str, Any]:
    return pc.compile_oci(SID, policy or SandboxPolicy(), paths).config


def host() -> dict[str, Any]:
    return compiled(SandboxPolicy(root="host", allow_weaker_isolation=True), HOST_PATHS)


# ---- spec ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {"foo": 1}, {"resources": {"gpu": 1}}, {"network": "host"}, {"root": "/"}, {"Template": "base"},
], ids=repr)
def test_unknown_or_invalid_fields_are_rejected(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SandboxPolicy.model_validate(kw)


def test_resource_policy_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ResourcePolicy.model_validate({"cpu_cores": 1, "cpu_shares": 2})


@pytest.mark.parametrize("name", ["base", "busybox", "a", "0", "a" * 63, "my-tpl.v1_2"])
def test_good_template_names(name: str) -> None:
    assert SandboxPolicy(template=name).template == name


@pytest.mark.parametrize("name", [
    "", "Base", "-x", ".x", "_x", "a" * 64, "a/b", "../etc", "..", ".", "a b", "caf\u00e9", "a\x00", "\nbase",
], ids=repr)
def test_bad_template_names(name: str) -> None:
    with pytest.raises(ValidationError, match="template names"):
        SandboxPolicy(template=name)


@pytest.mark.parametrize("name", ["A", "_", "_x", "PATH", "a1", "X" * 128])
def test_good_env_names(name: str) -> None:
    assert SandboxPolicy(env={name: "v"}).env == {name: "v"}


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A=B", "A B", "X" * 129, "\u00c4", "A\x00", "\nA"], ids=repr)
def test_bad_env_names(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid environment variable name"):
        SandboxPolicy(env={name: "v"})


@pytest.mark.parametrize("kw", [{"template": "base\n"}, {"env": {"A\n": "v"}}], ids=repr)
def test_trailing_newline_is_rejected(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SandboxPolicy.model_validate(kw)


@pytest.mark.parametrize("value", ["\x00", "a\x00b", "x" * 10 + "\x00"], ids=repr)
def test_env_values_with_nul_are_rejected(value: str) -> None:
    with pytest.raises(ValidationError, match="NUL"):
        SandboxPolicy(env={"A": value})


def test_env_values_may_be_empty_or_contain_anything_but_nul() -> None:
    env = {"A": "", "B": "=;$(x) \n\t\u00e9"}
    assert SandboxPolicy(env=env).env == env


@pytest.mark.parametrize("field,value", [
    ("cpu_cores", 0), ("cpu_cores", -1), ("cpu_cores", 256.5), ("cpu_cores", float("nan")), ("cpu_cores", float("inf")),
    ("memory_mib", 15), ("memory_mib", 0), ("memory_mib", 1024 * 1024 + 1), ("memory_mib", 16.5), ("memory_mib", True),
    ("pids_max", 7), ("pids_max", 0), ("pids_max", -1), ("pids_max", 1_000_001),
], ids=repr)
def test_out_of_range_resources(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        ResourcePolicy.model_validate({field: value})
    with pytest.raises(ValidationError):
        SandboxPolicy.model_validate({"resources": {field: value}})


@pytest.mark.parametrize("field,value", [
    ("cpu_cores", 256), ("cpu_cores", 0.5), ("memory_mib", 16), ("memory_mib", 1024 * 1024),
    ("pids_max", 8), ("pids_max", 1_000_000),
])
def test_resource_bounds_are_inclusive_where_documented(field: str, value: Any) -> None:
    assert getattr(ResourcePolicy.model_validate({field: value}), field) == value


@pytest.mark.parametrize("value", [0, -5, 365 * 86400 + 1])
def test_timeout_out_of_range(value: int) -> None:
    with pytest.raises(ValidationError):
        SandboxPolicy(timeout_s=value)


def test_policy_is_frozen() -> None:
    p = SandboxPolicy()
    with pytest.raises(ValidationError):
        p.template = "busybox"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        p.resources.memory_mib = 1  # type: ignore[misc]


def test_defaults_are_the_documented_safe_ones() -> None:
    p = SandboxPolicy()
    assert p.template == "base" and p.root == "template" and p.network is None and p.secrets == []
    assert p.timeout_s is None and p.env == {} and p.allow_weaker_isolation is False
    assert p.resources == ResourcePolicy(cpu_cores=defaults.CPU_CORES, memory_mib=defaults.MEMORY_MIB,
                                         pids_max=defaults.PIDS_MAX)
    assert p.weakenings() == []


def test_resource_defaults_appear_in_the_schema() -> None:
    props = ResourcePolicy.model_json_schema()["properties"]
    assert props["cpu_cores"]["default"] == defaults.CPU_CORES
    assert props["memory_mib"]["default"] == defaults.MEMORY_MIB
    assert props["pids_max"]["default"] == defaults.PIDS_MAX


def test_host_root_is_reported_as_a_weakening() -> None:
    w = SandboxPolicy(root="host", allow_weaker_isolation=True).weakenings()
    assert len(w) == 1 and w[0].startswith("root=host")


def test_policy_survives_its_json_dump() -> None:
    """The store keeps policies as JSON; reloading one gives the same policy."""
    p = SandboxPolicy(template="busybox", root="host", allow_weaker_isolation=True, timeout_s=60, env={"A": "b"},
                      resources=ResourcePolicy(cpu_cores=0.5, memory_mib=256, pids_max=64))
    assert SandboxPolicy.model_validate(p.model_dump(mode="json")) == p


# defaults.py says "each with its reason"; these have none yet (xfail below until they do).
UNDOCUMENTED = {"HOSTNAME", "PATH", "MASKED_PATHS", "READONLY_PATHS"}


def _defaults_without_a_reason() -> set[str]:
    src = Path(inspect.getfile(defaults)).read_text().splitlines()
    tree = ast.parse("\n".join(src))
    missing = []
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if not isinstance(target, ast.Name) or not target.id.isupper():
            continue
        # Documented: a comment on one of its own lines, or in the block of lines just above it.
        own = src[node.lineno - 1:node.end_lineno]
        i, above = node.lineno - 2, []
        while i >= 0 and src[i].strip():
            above.append(src[i])
            i -= 1
        if not any("#" in ln for ln in own + above):
            missing.append(target.id)
    return set(missing)


def test_every_default_has_its_reason_in_a_comment() -> None:
    missing = _defaults_without_a_reason() - UNDOCUMENTED
    assert not missing, f"defaults without a reason (say why in a comment above them): {sorted(missing)}"


def test_the_undocumented_defaults_have_a_reason() -> None:
    assert not _defaults_without_a_reason() & UNDOCUMENTED


def test_denied_syscalls_each_have_a_reason_and_appear_once() -> None:
    names = [n for n, _, _ in defaults.DENIED_SYSCALLS]
    assert len(names) == len(set(names))
    for name, errno, reason in defaults.DENIED_SYSCALLS:
        assert errno in (defaults.EPERM, defaults.ENOSYS), name
        assert len(reason.strip()) > 10, name
    for req, reason in defaults.DENIED_IOCTLS:
        assert req > 0 and reason.strip()


# ---- compile_oci: identity, namespaces, cgroups --------------------------------------------------
def test_all_seven_namespaces_are_new() -> None:
    ns = compiled()["linux"]["namespaces"]
    assert sorted(n["type"] for n in ns) == sorted(["pid", "network", "ipc", "uts", "mount", "user", "cgroup"])
    assert all("path" not in n for n in ns), "a namespace with a path joins an existing (host) namespace"


def test_root_inside_maps_to_the_unprivileged_range() -> None:
    linux = compiled()["linux"]
    want = [{"containerID": 0, "hostID": defaults.UID_BASE, "size": 65536}]
    assert linux["uidMappings"] == want and linux["gidMappings"] == want
    assert defaults.UID_COUNT == 65536 and defaults.UID_BASE >= 65536  # never overlaps host uids 0..65535


def test_cgroup_path_and_limits_follow_the_policy() -> None:
    p = SandboxPolicy(resources=ResourcePolicy(cpu_cores=1.5, memory_mib=300, pids_max=99))
    plan = pc.compile_oci(SID, p, TEMPLATE_PATHS)
    linux = plan.config["linux"]
    assert plan.cgroup_path == linux["cgroupsPath"] == f"corral/{SID}"
    res = linux["resources"]
    assert res["memory"] == {"limit": 300 * 1024 * 1024, "swap": 300 * 1024 * 1024}  # memory+swap: no swap
    assert res["pids"] == {"limit": 99}
    assert res["cpu"] == {"period": 100000, "quota": 150000}


def test_default_limits() -> None:
    res = compiled()["linux"]["resources"]
    assert res["memory"]["limit"] == defaults.MEMORY_MIB << 20
    assert res["pids"]["limit"] == defaults.PIDS_MAX
    assert res["cpu"]["quota"] == int(defaults.CPU_CORES * res["cpu"]["period"])


@given(cores=st.floats(min_value=0.01, max_value=256))
def test_cpu_quota_is_never_below_the_kernel_minimum_for_sane_values(cores: float) -> None:
    cpu = compiled(SandboxPolicy(resources=ResourcePolicy(cpu_cores=cores)))["linux"]["resources"]["cpu"]
    assert 1000 <= cpu["quota"] <= 256 * cpu["period"]


@pytest.mark.parametrize("cores", [0.001, 0.000001])
def test_tiny_cpu_is_rejected_or_clamped(cores: float) -> None:
    try:
        p = SandboxPolicy(resources=ResourcePolicy(cpu_cores=cores))
    except ValidationError:
        return
    assert compiled(p)["linux"]["resources"]["cpu"]["quota"] >= 1000


# ---- compile_oci: process ------------------------------------------------------------------------
def test_process_hardening() -> None:
    proc = compiled()["process"]
    assert proc["noNewPrivileges"] is True
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["terminal"] is False
    rl = {r["type"]: (r["soft"], r["hard"]) for r in proc["rlimits"]}
    assert rl["RLIMIT_CORE"] == (0, 0)
    assert rl["RLIMIT_NOFILE"] == (defaults.NOFILE, defaults.NOFILE)
    assert pc.compile_oci(SID, SandboxPolicy(), TEMPLATE_PATHS, nofile=1024).config["process"]["rlimits"][0]["hard"] == 1024


DANGEROUS_CAPS = {"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_SYS_MODULE",
                  "CAP_SYS_RAWIO", "CAP_DAC_READ_SEARCH", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_BPF", "CAP_PERFMON",
                  "CAP_SYSLOG", "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_SYS_CHROOT", "CAP_LINUX_IMMUTABLE",
                  "CAP_AUDIT_CONTROL", "CAP_SYS_RESOURCE", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_IPC_LOCK"}


def test_capabilities() -> None:
    caps = compiled()["process"]["capabilities"]
    assert caps["inheritable"] == [] and caps["ambient"] == []
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(defaults.CAPABILITIES)
    assert not DANGEROUS_CAPS & set(caps["bounding"])
    assert set(defaults.CAPABILITIES) == {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                                          "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                                          "CAP_AUDIT_WRITE"}


def test_agent_runs_on_the_bundled_loader_and_python() -> None:
    argv = pc.agent_argv()
    assert compiled()["process"]["args"] == argv
    assert argv[0] == f"{pc.AGENT_DIR}/rt/lib/ld-linux-x86-64.so.2"
    assert argv[1:3] == ["--library-path", f"{pc.AGENT_DIR}/rt/lib"]
    assert argv[3] == f"{pc.AGENT_DIR}/rt/bin/python3"
    assert {"-S", "-s", "-B"} <= set(argv[4:-1])  # no site-packages of the image, no user site, no .pyc writes
    assert argv[-1] == f"{pc.AGENT_DIR}/agent/agent.py"
    assert all(a.startswith(pc.AGENT_DIR) for a in argv if a.startswith("/")), "nothing from the image itself"


def _env(config: dict[str, Any]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in config["process"]["env"])


def test_environment() -> None:
    env = _env(compiled(SandboxPolicy(env={"FOO": "bar", "PATH": "/opt/bin"})))
    assert env["FOO"] == "bar" and env["PATH"] == "/opt/bin"
    assert env["PYTHONHOME"] == f"{pc.AGENT_DIR}/rt" and env["CORRAL_SANDBOX_ID"] == SID
    assert _env(compiled())["PATH"] == defaults.PATH
    assert compiled()["hostname"] == defaults.HOSTNAME


def test_environment_has_no_duplicate_names() -> None:
    env = compiled(SandboxPolicy(env={"PYTHONHOME": "/x", "CORRAL_SANDBOX_ID": "sb-ffffffffffff"}))["process"]["env"]
    names = [e.split("=", 1)[0] for e in env]
    assert len(names) == len(set(names)), names


# ---- compile_oci: filesystem ---------------------------------------------------------------------
def test_masked_and_readonly_paths() -> None:
    linux = compiled()["linux"]
    masked, ro = set(linux["maskedPaths"]), set(linux["readonlyPaths"])
    assert {"/proc/kcore", "/proc/keys", "/proc/kallsyms", "/proc/timer_list", "/sys/firmware"} <= masked
    assert {"/proc/sysrq-trigger", "/proc/sys", "/proc/bus", "/proc/irq", "/proc/fs"} <= ro | masked


def _binds(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in config["mounts"] if m["type"] == "bind" or "bind" in m.get("options", [])
            or "rbind" in m.get("options", [])]


def test_kernel_filesystems_are_restricted() -> None:
    mounts = {m["destination"]: m for m in compiled()["mounts"]}
    assert {"nosuid", "noexec", "nodev"} <= set(mounts["/proc"]["options"])
    assert "ro" in mounts["/sys"]["options"]
    assert {"nosuid", "noexec", "nodev"} <= set(mounts["/dev/shm"]["options"])
    assert f"size={defaults.SHM_MAX_MIB}m" in mounts["/dev/shm"]["options"]  # 1 GiB default: capped at 64 MiB


def test_tmpfs_sizes_follow_the_memory_limit() -> None:
    """A filled tmpfs cannot be freed by the OOM killer: it must stay well under memory_mib (G5)."""
    small = compiled(SandboxPolicy(resources={"memory_mib": 64}))
    mounts = {m["destination"]: m for m in small["mounts"]}
    assert "size=16m" in mounts["/dev/shm"]["options"]
    assert f"size={defaults.DEV_SIZE}" in mounts["/dev"]["options"]


def test_template_mode_binds_only_the_agent() -> None:
    config = compiled()
    assert config["root"] == {"path": TEMPLATE_PATHS.rootfs, "readonly": False}
    binds = {m["destination"]: m for m in _binds(config)}
    assert set(binds) == {f"{pc.AGENT_DIR}/rt", f"{pc.AGENT_DIR}/agent"}
    assert binds[f"{pc.AGENT_DIR}/rt"]["source"] == TEMPLATE_PATHS.agent_runtime
    assert binds[f"{pc.AGENT_DIR}/agent"]["source"] == TEMPLATE_PATHS.agent_src
    for m in binds.values():
        assert {"ro", "nosuid", "nodev"} <= set(m["options"]) and "rw" not in m["options"]
    assert "noexec" in binds[f"{pc.AGENT_DIR}/agent"]["options"]  # source is read by the bundled python only
    host_sources = {m["source"] for m in config["mounts"] if m["source"].startswith("/")}
    assert host_sources == {TEMPLATE_PATHS.agent_runtime, TEMPLATE_PATHS.agent_src}
    assert pc.WORKSPACE not in {m["destination"] for m in config["mounts"]}


def test_template_mode_ignores_host_only_paths() -> None:
    # Even if the runtime passes them, template mode never shows host directories.
    assert compiled(SandboxPolicy(), HOST_PATHS)["mounts"] == compiled()["mounts"]


def test_host_mode_root_is_read_only_with_masks_and_a_workspace() -> None:
    config = host()
    assert config["root"] == {"path": HOST_PATHS.rootfs, "readonly": True}
    mounts = config["mounts"]
    by_dest = {m["destination"]: m for m in mounts}
    for d in HOST_PATHS.masked_dirs:
        m = by_dest[d]
        assert m["type"] == "tmpfs" and {"ro", "nosuid", "nodev", "noexec"} <= set(m["options"])
    ws = by_dest[pc.WORKSPACE]
    assert ws["source"] == HOST_PATHS.workspace and {"rw", "nosuid", "nodev"} <= set(ws["options"])
    assert {m["destination"] for m in _binds(config)} == {f"{pc.AGENT_DIR}/rt", f"{pc.AGENT_DIR}/agent", pc.WORKSPACE}
    for d in ("/tmp", "/run"):
        assert by_dest[d]["type"] == "tmpfs"
    # A mask mounted before /tmp or /run would be hidden again under the new tmpfs.
    order = [m["destination"] for m in mounts]
    for d in HOST_PATHS.masked_dirs:
        assert order.index(d) > order.index("/run") and order.index(d) > order.index("/tmp")


def test_host_mode_without_workspace() -> None:
    paths = pc.SandboxPaths(rootfs="/r", agent_src="/a", agent_runtime="/rt", workspace=None, masked_dirs=("/m",))
    dests = {m["destination"] for m in compiled(SandboxPolicy(root="host", allow_weaker_isolation=True), paths)["mounts"]}
    assert "/m" in dests and pc.WORKSPACE not in dests


# ---- compile_oci: seccomp ------------------------------------------------------------------------
def _arg_matches(arg: dict[str, Any], args: list[int]) -> bool:
    """libseccomp semantics on x86_64: arguments are compared as 64-bit unsigned values."""
    v = args[arg["index"]] & (2**64 - 1)
    op, a, b = arg["op"], arg["value"], arg.get("valueTwo", 0)
    return {
        "SCMP_CMP_EQ": lambda: v == a, "SCMP_CMP_NE": lambda: v != a, "SCMP_CMP_LT": lambda: v < a,
        "SCMP_CMP_LE": lambda: v <= a, "SCMP_CMP_GT": lambda: v > a, "SCMP_CMP_GE": lambda: v >= a,
        "SCMP_CMP_MASKED_EQ": lambda: (v & a) == b,
    }[op]()


def denied(profile: dict[str, Any], name: str, *args: int) -> set[int]:
    """The errnos of every rule that matches this call (empty: the default action, allow)."""
    full = [*args, *[0] * (6 - len(args))]
    return {r["errnoRet"] for r in profile["syscalls"]
            if name in r["names"] and all(_arg_matches(a, full) for a in r.get("args", []))}


@pytest.fixture(scope="module")
def seccomp() -> dict[str, Any]:
    return compiled()["linux"]["seccomp"]


def test_seccomp_shape(seccomp: dict[str, Any]) -> None:
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64"]  # i386 / x32 entry points are killed (bad arch)
    for r in seccomp["syscalls"]:
        assert r["action"] == "SCMP_ACT_ERRNO", r  # a denylist: no rule ever allows anything
        assert r["names"] and isinstance(r["errnoRet"], int) and r["errnoRet"] > 0
    assert compiled(SandboxPolicy(root="host", allow_weaker_isolation=True), HOST_PATHS)["linux"]["seccomp"] == seccomp


@pytest.mark.parametrize("name,errno", [(n, e) for n, e, _ in defaults.DENIED_SYSCALLS])
def test_every_denied_syscall_is_denied_unconditionally(seccomp: dict[str, Any], name: str, errno: int) -> None:
    rules = [r for r in seccomp["syscalls"] if name in r["names"] and not r.get("args")]
    assert [r["errnoRet"] for r in rules] == [errno]


def test_only_denied_syscalls_are_denied_unconditionally(seccomp: dict[str, Any]) -> None:
    unconditional = {n for r in seccomp["syscalls"] if not r.get("args") for n in r["names"]}
    assert unconditional == {n for n, _, _ in defaults.DENIED_SYSCALLS}


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(64) if mask >> i & 1]


def test_clone_namespace_flags_each_denied_by_masked_eq(seccomp: dict[str, Any]) -> None:
    rules = [r for r in seccomp["syscalls"] if r["names"] == ["clone"]]
    flags = []
    for r in rules:
        (arg,) = r["args"]
        assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["index"] == 0
        assert arg["value"] == arg["valueTwo"]
        assert r["errnoRet"] == defaults.EPERM
        flags.append(arg["value"])
    assert sorted(flags) == _bits(defaults.CLONE_NAMESPACE_FLAGS)
    # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
    assert set(flags) == {0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000, 0x80}


SIGCHLD, CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND, CLONE_THREAD = 17, 0x100, 0x200, 0x400, 0x800, 0x10000


@pytest.mark.parametrize("flag", _bits(defaults.CLONE_NAMESPACE_FLAGS))
def test_clone_with_any_namespace_flag_is_denied(seccomp: dict[str, Any], flag: int) -> None:
    assert denied(seccomp, "clone", flag | SIGCHLD) == {defaults.EPERM}
    assert denied(seccomp, "clone", flag | SIGCHLD | CLONE_VM | (1 << 40)) == {defaults.EPERM}


def test_ordinary_fork_and_threads_are_allowed(seccomp: dict[str, Any]) -> None:
    assert denied(seccomp, "clone", SIGCHLD) == set()  # fork()
    thread = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | 0x80000 | 0x100000 | 0x200000
    assert denied(seccomp, "clone", thread) == set()  # pthread_create
    assert denied(seccomp, "clone3") == {defaults.ENOSYS}  # so libc falls back to clone, which is filtered


AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK, AF_ALG = 1, 2, 10, 16, 17, 40, 38
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_PACKET, SOCK_CLOEXEC = 1, 2, 3, 10, 0x80000


def test_socket_families(seccomp: dict[str, Any]) -> None:
    for fam in (AF_UNIX, AF_INET, AF_INET6):
        assert denied(seccomp, "socket", fam, SOCK_STREAM | SOCK_CLOEXEC) == set()
    assert denied(seccomp, "socketpair", AF_UNIX, SOCK_STREAM) == set()
    for fam in (0, AF_PACKET, AF_VSOCK, AF_ALG, 45, 46, 1000, 2**32 + AF_PACKET, 2**64 - 1):
        assert denied(seccomp, "socket", fam, SOCK_STREAM), fam
        assert denied(seccomp, "socketpair", fam, SOCK_STREAM), fam


def test_raw_inet_sockets_are_denied(seccomp: dict[str, Any]) -> None:
    for fam in (AF_INET, AF_INET6):
        for typ in (SOCK_RAW, SOCK_PACKET, SOCK_RAW | SOCK_CLOEXEC):
            assert denied(seccomp, "socket", fam, typ) == {defaults.EPERM}, (fam, typ)


def test_netlink_raw_sockets_are_allowed(seccomp: dict[str, Any]) -> None:
    assert denied(seccomp, "socket", AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC) == set()


TIOCSTI, TIOCLINUX = 0x5412, 0x541C


def test_terminal_injection_ioctls_are_denied(seccomp: dict[str, Any]) -> None:
    assert denied(seccomp, "ioctl", 0, TIOCSTI) == {defaults.EPERM}
    assert denied(seccomp, "ioctl", 0, TIOCLINUX) == {defaults.EPERM}
    assert denied(seccomp, "ioctl", 0, 0x5401) == set()  # TCGETS: ordinary terminal use


@pytest.mark.parametrize("req", [TIOCSTI, TIOCLINUX])
def test_terminal_injection_ioctls_are_denied_with_high_bits_set(seccomp: dict[str, Any], req: int) -> None:
    assert denied(seccomp, "ioctl", 0, req | (1 << 32)) == {defaults.EPERM}


def test_compile_is_deterministic_and_does_not_share_state() -> None:
    a, b = compiled(), compiled()
    assert a == b
    a["linux"]["seccomp"]["syscalls"].clear()
    a["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    assert compiled() == b
    assert "CAP_SYS_ADMIN" not in defaults.CAPABILITIES


# ---- network and secrets ---------------------------------------------------------------------------


def test_network_spellings_and_secret_rules() -> None:
    assert SandboxPolicy(network="none").network is None  # type: ignore[arg-type]  # records written before issue 3
    p = SandboxPolicy.model_validate({"network": {"allow": ["pypi.org", "*.github.com"]}, "secrets": ["github"]})
    assert p.network is not None and p.network.allow == ["pypi.org", "*.github.com"] and p.secrets == ["github"]
    with pytest.raises(ValidationError, match="network policy"):
        SandboxPolicy(secrets=["github"])
    with pytest.raises(ValidationError, match="listed twice"):
        SandboxPolicy.model_validate({"network": {}, "secrets": ["a", "a"]})
    with pytest.raises(ValidationError, match="invalid secret name"):
        SandboxPolicy.model_validate({"network": {}, "secrets": ["../x"]})
    with pytest.raises(ValidationError, match="allows everything"):
        SandboxPolicy.model_validate({"network": {"allow": ["*"]}})
    with pytest.raises(ValidationError):
        SandboxPolicy.model_validate({"network": {"allow": ["x.org"], "extra": 1}})


def test_networked_plan_binds_net_files_and_pins_proxy_variables() -> None:
    paths = pc.SandboxPaths(rootfs="/r", agent_src="/a", agent_runtime="/rt", workspace=None,
                            net_dir="/s/net", net_files=(("/etc/resolv.conf", "/s/net/resolv.conf"),),
                            net_env=(("HTTPS_PROXY", "http://10.200.0.5:3128"),))
    policy = SandboxPolicy.model_validate({"network": {"allow": []}, "env": {"HTTPS_PROXY": "http://evil:1"}})
    cfg = pc.compile_oci("sb-0123456789ab", policy, paths).config
    env = dict(e.split("=", 1) for e in cfg["process"]["env"])
    assert env["HTTPS_PROXY"] == "http://10.200.0.5:3128"  # the caller's env cannot point the proxy elsewhere
    mounts = {m["destination"]: m for m in cfg["mounts"]}
    for dest in (pc.NET_DIR, "/etc/resolv.conf"):
        assert "ro" in mounts[dest]["options"] and "noexec" in mounts[dest]["options"]
    assert mounts["/etc/resolv.conf"]["source"] == "/s/net/resolv.conf"
    # Without a network: no such mounts, a network namespace with loopback only.
    plain = pc.compile_oci("sb-0123456789ab", SandboxPolicy(), TEMPLATE_PATHS).config
    assert not any(m["destination"] in (pc.NET_DIR, "/etc/resolv.conf") for m in plain["mounts"])
    assert {"type": "network"} in plain["linux"]["namespaces"]


def test_host_mode_binds_net_files_after_its_fresh_run_and_tmp_and_before_volumes() -> None:
    import dataclasses

    paths = dataclasses.replace(HOST_PATHS, net_dir="/s/net", volumes=(("/run/data", "/v/data", False),),
                                net_files=(("/run/systemd/resolve/stub-resolv.conf", "/s/net/resolv.conf"),))
    policy = SandboxPolicy.model_validate({"root": "host", "allow_weaker_isolation": True, "network": {"allow": []}})
    dests = [m["destination"] for m in pc.compile_oci("sb-0123456789ab", policy, paths).config["mounts"]]
    # crun mounts in order: a bind under /run made before the tmpfs on /run would be hidden by it
    # (volumes too); volumes, masked dirs and the workspace come after the network files.
    net = dests.index("/run/systemd/resolve/stub-resolv.conf")
    assert dests.index("/run") < net < dests.index("/run/data") < dests.index("/var/lib/corral") < dests.index("/workspace")


def _tree(root: Path, links: dict[str, str], files: tuple[str, ...] = (), dirs: tuple[str, ...] = ()) -> None:
    for d in dirs:
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for f in files:
        (root / f.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / f.lstrip("/")).write_text("-----BEGIN CERTIFICATE-----\n")
    for name, target in links.items():
        (root / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / name.lstrip("/")).symlink_to(target)


def test_resolve_in_root_follows_links_as_a_chrooted_process_would(tmp_path: Path) -> None:
    from corral.runtimes.images import RootPath, read_in_root, resolve_in_root

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.pem").write_text("-----BEGIN CERTIFICATE-----\nhost file\n")
    root = tmp_path / "root"
    _tree(root, {"/etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf",
                 "/etc/ssl/cert.pem": "certs/ca.crt", "/etc/abs": "/etc/ssl/certs/ca.crt",
                 "/etc/up": "../../../../../../../outside/secret.pem", "/etc/hostabs": str(outside / "secret.pem"),
                 "/etc/loop1": "loop2", "/etc/loop2": "loop1", "/sslink": "/etc/ssl", "/etc/self": ".",
                 "/hostdir": str(outside), "/etc/via-missing": "/nx/../hostdir/secret.pem",
                 "/etc/bad-name": "caf\u00e9.pem"},
          files=("/etc/ssl/certs/ca.crt",), dirs=("/run",))
    r = str(root)
    assert resolve_in_root(r, "/etc/resolv.conf") == RootPath("/run/systemd/resolve/stub-resolv.conf", "missing")
    assert resolve_in_root(r, "/etc/ssl/cert.pem") == RootPath("/etc/ssl/certs/ca.crt", "file")
    assert resolve_in_root(r, "/etc/abs") == RootPath("/etc/ssl/certs/ca.crt", "file")  # absolute: from the root
    assert resolve_in_root(r, "/sslink/certs/ca.crt") == RootPath("/etc/ssl/certs/ca.crt", "file")  # a link mid-path
    assert resolve_in_root(r, "/etc/self/self/ssl/../ssl/cert.pem") == RootPath("/etc/ssl/certs/ca.crt", "file")
    assert resolve_in_root(r, "/etc/ssl") == RootPath("/etc/ssl", "dir")
    # '..' stops at the root and absolute targets stay in it: nothing of the host is reached.
    assert resolve_in_root(r, "/etc/up") == RootPath("/outside/secret.pem", "missing")
    assert resolve_in_root(r, "/etc/hostabs") == RootPath(str(outside / "secret.pem"), "missing")
    assert resolve_in_root(r, "/hostdir/secret.pem") == RootPath(str(outside / "secret.pem"), "missing")
    assert resolve_in_root(r, "/../../etc/ssl/certs/ca.crt") == RootPath("/etc/ssl/certs/ca.crt", "file")
    # '..' after a missing name: ENOENT for a chrooted process, and no lexical shortcut back into the
    # tree (it would land on /hostdir, an absolute link to the host, and be followed there).
    assert resolve_in_root(r, "/etc/via-missing") is None
    assert resolve_in_root(r, "/missing/../etc/ssl") is None
    assert resolve_in_root(r, "/etc/loop1") is None  # a loop
    assert resolve_in_root(r, "/etc/ssl/certs/ca.crt/x") is None  # through a file
    assert resolve_in_root(r, "/etc/bad-name") is None  # not printable ASCII: not a mount destination
    assert resolve_in_root(r, "/") == RootPath("/", "dir")
    # Reading goes through the same walk: the host file behind every one of those links stays unread.
    assert read_in_root(r, "/etc/ssl/cert.pem", 100) == b"-----BEGIN CERTIFICATE-----\n"
    for p in ("/etc/up", "/etc/hostabs", "/hostdir/secret.pem", "/etc/via-missing", "/etc/ssl", "/etc/resolv.conf"):
        assert read_in_root(r, p, 100) is None, p
    assert read_in_root(r, "/etc/ssl/cert.pem", 5) == b"-----"


def test_resolve_in_root_bounds_the_walk(tmp_path: Path) -> None:
    from corral.runtimes.images import resolve_in_root

    # Links whose targets are long runs of 'a/..' (each step costs the same however deep the walk
    # is, and the number of steps is capped), and a chain of 41 links.
    (tmp_path / "a").mkdir()
    for i in range(5):  # 5 links of 1600 names each (a link's target is at most 4095 bytes)
        (tmp_path / f"long{i}").symlink_to("/".join(["a", ".."] * 800) + (f"/long{i + 1}" if i < 4 else "/a"))
    assert resolve_in_root(str(tmp_path), "/long0") is None
    assert resolve_in_root(str(tmp_path), "/long0", max_steps=10_000) is not None
    for i in range(41):
        (tmp_path / f"l{i}").symlink_to(f"l{i + 1}")
    (tmp_path / "l41").write_text("")
    assert resolve_in_root(str(tmp_path), "/l1") is not None  # 40 links
    assert resolve_in_root(str(tmp_path), "/l0") is None  # 41


def test_net_files_land_where_the_sandbox_resolves_them(tmp_path: Path) -> None:
    from corral.runtimes.oci import _net_files

    net = Path("/s/net")
    # Fedora-style CA chain and systemd-resolved's stub link in an image (writable root).
    img = tmp_path / "img"
    _tree(img, {"/etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf",
                "/etc/pki/tls/certs/ca-bundle.crt": "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
                "/etc/ssl/certs": "/etc/pki/tls/certs", "/etc/ssl/cert.pem": "/etc/pki/tls/cert.pem"},
          files=("/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", "/etc/pki/tls/cert.pem"))
    assert _net_files(str(img), net, host_root=False) == (
        ("/run/systemd/resolve/stub-resolv.conf", "/s/net/resolv.conf"),
        ("/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", "/s/net/ca.pem"),  # once, though 2 paths lead there
        ("/etc/pki/tls/cert.pem", "/s/net/ca.pem"))
    # A volume at /etc/pki: this view of the root does not show what the sandbox will see there.
    assert _net_files(str(img), net, host_root=False, avoid=("/etc/pki",)) == (
        ("/run/systemd/resolve/stub-resolv.conf", "/s/net/resolv.conf"),)
    # Alpine-style: plain files, one relative link to the same bundle; no resolv.conf at all.
    alp = tmp_path / "alpine"
    _tree(alp, {"/etc/ssl/cert.pem": "certs/ca-certificates.crt"}, files=("/etc/ssl/certs/ca-certificates.crt",),
          dirs=("/etc",))
    assert _net_files(str(alp), net, host_root=False) == (
        ("/etc/resolv.conf", "/s/net/resolv.conf"), ("/etc/ssl/certs/ca-certificates.crt", "/s/net/ca.pem"))
    # Host mode: the root is read-only; a missing target is created only in the sandbox's own /run or /tmp.
    host = tmp_path / "host"
    _tree(host, {"/etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf"}, dirs=("/run",))
    assert _net_files(str(host), net, host_root=True) == (("/run/systemd/resolve/stub-resolv.conf",
                                                            "/s/net/resolv.conf"),)
    host2 = tmp_path / "host2"
    _tree(host2, {"/etc/resolv.conf": "/opt/resolv/resolv.conf"}, dirs=("/opt",))
    assert _net_files(str(host2), net, host_root=True) == ()
    # Links that aim Corral's files at kernel file systems, devices, Corral's own mounts or odd places
    # of an image are not followed there; a CA store path that is a directory, or a loop, is left alone.
    odd = tmp_path / "odd"
    _tree(odd, {"/etc/ssl/cert.pem": "/proc/self/environ", "/etc/resolv.conf": "/.corral/agent/agent.py",
                "/etc/pki/tls/certs/ca-bundle.crt": "/dev/null"}, dirs=("/etc/ssl/certs/ca-certificates.crt",))
    assert _net_files(str(odd), net, host_root=False) == ()
    odd2 = tmp_path / "odd2"
    _tree(odd2, {"/etc/resolv.conf": "/usr/lib/x/resolv.conf", "/etc/ssl/cert.pem": "cert.pem"}, dirs=("/usr",))
    assert _net_files(str(odd2), net, host_root=False) == ()

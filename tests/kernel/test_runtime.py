"""The OCI runtime and agent on the real kernel, without the daemon: namespaces, cgroups, seccomp,
overlay layers, and that stop/destroy leave nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from corral.policy import defaults
from corral.policy.spec import SandboxPolicy
from corral.runtimes import images, oci
from corral.runtimes.agentclient import AgentClient
from tests.conftest import TEMPLATE_CACHE, require, traversable_tmp

AGENT_SRC = Path(oci.__file__).resolve().parent.parent / "agent"


@pytest.fixture(scope="module")
def runtime():
    require("root")
    require("oci-runtime")
    require("user-namespaces")
    require("overlayfs")
    require("template-busybox")
    oci.enter_private_mount_namespace()  # what the daemon does first; mounts below die with the test process
    tmp = traversable_tmp()
    rt = oci.OciRuntime(tmp / "data", tmp / "state", images.install_agent_source(tmp / "data", AGENT_SRC),
                        images.ensure_agent_runtime(tmp / "data"))
    tpl = images.TemplateStore(TEMPLATE_CACHE).build("busybox")
    yield rt, tpl.rootfs
    shutil.rmtree(tmp, ignore_errors=True)


def run(coro):
    return asyncio.run(coro)


async def _exec(rt: oci.OciRuntime, sid: str, cmd: str) -> dict:
    r = await AgentClient(rt.socket_path(sid), sid).exec_collect({"cmd": cmd}, 1 << 20)
    return {**r, "stdout": r["stdout"].decode(), "stderr": r["stderr"].decode()}


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def test_namespaces_ids_limits_and_filters(runtime):
    rt, rootfs = runtime
    sid = "sb-kernel000001"
    pol = SandboxPolicy(template="busybox", resources={"memory_mib": 64, "pids_max": 40})

    async def go():
        rt.prepare(sid, pol)
        await rt.start(sid, pol, [rootfs])
        try:
            pid = rt.read_pid(sid)
            assert pid
            for ns in ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup"):
                assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
            status = Path(f"/proc/{pid}/status").read_text()
            assert f"Uid:\t{defaults.UID_BASE}" in status  # root inside is an unprivileged host uid
            assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
            r = await _exec(rt, sid, "cat /proc/self/uid_map; hostname; ip link 2>/dev/null | grep -c '^[0-9]' "
                                     "|| ls /sys/class/net")
            assert r["stdout"].split()[:4] == ["0", str(defaults.UID_BASE), str(defaults.UID_COUNT), "sandbox"]
            assert r["stdout"].split()[4:] in (["1"], ["lo"])  # loopback only
            cg = Path("/sys/fs/cgroup")
            assert (cg / "memory/corral" / sid / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
            assert (cg / "pids/corral" / sid / "pids.max").read_text().strip() == "40"
            assert str(pid) in (cg / "pids/corral" / sid / "cgroup.procs").read_text().split()
            # seccomp: mount is refused even though root inside has CAP_SYS_ADMIN-free caps anyway.
            r = await _exec(rt, sid, "mount -t tmpfs none /mnt 2>&1; echo rc=$?")
            assert "rc=0" not in r["stdout"] and ("Operation not permitted" in r["stdout"] or "denied" in r["stdout"])
        finally:
            await rt.destroy(sid)

    run(go())
    assert not rt.dir(sid).exists()
    assert not rt.cgroup_dirs(sid)
    assert str(rt.dir(sid)) not in _mounts()
    assert sid not in json.dumps([c.__dict__ for c in run(rt.list_containers())])


def test_upper_layer_survives_stop_and_template_stays_pristine(runtime):
    rt, rootfs = runtime
    sid = "sb-kernel000002"
    pol = SandboxPolicy(template="busybox")

    async def go():
        rt.prepare(sid, pol)
        await rt.start(sid, pol, [rootfs])
        await _exec(rt, sid, "echo kept > /etc/motd; rm /bin/vi")
        await rt.stop(sid)
        assert not rt.cgroup_dirs(sid) and not oci.is_mountpoint(str(rt.dir(sid) / "rootfs"))
        rt.mount_disk(sid)
        assert (rt.upper_dir(sid) / "etc/motd").read_text() == "kept\n"
        assert Path(rootfs, "bin/vi").is_symlink() and not Path(rootfs, "etc/motd").exists()
        await rt.start(sid, pol, [rootfs])
        r = await _exec(rt, sid, "cat /etc/motd; test -e /bin/vi && echo vi || echo no-vi")
        assert r["stdout"] == "kept\nno-vi\n"
        await rt.destroy(sid)

    run(go())


def test_agent_runtime_works_without_python_in_the_image(runtime):
    rt, rootfs = runtime
    assert not Path(rootfs, "usr/bin/python3").exists() and not Path(rootfs, "lib").exists()
    sid = "sb-kernel000003"
    pol = SandboxPolicy(template="busybox")

    async def go():
        rt.prepare(sid, pol)
        await rt.start(sid, pol, [rootfs])
        try:
            info = await AgentClient(rt.socket_path(sid), sid).ping()
            assert info["pid"] == 1  # the agent is the sandbox's init
            r = await _exec(rt, sid, "touch /.corral/rt/x 2>&1; ls /.corral/run 2>&1; echo $$")
            assert "Read-only file system" in r["stdout"] and "No such file" in r["stdout"]
        finally:
            await rt.destroy(sid)

    run(go())


def test_start_failure_is_a_clear_error_and_leaves_nothing(runtime):
    rt, _ = runtime
    sid = "sb-kernel000004"
    pol = SandboxPolicy(template="busybox")

    async def go():
        rt.prepare(sid, pol)
        with pytest.raises(Exception) as ei:
            await rt.start(sid, pol, ["/nonexistent-template-rootfs"])
        assert "sb-kernel000004" in str(ei.value) or "overlay" in str(ei.value)
        await rt.destroy(sid)

    run(go())
    assert not rt.cgroup_dirs(sid) and not rt.dir(sid).exists()


def _states(sid: str) -> set[str]:
    out = set()
    for pid in (Path("/sys/fs/cgroup/pids/corral") / sid / "cgroup.procs").read_text().split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        out.add(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")))
    return out


def test_restored_tasks_wait_stopped_until_continued(runtime):
    """CRIU leaves a restored sandbox's tasks stopped: the daemon arms the exec guard and wires the
    network again before any of them runs (see OciRuntime.continue_restored)."""
    require("hibernation")
    rt, rootfs = runtime
    sid = "sb-kernel000005"
    pol = SandboxPolicy(template="busybox", hibernatable=True)

    async def go():
        rt.prepare(sid, pol)
        await rt.start(sid, pol, [rootfs])
        try:
            await AgentClient(rt.socket_path(sid), sid).ping(timeout_s=10)
            await rt.checkpoint(sid)
            await rt.restore(sid, pol, [rootfs])
            assert _states(sid) == {"T"}  # every task, the agent included, is stopped
            await asyncio.sleep(0.3)
            assert _states(sid) == {"T"}  # and stays so
            await rt.continue_restored(sid)
            await AgentClient(rt.socket_path(sid), sid).ping(timeout_s=10)
            assert "T" not in _states(sid)
            assert (await _exec(rt, sid, "echo back"))["stdout"] == "back\n"
        finally:
            await rt.destroy(sid)

    run(go())
    assert not rt.cgroup_dirs(sid)

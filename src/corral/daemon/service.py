"""The service: the only mutator. Routes parse requests into calls on it; it drives the store,
the runtime, the templates and the agents, and keeps desired and observed state reconciled."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from corral import errors
from corral.agent import protocol as P
from corral.api import models as m
from corral.audit import chain
from corral.daemon.network import Networks
from corral.daemon.settings import DaemonSettings
from corral.daemon.store import SandboxRecord, Store
from corral.execguard import index as exec_index
from corral.execguard import kernel as exec_kernel
from corral.execguard.guard import ExecGuard, is_holder, set_memfd_noexec
from corral.policy.compile import require_consent
from corral.policy.execpolicy import ExecIndex, ExecPlan, compile_exec
from corral.policy.network import SecretBinding
from corral.policy.spec import SandboxPolicy
from corral.runtimes import images
from corral.runtimes.agentclient import AgentClient, AgentConnection
from corral.runtimes.oci import OciRuntime
from corral.storage import backup
from corral.storage.snapshots import SnapshotStore

log = logging.getLogger("corral.service")
AGENT_READY_TIMEOUT_S = 20.0


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


def check_path(path: str) -> str:
    try:
        return P.check_path(path)
    except ValueError as e:
        raise errors.InvalidPathError(str(e)) from None


class Service:
    def __init__(self, settings: DaemonSettings, store: Store, runtime: OciRuntime, templates: images.TemplateStore):
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.templates = templates
        self.records: dict[str, SandboxRecord] = {r.id: r for r in store.list_sandboxes()}
        self.pids: dict[str, int] = {}
        self.activity: dict[str, float] = {}  # sandbox id -> time.time() of its last API call or CPU use
        self._cpu: dict[str, int] = {}  # last cpuacct.usage sample, to tell idle from busy
        self._locks: dict[str, asyncio.Lock] = {}
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.audit: Callable[..., Any] = store.append_audit
        self.snapshots = SnapshotStore(settings.data_dir / "snapshots")
        self._snaps: dict[str, dict[str, Any]] | None = None  # cache of the snapshots table
        self.pool: dict[str, list[tuple[str, int]]] = {}  # template -> [(sandbox id, init pid)]
        self._pool_wanted: set[str] = set()
        self._pool_task: asyncio.Task[None] | None = None
        # exec guard: one per sandbox with an exec policy; its decisions reach the audit log in batches
        self.guards: dict[str, ExecGuard] = {}
        self.exec_plans: dict[str, ExecPlan] = {}
        self._runtime_ids: frozenset[tuple[int, int]] | None = None
        self._host_index: ExecIndex | None = None
        self._template_indexes: dict[tuple[str, float], ExecIndex] = {}
        self._guard_q: list[tuple[str, dict[str, Any], float]] = []
        self._guard_lock = threading.Lock()
        self._guard_flush_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.denials: dict[str, collections.deque[tuple[int, m.ExecDenial]]] = {}
        self._denial_n = 0
        self.networks = Networks(settings, store.append_audit_many)

    # ---- helpers -----------------------------------------------------------------------------
    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _record(self, sandbox_id: str) -> SandboxRecord:
        m.check_sandbox_id(sandbox_id)
        rec = self.records.get(sandbox_id)
        if rec is None or rec.deleted_at is not None:
            raise errors.SandboxNotFoundError(f"no sandbox {sandbox_id}")
        return rec

    def touch(self, sandbox_id: str) -> None:
        """API activity: postpones the idle timeout."""
        self.activity[sandbox_id] = time.time()

    async def _running(self, sandbox_id: str) -> float:
        """Make sure the sandbox runs, resuming a paused or starting a stopped one (auto-resume).

        Returns the milliseconds that took (0 when it was running)."""
        rec = self._record(sandbox_id)
        self.touch(sandbox_id)
        if rec.status == "running":
            return 0.0
        t0 = time.perf_counter()
        if rec.status in ("paused", "hibernated"):
            await self.resume(sandbox_id, reason="AutoResumed")
        elif rec.status == "stopped":
            await self.start(sandbox_id, reason="AutoStarted")
        else:
            raise errors.SandboxNotRunningError(f"sandbox {sandbox_id} is {rec.status} ({rec.reason})")
        return (time.perf_counter() - t0) * 1000

    def agent(self, sandbox_id: str) -> AgentClient:
        return AgentClient(self.runtime.socket_path(sandbox_id), sandbox_id)

    def _update(self, rec: SandboxRecord, **values: Any) -> None:
        for k, v in values.items():
            setattr(rec, k, v)
        self.store.update_sandbox(rec.id, **values)

    def info(self, rec: SandboxRecord, timing: m.Timing | None = None) -> m.SandboxInfo:
        policy = SandboxPolicy.model_validate(rec.policy)
        return m.SandboxInfo(
            id=rec.id, template=rec.template, desired=rec.desired, status=rec.status,
            reason=rec.reason, message=rec.message, created_at=rec.created_at, started_at=rec.started_at,
            stopped_at=rec.stopped_at, timeout_at=rec.timeout_at, policy=policy, weakenings=policy.weakenings(),
            metadata=rec.metadata, last_activity_at=self.activity.get(rec.id), timing=timing)

    # ---- templates ---------------------------------------------------------------------------
    def list_templates(self) -> m.TemplateList:
        built = {t.name: t for t in self.templates.list_built()}
        out = []
        for name in sorted(set(images.BUILTIN_TEMPLATES) | set(built)):
            t = built.get(name)
            out.append(m.TemplateInfo(name=name, built=t is not None, description=t.description if t else "",
                                      built_at=t.built_at if t else None, size_bytes=t.size_bytes if t else None,
                                      files=t.files if t else None))
        return m.TemplateList(templates=out)

    async def ensure_template(self, name: str, progress: Callable[[str], None] | None = None,
                              force: bool = False) -> images.TemplateInfo:
        images.validate_template_name(name)
        info = self.templates.get(name)
        if info and not force:
            return info
        if name not in images.BUILTIN_TEMPLATES:
            raise errors.TemplateNotFoundError(f"no template named {name!r}")
        lock = self._template_locks.setdefault(name, asyncio.Lock())
        async with lock:
            info = self.templates.get(name)
            if info and not force:
                return info
            loop = asyncio.get_running_loop()

            def report(line: str) -> None:
                log.info("template %s: %s", name, line)
                if progress:
                    loop.call_soon_threadsafe(progress, line)

            return await asyncio.to_thread(self.templates.build, name, report, force)

    # ---- sandbox lifecycle -------------------------------------------------------------------
    async def create(self, req: m.CreateSandboxRequest, key_id: str | None,
                     progress: Callable[[str], None] | None = None) -> m.SandboxInfo:
        t0 = time.perf_counter()
        policy = SandboxPolicy.model_validate(req.model_dump(exclude={"metadata"}))
        require_consent(policy)
        for v in policy.volumes.values():
            self.get_volume(v.name)
        if policy.hibernatable:
            self.require_hibernation()
        if policy.snapshot:
            snap = self.resolve_snapshot(policy.snapshot)
            policy = policy.model_copy(update={"snapshot": snap["id"], "template": snap["template"]})
        tpl = await self.ensure_template(policy.template, progress)
        plan = await self._exec_plan(policy)
        self.networks.plan(policy)  # refuses unknown secrets and hosts that cannot do networking, before anything exists
        t_tpl = time.perf_counter()
        now = time.time()
        if self._poolable(policy):
            claimed = self._claim(policy, dict(req.metadata), key_id)
            self._pool_wanted.add(policy.template)
            self._kick_pool()
            if claimed is not None:
                return self.info(claimed, m.Timing(total_ms=(time.perf_counter() - t0) * 1000, from_pool=True))
        rec = SandboxRecord(id=new_sandbox_id(), template=policy.template, policy=policy.model_dump(mode="json"),
                            metadata=dict(req.metadata), desired="running", status="creating", reason="Creating",
                            message="", created_at=now, owner_key=key_id)
        self.store.insert_sandbox(rec)
        self.records[rec.id] = rec
        if plan is not None:
            self.exec_plans[rec.id] = plan
        try:
            async with self._lock(rec.id):
                self.runtime.prepare(rec.id, policy)
                timing = await self._boot(rec, policy, self._lowerdirs(policy, tpl.rootfs))
        except BaseException as e:
            log.warning("create %s failed: %s", rec.id, e)
            self._guard_off(rec.id)
            await self.networks.detach(rec.id)
            await self.runtime.destroy(rec.id)
            self._update(rec, status="error", desired="stopped", reason="CreateFailed", message=str(e)[:500],
                         deleted_at=time.time())
            self.records.pop(rec.id, None)
            raise
        timing.template_build_ms = (t_tpl - t0) * 1000
        timing.total_ms = (time.perf_counter() - t0) * 1000
        return self.info(rec, timing)

    # ---- warm pool ---------------------------------------------------------------------------
    # Sandboxes of the default policy, booted ahead for templates in use: a create with that policy
    # (timeouts and metadata may differ) claims one. Pooled sandboxes have no record until claimed,
    # are destroyed when the daemon stops, and are orphans (removed) after a crash.
    _POOL_FREE = ("timeout_s", "idle_timeout_s", "on_idle", "on_timeout")

    def _poolable(self, policy: SandboxPolicy) -> bool:
        if self.settings.warm_pool_size <= 0:
            return False
        base = SandboxPolicy(template=policy.template)
        return policy.model_dump(exclude=set(self._POOL_FREE)) == base.model_dump(exclude=set(self._POOL_FREE))

    def _claim(self, policy: SandboxPolicy, metadata: dict[str, str], key_id: str | None) -> SandboxRecord | None:
        ready = self.pool.get(policy.template) or []
        while ready:
            sid, pid = ready.pop(0)
            if not _alive(pid):
                asyncio.get_running_loop().create_task(self.runtime.destroy(sid))
                continue
            now = time.time()
            rec = SandboxRecord(id=sid, template=policy.template, policy=policy.model_dump(mode="json"),
                                metadata=metadata, desired="running", status="running", reason="Started",
                                message="", created_at=now, started_at=now, owner_key=key_id,
                                timeout_at=now + policy.timeout_s if policy.timeout_s else None)
            self.store.insert_sandbox(rec)
            self.records[sid] = rec
            self.pids[sid] = pid
            self.touch(sid)
            return rec
        return None

    def _kick_pool(self) -> None:
        if self._pool_task is None or self._pool_task.done():
            self._pool_task = asyncio.get_running_loop().create_task(self._fill_pool())

    async def _fill_pool(self) -> None:
        # Let the caller's first commands on the sandbox it just got run before booting the next one:
        # on two cores, a boot in flight would slow them down.
        await asyncio.sleep(0.2)
        for template in sorted(self._pool_wanted):
            ready = self.pool.setdefault(template, [])
            while len(ready) < self.settings.warm_pool_size:
                sid = new_sandbox_id()
                policy = SandboxPolicy(template=template)
                try:
                    tpl = await self.ensure_template(template)
                    self.runtime.prepare(sid, policy)
                    await self.runtime.start(sid, policy, [tpl.rootfs])
                    await self.agent(sid).ping(timeout_s=AGENT_READY_TIMEOUT_S)
                except Exception as e:
                    log.warning("warm pool: could not boot a %s sandbox: %s", template, e)
                    await self.runtime.destroy(sid)
                    return
                ready.append((sid, self.runtime.read_pid(sid) or 0))

    async def drain_pool(self) -> None:
        if self._pool_task is not None:
            self._pool_task.cancel()
            with contextlib.suppress(BaseException):
                await self._pool_task
        for ready in self.pool.values():
            while ready:
                sid, _ = ready.pop()
                await self.runtime.destroy(sid)

    async def _boot(self, rec: SandboxRecord, policy: SandboxPolicy, lowerdirs: list[str],
                    reason: str = "Started") -> m.Timing:
        t0 = time.perf_counter()
        net_plan = self.networks.plan(policy)
        net_dir, net_env = None, None
        try:
            if net_plan is not None:
                root_source = Path("/") if policy.root == "host" else Path(lowerdirs[-1])
                net_dir, net_env = await self.networks.prepare(rec.id, net_plan, self.runtime.dir(rec.id),
                                                               root_source)
            await self.runtime.start(rec.id, policy, lowerdirs, net_dir, net_env)
        except BaseException:
            await self.networks.detach(rec.id)
            raise
        try:
            if net_plan is not None:
                await self.networks.attach(rec.id, self._init_pid(rec.id), net_plan, self.runtime.dir(rec.id))
            await self._guard_on(rec, policy)
        except BaseException:
            await self.networks.detach(rec.id)
            await self.runtime.stop(rec.id)
            raise
        t1 = time.perf_counter()
        try:
            await self.agent(rec.id).ping(timeout_s=AGENT_READY_TIMEOUT_S)
        except errors.CorralError as e:
            tail = self.runtime.agent_log_tail(rec.id)
            self._guard_off(rec.id)
            await self.networks.detach(rec.id)
            await self.runtime.stop(rec.id)
            raise errors.RuntimeUnavailableError(f"the agent of {rec.id} did not start: {e}; {tail}") from None
        t2 = time.perf_counter()
        pid = self.runtime.read_pid(rec.id)
        if pid:
            self.pids[rec.id] = pid
        now = time.time()
        self._update(rec, status="running", desired="running", reason=reason, message="", started_at=now,
                     stopped_at=None, timeout_at=now + policy.timeout_s if policy.timeout_s else None)
        self.touch(rec.id)
        return m.Timing(total_ms=0, runtime_start_ms=(t1 - t0) * 1000, agent_ready_ms=(t2 - t1) * 1000)

    def get(self, sandbox_id: str) -> m.SandboxInfo:
        return self.info(self._record(sandbox_id))

    def list_sandboxes(self) -> m.SandboxList:
        return m.SandboxList(sandboxes=[self.info(r) for r in self.records.values() if r.deleted_at is None])

    async def stop(self, sandbox_id: str, reason: str = "Stopped", message: str = "",
                   desired: str = "stopped") -> m.SandboxInfo:
        rec = self._record(sandbox_id)
        async with self._lock(sandbox_id):
            if rec.status in ("running", "paused", "hibernated", "creating", "error") or \
                    self.runtime.dir(sandbox_id).exists():
                await self.runtime.stop(sandbox_id)
            self._guard_off(sandbox_id)
            await self.networks.detach(sandbox_id)
            self.pids.pop(sandbox_id, None)
            if rec.status != "stopped" or rec.desired != desired:
                self._update(rec, status="stopped", desired=desired, reason=reason, message=message,
                             stopped_at=time.time(), timeout_at=None)
        return self.info(rec)

    async def start(self, sandbox_id: str, reason: str = "Started") -> m.SandboxInfo:
        rec = self._record(sandbox_id)
        if rec.status == "paused":
            return await self.resume(sandbox_id)
        async with self._lock(sandbox_id):
            if rec.status == "running":
                return self.info(rec)
            policy = SandboxPolicy.model_validate(rec.policy)
            tpl = await self.ensure_template(policy.template)
            self.runtime.prepare(rec.id, policy)
            t0 = time.perf_counter()
            try:
                timing = await self._boot(rec, policy, self._lowerdirs(policy, tpl.rootfs), reason)
            except errors.CorralError as e:
                self._update(rec, status="stopped", reason="StartFailed", message=str(e)[:500])
                raise
            timing.total_ms = (time.perf_counter() - t0) * 1000
            return self.info(rec, timing)

    def _init_pid(self, sandbox_id: str) -> int:
        pid = self.runtime.read_pid(sandbox_id)
        if not pid:
            raise errors.RuntimeUnavailableError(f"sandbox {sandbox_id} has no init process")
        return pid

    async def update_network(self, sandbox_id: str, req: m.NetworkUpdate) -> m.SandboxInfo:
        """Change the allow/deny lists of a networked sandbox; new connections (and DNS answers) follow
        the new lists at once, open connections keep going."""
        rec = self._record(sandbox_id)
        async with self._lock(sandbox_id):
            policy = SandboxPolicy.model_validate(rec.policy)
            if policy.network is None:
                raise errors.PolicyRejectedError(
                    f"sandbox {sandbox_id} was created without a network",
                    hint="networking is wired when a sandbox boots: create one with network={'allow': [...]}")
            net = policy.network.model_copy(update={k: v for k, v in (("allow", req.allow), ("deny", req.deny))
                                                    if v is not None})
            try:
                new = SandboxPolicy.model_validate({**policy.model_dump(mode="json"),
                                                    "network": net.model_dump(mode="json")})
            except ValueError as e:
                raise errors.InvalidRequestError(_first_error(e)) from None
            plan = self.networks.plan(new)
            assert plan is not None
            self._update(rec, policy=new.model_dump(mode="json"))
            self.networks.update(sandbox_id, plan)
        self.touch(sandbox_id)
        return self.info(rec)

    def require_hibernation(self) -> None:
        from corral.runtimes import probe

        feat = probe.hibernation()  # only this feature: the full probe runs several processes
        if not feat.available:
            raise errors.RuntimeUnavailableError(
                f"hibernation is not available on this host: {feat.detail}",
                hint="use pause (in memory) or stop instead; `corral doctor` shows what hibernation needs")

    async def pause(self, sandbox_id: str, to_disk: bool = False, reason: str = "Paused") -> m.SandboxInfo:
        """Freeze every process of the sandbox: memory kept, zero CPU. to_disk=True hibernates."""
        rec = self._record(sandbox_id)
        if to_disk:
            self.require_hibernation()
            if not SandboxPolicy.model_validate(rec.policy).hibernatable:
                raise errors.PolicyRejectedError(
                    f"sandbox {sandbox_id} was not created hibernatable",
                    hint="create it with hibernatable=true (or on_idle='hibernate'); pause() keeps it in memory")
        t0 = time.perf_counter()
        async with self._lock(sandbox_id):
            if rec.status == "hibernated" or (rec.status == "paused" and not to_disk):
                return self.info(rec)
            if rec.status not in ("running", "paused"):
                raise errors.SandboxNotRunningError(f"sandbox {sandbox_id} is {rec.status}; only a running "
                                                    "sandbox can be paused")
            if to_disk:
                if rec.status == "paused":
                    await self.runtime.resume(sandbox_id)
                await self.agent(sandbox_id).request({"op": "dumpable", "value": True})
                # CRIU cannot carry the veth: the namespace goes to disk with loopback only and is
                # wired again (same address) on restore.
                net_plan = self.networks.plans.get(sandbox_id)
                await self.networks.detach(sandbox_id)
                try:
                    await self.runtime.checkpoint(sandbox_id)
                except BaseException:
                    try:
                        if net_plan is not None:
                            await self.networks.attach(sandbox_id, self._init_pid(sandbox_id), net_plan,
                                                       self.runtime.dir(sandbox_id))
                    finally:
                        await self.agent(sandbox_id).request({"op": "dumpable", "value": False})
                    raise
                self._guard_off(sandbox_id)
                self.pids.pop(sandbox_id, None)
                self._update(rec, status="hibernated", desired="paused", reason=reason.replace("Paused", "Hibernated")
                             if reason != "Paused" else "Hibernated", message="processes checkpointed to disk")
            else:
                await self.runtime.pause(sandbox_id)
                self._update(rec, status="paused", desired="paused", reason=reason, message="")
        return self.info(rec, m.Timing(total_ms=(time.perf_counter() - t0) * 1000))

    async def resume(self, sandbox_id: str, reason: str = "Resumed") -> m.SandboxInfo:
        rec = self._record(sandbox_id)
        if rec.status == "stopped":
            return await self.start(sandbox_id)
        t0 = time.perf_counter()
        async with self._lock(sandbox_id):
            if rec.status == "paused":
                await self.runtime.resume(sandbox_id)
                self._update(rec, status="running", desired="running", reason=reason, message="")
            elif rec.status == "hibernated":
                policy = SandboxPolicy.model_validate(rec.policy)
                tpl = await self.ensure_template(policy.template)
                net_plan = self.networks.plan(policy)
                await self.runtime.restore(sandbox_id, policy, self._lowerdirs(policy, tpl.rootfs))
                what = "the network could not be wired"
                try:
                    if net_plan is not None:
                        await self.networks.attach(sandbox_id, self._init_pid(sandbox_id), net_plan,
                                                   self.runtime.dir(sandbox_id))
                    what = "the exec guard could not be armed again"
                    await self._guard_on(rec, policy)
                    what = "its processes could not be continued"
                    await self.runtime.continue_restored(sandbox_id)  # only now: policy back in force
                except BaseException:
                    await self.networks.detach(sandbox_id)
                    await self.runtime.stop(sandbox_id)
                    self._update(rec, status="stopped", desired="stopped", reason="RestoreFailed",
                                 message=what, stopped_at=time.time())
                    raise
                await self.agent(sandbox_id).ping(timeout_s=AGENT_READY_TIMEOUT_S)
                await self.agent(sandbox_id).request({"op": "dumpable", "value": False})
                pid = self.runtime.read_pid(sandbox_id)
                if pid:
                    self.pids[sandbox_id] = pid
                self._update(rec, status="running", desired="running", reason=reason.replace("Resumed", "Restored")
                             if reason == "Resumed" else reason, message="")
        self.touch(sandbox_id)
        return self.info(rec, m.Timing(total_ms=(time.perf_counter() - t0) * 1000))

    def update(self, sandbox_id: str, req: m.UpdateSandboxRequest) -> m.SandboxInfo:
        """Extend or change timeouts while the sandbox lives; timeout_s counts from now."""
        rec = self._record(sandbox_id)
        policy = dict(rec.policy)
        values: dict[str, Any] = {}
        if req.timeout_s is not None:
            policy["timeout_s"] = req.timeout_s
            if rec.status in ("running", "paused"):
                values["timeout_at"] = time.time() + req.timeout_s
        if req.idle_timeout_s is not None:
            policy["idle_timeout_s"] = req.idle_timeout_s
        SandboxPolicy.model_validate(policy)
        self._update(rec, policy=policy, **values)
        self.touch(sandbox_id)
        return self.info(rec)

    # ---- snapshots ---------------------------------------------------------------------------
    def _snapshot_rows(self) -> dict[str, dict[str, Any]]:
        if self._snaps is None:
            self._snaps = {r["id"]: r for r in self.store.list_snapshots()}
        return self._snaps

    def resolve_snapshot(self, ref: str) -> dict[str, Any]:
        rows = self._snapshot_rows()
        row = rows.get(ref) or next((r for r in rows.values() if r["name"] == ref), None)
        if row is None:
            raise errors.SnapshotNotFoundError(f"no snapshot {ref!r}")
        return row

    def _chain(self, snapshot_id: str) -> list[str]:
        rows, chain = self._snapshot_rows(), []
        cur: str | None = snapshot_id
        while cur is not None and cur in rows and cur not in chain:
            chain.append(cur)
            cur = rows[cur]["parent"]
        return chain

    def _lowerdirs(self, policy: SandboxPolicy, template_rootfs: str) -> list[str]:
        layers = [str(self.snapshots.layer(s)) for s in self._chain(policy.snapshot)] if policy.snapshot else []
        return [*layers, template_rootfs]

    def _snapshot_info(self, row: dict[str, Any], timing_ms: float | None = None) -> m.SnapshotInfo:
        users = [r.id for r in self.records.values()
                 if r.deleted_at is None and row["id"] in self._chain(str(r.policy.get("snapshot") or ""))]
        users += [s["id"] for s in self._snapshot_rows().values() if s["parent"] == row["id"]]
        return m.SnapshotInfo(id=row["id"], name=row["name"], sandbox_id=row["sandbox_id"], template=row["template"],
                              parent=row["parent"], created_at=row["created_at"], files=row["files"],
                              size_bytes=row["size_bytes"], new_bytes=row["new_bytes"], in_use_by=users,
                              timing_ms=timing_ms)

    async def snapshot(self, sandbox_id: str, name: str | None) -> m.SnapshotInfo:
        """Capture the sandbox's files; a running sandbox is frozen meanwhile for a consistent copy."""
        rec = self._record(sandbox_id)
        if name and any(r["name"] == name for r in self._snapshot_rows().values()):
            raise errors.ConflictError(f"a snapshot named {name!r} exists", hint="pick another name or delete it")
        snap_id = "snap-" + secrets.token_hex(6)
        t0 = time.perf_counter()
        async with self._lock(sandbox_id):
            policy = SandboxPolicy.model_validate(rec.policy)
            if policy.root == "host":
                raise errors.InvalidRequestError("host-root sandboxes have no layer to snapshot")
            froze = rec.status == "running"
            if froze:
                await self.runtime.pause(sandbox_id)
            stopped = rec.status == "stopped"
            try:
                self.runtime.mount_disk(sandbox_id)
                stats = await asyncio.to_thread(self.snapshots.capture, snap_id, self.runtime.upper_dir(sandbox_id),
                                                self.runtime.dir(sandbox_id) / "snapshot-cache.json")
            finally:
                if froze:
                    await self.runtime.resume(sandbox_id)
                if stopped:
                    self.runtime.unmount_disk(sandbox_id)
        row = {"id": snap_id, "name": name, "sandbox_id": sandbox_id, "template": rec.template,
               "parent": policy.snapshot, "created_at": time.time(), "files": stats.files,
               "size_bytes": stats.size_bytes, "new_bytes": stats.new_bytes}
        self.store.insert_snapshot(**row)
        self._snaps = None
        return self._snapshot_info({**row, "deleted_at": None}, (time.perf_counter() - t0) * 1000)

    def list_snapshots(self) -> m.SnapshotList:
        return m.SnapshotList(snapshots=[self._snapshot_info(r) for r in self._snapshot_rows().values()])

    def get_snapshot(self, ref: str) -> m.SnapshotInfo:
        return self._snapshot_info(self.resolve_snapshot(ref))

    async def delete_snapshot(self, ref: str) -> None:
        info = self.get_snapshot(ref)
        if info.in_use_by:
            raise errors.ConflictError(f"snapshot {info.id} is in use by {', '.join(info.in_use_by)}",
                                       hint="delete those sandboxes and snapshots first")
        self.store.delete_snapshot(info.id)
        self._snaps = None
        await asyncio.to_thread(self.snapshots.remove, info.id)

    # ---- volumes -----------------------------------------------------------------------------
    def _volume_info(self, row: dict[str, Any]) -> m.VolumeInfo:
        usage = self.runtime.volume_usage(row["name"])
        users = [r.id for r in self.records.values() if r.deleted_at is None
                 and any(v.get("name") == row["name"] for v in (r.policy.get("volumes") or {}).values())]
        return m.VolumeInfo(name=row["name"], size_mib=row["size_mib"], created_at=row["created_at"],
                            used_bytes=usage.used_bytes if usage else None, attached_to=users)

    async def create_volume(self, req: m.VolumeCreate) -> m.VolumeInfo:
        if any(v["name"] == req.name for v in self.store.list_volumes()):
            raise errors.ConflictError(f"a volume named {req.name!r} exists")
        await asyncio.to_thread(self.runtime.create_volume, req.name, req.size_mib)
        self.store.insert_volume(req.name, req.size_mib)
        return self.get_volume(req.name)

    def list_volumes(self) -> m.VolumeList:
        return m.VolumeList(volumes=[self._volume_info(v) for v in self.store.list_volumes()])

    def get_volume(self, name: str) -> m.VolumeInfo:
        row = next((v for v in self.store.list_volumes() if v["name"] == name), None)
        if row is None:
            raise errors.VolumeNotFoundError(f"no volume {name!r}")
        return self._volume_info(row)

    async def delete_volume(self, name: str) -> None:
        info = self.get_volume(name)
        if info.attached_to:
            raise errors.ConflictError(f"volume {name} is attached to {', '.join(info.attached_to)}",
                                       hint="delete those sandboxes first; volumes are deleted only on request")
        await asyncio.to_thread(self.runtime.remove_volume, name)
        self.store.delete_volume(name)

    # ---- backups -----------------------------------------------------------------------------
    def _tmp(self) -> Path:
        d = self.settings.data_dir / "tmp"
        d.mkdir(mode=0o700, exist_ok=True)
        return d / f"{secrets.token_hex(8)}"

    async def export_backup(self, ref: str) -> Path:
        """Write a backup archive of a sandbox (sb-…) or a snapshot to a temp file; the caller deletes it."""
        out = self._tmp().with_suffix(".tar.gz")
        temp_layer: str | None = None
        if ref.startswith("sb-"):
            rec = self._record(ref)
            policy = SandboxPolicy.model_validate(rec.policy)
            if policy.root == "host":
                raise errors.InvalidRequestError("host-root sandboxes have no layer to back up")
            temp_layer = "tmp-" + secrets.token_hex(6)
            async with self._lock(ref):
                froze = rec.status == "running"
                if froze:
                    await self.runtime.pause(ref)
                try:
                    self.runtime.mount_disk(ref)
                    await asyncio.to_thread(self.snapshots.capture, temp_layer, self.runtime.upper_dir(ref))
                finally:
                    if froze:
                        await self.runtime.resume(ref)
                    if rec.status == "stopped":
                        self.runtime.unmount_disk(ref)
            chain = (self._chain(policy.snapshot) if policy.snapshot else [])
            layers = [self.snapshots.layer(s) for s in reversed(chain)] + [self.snapshots.layer(temp_layer)]
            meta: dict[str, Any] = {"kind": "sandbox", "source": ref, "template": rec.template,
                                    "policy": {**rec.policy, "snapshot": None}, "metadata": rec.metadata}
        else:
            row = self.resolve_snapshot(ref)
            layers = [self.snapshots.layer(s) for s in reversed(self._chain(row["id"]))]
            meta = {"kind": "snapshot", "source": row["id"], "template": row["template"], "policy": None,
                    "metadata": {}}
        try:
            with open(out, "wb") as f:
                await asyncio.to_thread(backup.export, f, layers, meta)
        finally:
            if temp_layer:
                await asyncio.to_thread(self.snapshots.remove, temp_layer)
        return out

    async def import_backup(self, archive: Path) -> m.ImportResult:
        staging = self._tmp()
        try:
            with open(archive, "rb") as f:
                meta, layers = await asyncio.to_thread(backup.import_archive, f, staging)
            template = str(meta.get("template"))
            try:
                images.validate_template_name(template)
            except errors.InvalidRequestError:
                raise errors.InvalidRequestError(f"the backup names template {template[:80]!r}, which is not a "
                                                 "template name") from None
            if template not in images.BUILTIN_TEMPLATES and self.templates.get(template) is None:
                raise errors.TemplateNotFoundError(f"the backup needs template {template!r}, unknown here")
            policy: SandboxPolicy | None = None
            dropped: list[str] = []
            if meta.get("kind") == "sandbox":
                try:
                    policy = SandboxPolicy.model_validate({**(meta.get("policy") or {}), "template": template})
                except ValueError as e:
                    raise errors.InvalidRequestError(f"the backup's policy is not valid here: {e}") from None
                # Volumes are not in backups; attachments to volumes this host lacks are dropped (and said).
                known = {v["name"] for v in self.store.list_volumes()}
                dropped = sorted({v.name for v in policy.volumes.values()} - known)
                policy = policy.model_copy(update={"volumes": {p: v for p, v in policy.volumes.items() if v.name in known}})
            snaps: list[m.SnapshotInfo] = []
            parent: str | None = None
            for layer in layers:
                snap_id = "snap-" + secrets.token_hex(6)
                stats = await asyncio.to_thread(self.snapshots.capture, snap_id, layer)
                row = {"id": snap_id, "name": None, "sandbox_id": str(meta.get("source", ""))[:64],
                       "template": template, "parent": parent, "created_at": time.time(), "files": stats.files,
                       "size_bytes": stats.size_bytes, "new_bytes": stats.new_bytes}
                self.store.insert_snapshot(**row)
                self._snaps = None
                snaps.append(self._snapshot_info({**row, "deleted_at": None}))
                parent = snap_id
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        sandbox = None
        if policy is not None:
            policy = policy.model_copy(update={"snapshot": parent})
            raw_md = meta.get("metadata")
            md: dict[str, Any] = raw_md if isinstance(raw_md, dict) else {}
            rec = SandboxRecord(id=new_sandbox_id(), template=template, policy=policy.model_dump(mode="json"),
                                metadata={str(k)[:64]: str(v)[:256] for k, v in list(md.items())[:64]},
                                desired="stopped", status="stopped", reason="Imported",
                                message=f"imported from a backup of {str(meta.get('source'))[:64]}"
                                + (f"; volumes not on this host were not attached: {', '.join(dropped)}" if dropped else ""),
                                created_at=time.time())
            self.store.insert_sandbox(rec)
            self.records[rec.id] = rec
            sandbox = self.info(rec)
        return m.ImportResult(kind="sandbox" if sandbox else "snapshot", snapshots=snaps, sandbox=sandbox)

    async def delete(self, sandbox_id: str) -> None:
        rec = self._record(sandbox_id)
        async with self._lock(sandbox_id):
            await self.runtime.destroy(sandbox_id)
            self._guard_off(sandbox_id)
            await self.networks.detach(sandbox_id)
            self.exec_plans.pop(sandbox_id, None)
            self.denials.pop(sandbox_id, None)
            self.pids.pop(sandbox_id, None)
            self._update(rec, status="stopped", desired="stopped", reason="Deleted", deleted_at=time.time())
            self.records.pop(sandbox_id, None)
        self._locks.pop(sandbox_id, None)

    # ---- commands ----------------------------------------------------------------------------
    def _exec_req(self, req: m.ExecRequest) -> dict[str, Any]:
        if req.cwd is not None:
            check_path(req.cwd)
        return {"cmd": req.cmd, "argv": req.argv, "env": req.env, "cwd": req.cwd, "user": req.user,
                "timeout_s": req.timeout_s, "background": req.background, "tag": req.tag, "pty": req.pty}

    async def exec(self, sandbox_id: str, req: m.ExecRequest) -> m.ExecResult:
        resume_ms = await self._running(sandbox_id)
        t0 = time.perf_counter()
        agent = self.agent(sandbox_id)
        if req.background:
            # Background commands keep stdin open so callers can feed it later (send_stdin).
            r = await agent.request({**self._exec_req(req), "op": "exec", "stdin": True})
            if req.stdin is not None:
                await agent.send_stdin(int(r["pid"]), req.stdin.encode(), eof=True)
            return m.ExecResult(pid=int(r["pid"]), background=True, duration_ms=(time.perf_counter() - t0) * 1000,
                                resume_ms=resume_ms)
        mark = self._denial_n
        try:
            res = await agent.exec_collect(self._exec_req(req), self.settings.max_output_bytes,
                                           stdin=req.stdin.encode() if req.stdin is not None else None)
        except errors.InvalidRequestError as e:
            # argv mode: the agent could not exec the program itself. A denial is data, like a shell's 126.
            denials = self._denials_since(sandbox_id, mark)
            if not denials or "cannot execute" not in e.message:
                raise
            return m.ExecResult(pid=0, stderr=f"{e.message} (exec policy: {denials[-1].rule})\n", exit_code=126,
                                duration_ms=(time.perf_counter() - t0) * 1000, resume_ms=resume_ms, denials=denials)
        return m.ExecResult(pid=int(res["pid"] or 0), stdout=res["stdout"].decode(errors="replace"),
                            stderr=res["stderr"].decode(errors="replace"), exit_code=res["exit_code"],
                            signal=res["signal"], timed_out=res["timed_out"], truncated_bytes=res["truncated_bytes"],
                            duration_ms=(time.perf_counter() - t0) * 1000, resume_ms=resume_ms,
                            denials=self._denials_since(sandbox_id, mark))

    async def exec_stream(self, sandbox_id: str, req: m.ExecRequest) -> tuple[AgentConnection, int]:
        await self._running(sandbox_id)
        conn, start = await self.agent(sandbox_id).exec_stream(
            {**self._exec_req(req), "op": "exec", "stdin": True})
        if req.stdin:
            await conn.send(P.STDIN, req.stdin.encode())
        return conn, int(start["pid"])

    async def attach(self, sandbox_id: str, pid: int) -> tuple[AgentConnection, int]:
        await self._running(sandbox_id)
        conn, start = await self.agent(sandbox_id).exec_stream({"op": "attach", "pid": pid, "replay": True})
        return conn, int(start["pid"])

    async def processes(self, sandbox_id: str) -> m.ProcessList:
        await self._running(sandbox_id)
        r = await self.agent(sandbox_id).request({"op": "processes"})
        return m.ProcessList(processes=[m.ProcessInfo.model_validate(p) for p in r.get("processes", [])])

    async def signal(self, sandbox_id: str, pid: int, sig: int) -> None:
        await self._running(sandbox_id)
        await self.agent(sandbox_id).request({"op": "signal", "pid": pid, "signal": sig})

    async def stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None:
        await self._running(sandbox_id)
        await self.agent(sandbox_id).send_stdin(pid, data, eof)

    # ---- files -------------------------------------------------------------------------------
    async def open_read(self, sandbox_id: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        await self._running(sandbox_id)
        agent = self.agent(sandbox_id)
        limit = self.settings.max_upload_bytes
        conn, size = await agent.open_read(check_path(path), limit)

        async def capped() -> AsyncIterator[bytes]:
            sent = 0
            async for chunk in agent.iter_read(conn):
                chunk = chunk[: max(0, limit - sent)]
                if chunk:
                    sent += len(chunk)
                    yield chunk
                if sent >= limit:
                    log.warning("download of %s from %s stopped at the %d-byte limit", path, sandbox_id, limit)
                    break

        return size, capped()

    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes], mode: int = 0o644) -> m.WriteResult:
        await self._running(sandbox_id)
        r = await self.agent(sandbox_id).write_file(check_path(path), chunks, mode)
        return m.WriteResult(path=str(r.get("path", path)), size=int(r.get("size", 0)))

    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        await self._running(sandbox_id)
        for k in ("path", "src", "dst"):
            if k in args:
                check_path(args[k])
        return await self.agent(sandbox_id).request({"op": op, **args}, timeout_s=120)

    # ---- audit -------------------------------------------------------------------------------
    def audit_list(self, target: str | None, after_seq: int, limit: int, kind: str | None = None,
                   since: float | None = None, until: float | None = None) -> m.AuditList:
        if target and target.startswith("sb-") and target in self.guards:
            self.flush_guard_events()
        self.networks.flush()
        rows = self.store.audit_entries(target=target, after_seq=after_seq, limit=limit, kind=kind, since=since,
                                        until=until)
        return m.AuditList(records=[m.AuditRecord.model_validate(r.to_dict()) for r in rows])

    def audit_tail(self) -> int:
        self.flush_guard_events()
        self.networks.flush()
        return self.store.audit_last_seq()

    def audit_verify(self) -> m.AuditVerify:
        r = chain.verify(self.store.iter_audit())
        return m.AuditVerify(ok=r.ok, records=r.records, first_bad_seq=r.first_bad_seq, message=r.message)

    # ---- secrets -----------------------------------------------------------------------------
    @staticmethod
    def _secret_info(info: Any) -> m.SecretInfo:
        b = info.binding
        return m.SecretInfo(name=info.name, hosts=list(b.hosts), injection=b.injection, env=b.env,
                            allow_requests=list(b.allow_requests), placeholder=info.placeholder)

    def set_secret(self, name: str, req: m.SecretSet) -> m.SecretInfo:
        try:
            binding = SecretBinding(name=name, hosts=tuple(req.hosts), injection=req.injection, env=req.env,
                                    allow_requests=tuple(req.allow_requests))
        except ValueError as e:
            raise errors.InvalidRequestError(f"secret {name!r}: {_first_error(e)}") from None
        info = self._secret_info(self.networks.set_secret(binding, req.value.get_secret_value()))
        # Running sandboxes that use it follow the new binding (hosts, injection, request rules) at once.
        for sid in self._secret_users(name):
            if sid in self.networks.plans:
                plan = self.networks.plan(SandboxPolicy.model_validate(self.records[sid].policy))
                if plan is not None:
                    self.networks.update(sid, plan)
        return info

    def _secret_users(self, name: str) -> list[str]:
        return [r.id for r in self.records.values() if r.deleted_at is None and name in r.policy.get("secrets", [])]

    def list_secrets(self) -> m.SecretList:
        return m.SecretList(secrets=[self._secret_info(i) for i in self.networks.list_secrets()])

    def delete_secret(self, name: str) -> None:
        users = self._secret_users(name)
        if users:
            raise errors.ConflictError(
                f"secret {name!r} is used by {len(users)} sandbox(es): {', '.join(sorted(users)[:5])}",
                hint="delete those sandboxes first (their policy names the secret), or `corral secret set` it "
                     "again to change its value or hosts")
        self.networks.delete_secret(name)

    # ---- exec guard --------------------------------------------------------------------------
    async def _exec_plan(self, policy: SandboxPolicy) -> ExecPlan | None:
        """Compile the sandbox's exec policy against its template's executables (fail closed: a policy
        this host cannot enforce refuses the sandbox)."""
        ep = policy.exec_policy
        if ep.mode == "off":
            return None
        ok, why = exec_kernel.available()
        if not ok:
            raise errors.RuntimeUnavailableError(f"this sandbox has an exec policy, but {why}",
                                                 hint="`corral doctor` shows the exec guard's backend")
        if policy.root == "host":
            named = [e for e in [*ep.deny, *(ep.allow or [])] if not e.startswith("sha256:")]
            if named and self._host_index is None:  # hashing the host's programs takes a while: only if needed
                self._host_index = await asyncio.to_thread(exec_index.host_index)
            idx = self._host_index if named and self._host_index else ExecIndex(complete=False)
        else:
            tpl = self.templates.get(policy.template)
            if tpl is None:
                raise errors.TemplateNotFoundError(f"template {policy.template} is not built")
            key = (policy.template, tpl.built_at)
            if key not in self._template_indexes:  # read (or built) once per template build, not per create
                self._template_indexes[key] = await asyncio.to_thread(
                    exec_index.load_or_build, self.templates.path(policy.template), Path(tpl.rootfs), tpl.built_at)
            idx = self._template_indexes[key]
        return compile_exec(ep, idx, template=policy.template if policy.root != "host" else "")

    def _guard_holder_file(self, sandbox_id: str) -> Path:
        return self.runtime.dir(sandbox_id) / "run" / "guard.pid"

    async def _guard_on(self, rec: SandboxRecord, policy: SandboxPolicy, adopt: bool = False) -> None:
        plan = self.exec_plans.get(rec.id)
        if plan is None:
            plan = await self._exec_plan(policy)
            if plan is None:
                return
            self.exec_plans[rec.id] = plan
        self._loop = asyncio.get_running_loop()
        self._guard_off(rec.id, keep_holder=adopt)
        pid = self.runtime.read_pid(rec.id)
        if not pid:
            raise errors.RuntimeUnavailableError(f"sandbox {rec.id} has no init process to guard")
        if self._runtime_ids is None:
            self._runtime_ids = await asyncio.to_thread(exec_index.runtime_identities, self.runtime.agent_runtime)
        guard = ExecGuard(rec.id, plan, self._guard_sink, self._runtime_ids)
        holder = self._guard_holder_file(rec.id)
        how = "armed"
        try:
            if adopt and holder.exists():
                hpid = int(holder.read_text() or 0)
                if is_holder(hpid):
                    # Its group may hold execs waiting for an answer: if it cannot be taken back, the
                    # sandbox stops (a new group would not see them, and closing the old one allows them).
                    guard.adopt(hpid)
                    how = "adopted"
                else:
                    log.warning("exec guard of %s: its holder is gone; arming a new one", rec.id)
                    holder.unlink(missing_ok=True)
                    how = "rearmed"
            if how != "adopted":
                mounts = await asyncio.to_thread(guard.arm, pid)
                if plan.mode == "enforce":
                    await set_memfd_noexec(pid)
        except Exception as e:
            guard.close()
            raise errors.RuntimeUnavailableError(f"the exec guard of {rec.id} could not be armed: {e}",
                                                 hint="`corral doctor` shows what the exec guard needs") from None
        if guard.holder_pid:
            holder.write_text(f"{guard.holder_pid}\n")
        self.guards[rec.id] = guard
        detail: dict[str, Any] = {"kind": "guard", "mode": plan.mode, "backend": "fanotify", "how": how,
                                  "deny_hashes": len(plan.deny),
                                  "allow_hashes": None if plan.allow is None else len(plan.allow)}
        if how != "adopted":
            detail["mounts"] = mounts
        self.audit(None, "exec.guard", rec.id, how, detail)

    def _guard_off(self, sandbox_id: str, keep_holder: bool = False) -> None:
        guard = self.guards.pop(sandbox_id, None)
        if guard is not None:
            guard.close(keep_holder=keep_holder)
        if keep_holder:
            return
        holder = self._guard_holder_file(sandbox_id)
        if holder.exists():  # left by an earlier daemon
            with contextlib.suppress(OSError, ValueError):
                pid = int(holder.read_text())
                if is_holder(pid):
                    os.kill(pid, signal.SIGKILL)
            holder.unlink(missing_ok=True)

    def close_guards(self) -> None:
        """Daemon shutdown: stop answering but keep enforce-mode groups held, so execs in those
        sandboxes wait for the next daemon instead of running unguarded."""
        for sid in list(self.guards):
            self._guard_off(sid, keep_holder=True)
        self.flush_guard_events()

    def _guard_sink(self, sandbox_id: str, detail: dict[str, Any]) -> None:
        """Called on a guard's thread for every decision."""
        with self._guard_lock:
            self._guard_q.append((sandbox_id, detail, time.time()))
            if self._guard_flush_pending or self._loop is None:
                return
            self._guard_flush_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closing
            # Batched: an exec-heavy sandbox makes thousands of decisions a second, and every wakeup of
            # the loop competes with the guard for the GIL. Readers (exec results, audit queries) flush first.
            self._loop.call_soon_threadsafe(self._loop.call_later, 0.05, self.flush_guard_events)

    def flush_guard_events(self) -> None:
        with self._guard_lock:
            items, self._guard_q = self._guard_q, []
            self._guard_flush_pending = False
        if not items:
            return
        entries = self.store.append_audit_many(
            [(None, "exec.guard" if d.get("kind") == "guard" else "exec.decision", sid, str(d.get("verdict", "")),
              d, ts) for sid, d, ts in items])
        for e in entries:
            if e.action == "exec.decision" and e.result in ("deny", "would-deny", "killed") and e.target:
                self._denial_n += 1
                d = e.detail
                self.denials.setdefault(e.target, collections.deque(maxlen=64)).append((self._denial_n, m.ExecDenial(
                    path=str(d.get("path", "?")), sha256=d.get("sha256"), rule=str(d.get("rule", "")),
                    verdict=e.result, pid=d.get("pid"), audit_seq=e.seq)))
            if e.action == "exec.guard" and e.result == "error" and e.target:
                self._guard_failed(e.target, str(e.detail.get("message", e.detail.get("rule", ""))))

    def _guard_failed(self, sandbox_id: str, why: str) -> None:
        """A guard that stopped answering: in enforce mode the sandbox stops (fail closed)."""
        plan = self.exec_plans.get(sandbox_id)
        if plan is None or plan.mode != "enforce" or self._loop is None:
            return
        log.error("exec guard of %s failed (%s): stopping the sandbox", sandbox_id, why)
        self._loop.create_task(self.stop(sandbox_id, reason="ExecGuardFailed", message=why[:500]))

    def _denials_since(self, sandbox_id: str, mark: int) -> list[m.ExecDenial]:
        if sandbox_id not in self.guards:
            return []
        self.flush_guard_events()
        return [d for n, d in self.denials.get(sandbox_id, ()) if n > mark]

    # ---- reconciliation ----------------------------------------------------------------------
    async def reconcile_startup(self) -> dict[str, list[str]]:
        """After a restart (also after kill -9): re-adopt live sandboxes, mark dead ones, clean orphans."""
        report: dict[str, list[str]] = {"adopted": [], "marked_stopped": [], "orphans_removed": [],
                                        "partial_templates_removed": []}
        report["partial_templates_removed"] = self.templates.cleanup_partial()
        for name in await asyncio.to_thread(self.templates.clear_setuid):
            log.info("template %s: setuid/setgid bits cleared (layers on the host carry none)", name)
        await self.networks.start()
        live = {c.sandbox_id: c for c in await self.runtime.list_containers()}
        for rec in list(self.records.values()):
            c = live.get(rec.id)
            if rec.status == "hibernated":
                if c is not None:  # a checkpoint leaves no container; one here is stale
                    await self.runtime.stop(rec.id)
                report["adopted"].append(rec.id)
                continue
            if rec.status in ("running", "paused", "creating"):
                alive = False
                if c is not None and c.status == "paused" and rec.status == "paused":
                    if c.pid:
                        self.pids[rec.id] = c.pid
                    if await self._readopt_guard(rec) and await self._readopt_network(rec):
                        report["adopted"].append(rec.id)
                        continue
                if c is not None and c.status == "running":
                    try:
                        await self.agent(rec.id).ping(timeout_s=3)
                        alive = True
                    except errors.CorralError:
                        alive = False
                if alive and rec.status == "running":
                    if c is not None and c.pid:
                        self.pids[rec.id] = c.pid
                    if await self._readopt_guard(rec) and await self._readopt_network(rec):
                        report["adopted"].append(rec.id)
                        continue
                self._guard_off(rec.id)
                await self.networks.detach(rec.id)
                await self.runtime.stop(rec.id)
                self._update(rec, status="stopped", desired="stopped", reason="LostWhileDaemonDown",
                             message="the sandbox was not running when the daemon came back", stopped_at=time.time())
                report["marked_stopped"].append(rec.id)
            elif c is not None:
                await self.runtime.stop(rec.id)
        known = set(self.records)
        for cid in live:
            if cid.startswith("sb-") and cid not in known:
                await self.runtime.destroy(cid)
                report["orphans_removed"].append(f"container {cid}")
        if self.runtime.sandboxes.is_dir():
            for d in self.runtime.sandboxes.iterdir():
                if d.name.startswith("sb-") and d.name not in known:
                    self._guard_off(d.name)
                    await self.runtime.destroy(d.name)
                    report["orphans_removed"].append(f"directory {d.name}")
        for cg in self.runtime.cgroup_ids():
            if cg in known and self.records[cg].status != "running":
                self.runtime.remove_cgroups(cg)
                report["orphans_removed"].append(f"cgroup {cg}")
            elif cg not in known and (self.runtime.sandboxes / cg).exists() is False and cg.startswith("sb-") \
                    and not self.runtime.cgroup_has_tasks(cg):
                self.runtime.remove_cgroups(cg)
                report["orphans_removed"].append(f"cgroup {cg}")
        return report

    async def _readopt_guard(self, rec: SandboxRecord) -> bool:
        """Take back the exec guard of a sandbox that outlived the daemon. False: it cannot be guarded
        any more (the caller stops it: fail closed)."""
        policy = SandboxPolicy.model_validate(rec.policy)
        if policy.exec_policy.mode == "off":
            return True
        try:
            await self._guard_on(rec, policy, adopt=True)
            return True
        except errors.CorralError as e:
            log.error("sandbox %s: %s; stopping it", rec.id, e)
            return False

    async def _readopt_network(self, rec: SandboxRecord) -> bool:
        """Wire a sandbox that outlived the daemon again (its veth was removed at start: the proxy
        it pointed to is gone). False: it cannot be (the caller stops it)."""
        policy = SandboxPolicy.model_validate(rec.policy)
        if policy.network is None:
            return True
        try:
            plan = self.networks.plan(policy)
            assert plan is not None
            await self.networks.attach(rec.id, self._init_pid(rec.id), plan, self.runtime.dir(rec.id))
            return True
        except errors.CorralError as e:
            log.error("sandbox %s: %s; stopping it", rec.id, e)
            return False

    async def tick(self) -> None:
        """One pass of the lifecycle loop: wall-clock timeouts, idle sandboxes, sandboxes that died."""
        now = time.time()
        for rec in list(self.records.values()):
            if rec.status not in ("running", "paused", "hibernated"):
                continue
            policy = SandboxPolicy.model_validate(rec.policy)
            if rec.timeout_at and now >= rec.timeout_at:
                log.info("sandbox %s reached its timeout (%s)", rec.id, policy.on_timeout)
                self.audit(None, "sandbox.timeout", rec.id, policy.on_timeout, {"timeout_s": policy.timeout_s})
                await self._act(rec, policy.on_timeout, "Timeout", "the sandbox reached timeout_s")
                continue
            if rec.status == "hibernated":
                continue
            pid = self.pids.get(rec.id)
            if pid and not _alive(pid):
                oom = self.runtime.memory_events(rec.id).get("oom_kill", 0) > 0
                reason = "OOMKilled" if oom else "Exited"
                log.warning("sandbox %s died (%s)", rec.id, reason)
                await self.stop(rec.id, reason=reason, message="the sandbox's init process exited")
                self.audit(None, "sandbox.died", rec.id, reason, {})
                continue
            if rec.status == "running" and policy.idle_timeout_s:
                cpu = self.runtime.cpu_usage_ns(rec.id)
                last = self._cpu.get(rec.id)
                self._cpu[rec.id] = cpu
                # Busy means more than 1% of a core since the last pass (the agent itself uses ~0).
                if last is not None and cpu - last > 10_000_000 * max(1.0, self.settings.reconcile_interval_s):
                    self.activity[rec.id] = now
                idle_since = self.activity.setdefault(rec.id, now)
                if now - idle_since >= policy.idle_timeout_s:
                    log.info("sandbox %s idle for %ss (%s)", rec.id, policy.idle_timeout_s, policy.on_idle)
                    self.audit(None, "sandbox.idle", rec.id, policy.on_idle, {"idle_timeout_s": policy.idle_timeout_s})
                    await self._act(rec, policy.on_idle, "Idle", "no API activity and no CPU use for idle_timeout_s")

    async def _act(self, rec: SandboxRecord, action: str, reason: str, message: str) -> None:
        if action == "pause" and rec.status == "running":
            await self.pause(rec.id, reason=f"{reason}Paused")
            if reason == "Timeout":
                self._update(rec, timeout_at=None)
        elif action == "hibernate" and rec.status in ("running", "paused"):
            await self.pause(rec.id, to_disk=True, reason=f"{reason}Hibernated")
            if reason == "Timeout":
                self._update(rec, timeout_at=None)
        elif action == "delete":
            await self.delete(rec.id)
        elif action == "stop" or reason == "Timeout":
            await self.stop(rec.id, reason=reason, message=message)

    async def run_lifecycle(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("lifecycle pass failed")
            await asyncio.sleep(min(1.0, self.settings.reconcile_interval_s))

    def running_count(self) -> int:  # paused ones are not counted
        return sum(1 for r in self.records.values() if r.status == "running")


def _first_error(e: ValueError) -> str:
    errs = getattr(e, "errors", None)
    if callable(errs):
        first = errs()[0]
        return f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg', '')}".lstrip(": ")
    return str(e)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


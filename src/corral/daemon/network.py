"""Networked sandboxes, the daemon's side: one NetworkManager (egress proxy, DNS responder, nftables
table, veths) per daemon, the secret store behind the API, and the proxy's events into the audit log.

A sandbox created with ``network={...}`` gets, before it boots, its address block (so that its
environment can name the gateway: ``HTTP(S)_PROXY=http://<gateway>:3128``) and a directory bound
read-only at ``/.corral/net`` with ``ca.pem`` (the template's system roots + Corral's CA + any
upstream CA the operator configured), ``resolv.conf`` and ``secrets/<name>`` (placeholders); after it boots, its network namespace is
wired to the host. The address is remembered (``run/net.json``) so that a restore from hibernation
or a daemon restart gives the same one back and the variables in the sandbox stay right.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral import errors
from corral.network.manager import PROXY_PORT_IN_SANDBOX, NetworkManager
from corral.network.netns import NetnsError, veth_name
from corral.network.secrets import SecretError, SecretInfo, SecretStore
from corral.policy.compile import CA_STORES, NET_DIR
from corral.policy.network import NetworkPlan, NetworkPolicy, SecretBinding, compile_network
from corral.policy.spec import SandboxPolicy
from corral.runtimes.images import read_in_root

from .settings import DaemonSettings

log = logging.getLogger("corral.network")
AuditMany = Callable[[list[tuple[str | None, str, str | None, str, dict[str, Any], float | None]]], Any]


def _image_roots(root: str) -> bytes:
    """The first system CA store the root has (links followed inside that root only: an image's
    link cannot make the daemon read a host file into a bundle every sandbox can read)."""
    for store in CA_STORES:
        data = read_in_root(root, store, 8 << 20)
        if data is not None and b"-----BEGIN CERTIFICATE-----" in data:
            return data
    return b""


class Networks:
    def __init__(self, settings: DaemonSettings, audit_many: AuditMany) -> None:
        self.settings = settings
        self.audit_many = audit_many
        self.secrets = SecretStore(settings.network_dir / "secrets")
        self.manager: NetworkManager | None = None
        self.unavailable: str | None = "the network has not been started"
        self.plans: dict[str, NetworkPlan] = {}
        self._q: list[tuple[str | None, str, str | None, str, dict[str, Any], float | None]] = []
        self._lock = threading.Lock()
        self._flush_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- daemon lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the proxy and resolver and (re)write the nftables table. When that fails, networked
        sandboxes are refused with the reason (fail closed); the rest of Corral works."""
        self._loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context()
        if self.settings.upstream_ca:
            ctx.load_verify_locations(cafile=str(self.settings.upstream_ca))
        ctx.set_alpn_protocols(["http/1.1"])
        self.settings.network_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Each daemon (data dir) owns its own nftables table and veth names: two daemons on one host
        # (tests, a second installation) never rewrite or clean up each other's.
        tag = hashlib.sha256(str(self.settings.data_dir.resolve()).encode()).hexdigest()
        default = self.settings.data_dir.resolve() == Path("/var/lib/corral")
        mgr = NetworkManager(self.settings.network_dir, secrets=self.secrets, on_event=self._sink,
                             nameservers=list(self.settings.nameservers) or None, pool=self.settings.net_pool,
                             upstream_ssl=ctx, ca_path_in_sandbox=f"{NET_DIR}/ca.pem",
                             table="corral" if default else f"corral_{tag[:8]}",
                             veth_prefix="cvh-" if default else f"c{tag[:3]}")
        try:
            await mgr.start()
            assert mgr.host is not None
            # Veths of an earlier daemon: their sandboxes are wired again (same addresses) by reconcile.
            removed = await asyncio.to_thread(mgr.host.cleanup_orphans)
            if removed:
                log.info("network: removed %d veths of an earlier daemon", len(removed))
        except Exception as e:
            self.unavailable = f"the egress proxy could not be set up: {e}"
            log.error("network: %s; networked sandboxes will be refused", self.unavailable)
            with contextlib.suppress(Exception):
                await mgr.stop()
            return
        self.manager = mgr
        self.unavailable = None

    async def stop(self) -> None:
        """Daemon shutdown: sandboxes keep running; their connections fail (the proxy is gone) until
        the next daemon wires them again. The table stays so that nothing leaks meanwhile."""
        if self.manager is not None:
            # With no sandbox wired, nothing needs the table to fail closed: leave the host clean.
            await self.manager.stop(drop_table=not self.plans)
            self.manager = None
        self.flush()  # after the proxy stopped: its last net.close events are in the batch

    def _mgr(self) -> NetworkManager:
        if self.manager is None:
            raise errors.RuntimeUnavailableError(
                f"this sandbox has a network policy, but {self.unavailable}",
                hint="`corral doctor` shows what networking needs (nftables, veth, root); without network= "
                     "the sandbox has loopback only")
        return self.manager

    # ---- policy ----------------------------------------------------------------------------------
    def bindings(self, names: list[str]) -> list[SecretBinding]:
        out = []
        for name in names:
            try:
                out.append(self.secrets.info(name).binding)
            except SecretError as e:
                raise errors.SecretNotFoundError(str(e)) from None
        return out

    def plan(self, policy: SandboxPolicy) -> NetworkPlan | None:
        """Compile the sandbox's network policy; the hosts of its secrets are allowed implicitly."""
        if policy.network is None:
            return None
        self._mgr()
        bindings = self.bindings(policy.secrets)
        implied = [h for b in bindings for h in b.hosts if h not in policy.network.allow]
        return compile_network(NetworkPolicy(allow=[*policy.network.allow, *implied], deny=policy.network.deny),
                               bindings)

    # ---- one sandbox -----------------------------------------------------------------------------
    @staticmethod
    def _state(run_dir: Path) -> dict[str, Any]:
        try:
            return dict(json.loads((run_dir / "net.json").read_text()))
        except (OSError, ValueError):
            return {}

    async def prepare(self, sandbox_id: str, plan: NetworkPlan, sandbox_dir: Path, root_source: Path
                      ) -> tuple[Path, dict[str, str]]:
        """Before boot: reserve the address, write ``net/`` (CA bundle, resolv.conf); returns that
        directory and the sandbox's variables. ``root_source`` is where the image's system CA store is
        read from (the template's root, or / in host mode)."""
        mgr = self._mgr()
        run = sandbox_dir / "run"
        try:
            gateway, ip = await asyncio.to_thread(mgr.reserve, sandbox_id, self._state(run).get("ip"))
        except NetnsError as e:
            raise errors.RuntimeUnavailableError(f"no network for {sandbox_id}: {e}",
                                                 hint="CORRAL_NET_POOL sets the address pool") from None
        (run / "net.json").write_text(json.dumps({"ip": ip, "gateway": gateway}))
        net = sandbox_dir / "net"
        net.mkdir(mode=0o755, exist_ok=True)
        roots = await asyncio.to_thread(_image_roots, str(root_source))
        extra = self.settings.upstream_ca.read_bytes() if self.settings.upstream_ca else b""
        bundle = roots.rstrip(b"\n") + b"\n" + mgr.ca.ca_pem + (b"\n" + extra if extra else b"")
        (net / "ca.pem").write_bytes(bundle.lstrip(b"\n"))
        (net / "resolv.conf").write_text(f"nameserver {gateway}\noptions timeout:2 attempts:2\n")
        for f in ("ca.pem", "resolv.conf"):
            (net / f).chmod(0o644)
        # Each secret's placeholder as a file too (/.corral/net/secrets/<name>), for tools that read
        # credentials from files; never the value.
        sec = net / "secrets"
        shutil.rmtree(sec, ignore_errors=True)
        sec.mkdir(mode=0o755)
        for b in plan.secrets:
            (sec / b.name).write_text(mgr.secrets.placeholder(b.name) + "\n")
            (sec / b.name).chmod(0o644)
        return net, mgr.env(sandbox_id, plan, gateway=gateway)

    async def attach(self, sandbox_id: str, pid: int, plan: NetworkPlan, sandbox_dir: Path) -> None:
        """After boot (or restore, or a daemon restart): wire the namespace of ``pid``."""
        mgr = self._mgr()
        preferred = self._state(sandbox_dir / "run").get("ip")
        if self._has_veth(sandbox_id):
            with contextlib.suppress(Exception):  # left by an earlier attach of the same sandbox
                await mgr.detach(sandbox_id)
        try:
            await mgr.attach(sandbox_id, pid, plan, preferred)
        except Exception as e:
            mgr.release(sandbox_id)
            raise errors.RuntimeUnavailableError(f"the network of {sandbox_id} could not be wired: {e}") from None
        net = mgr.net(sandbox_id)
        if preferred and net.ip != preferred:
            # Its variables name the old gateway: the proxy still gets the traffic (every TCP connection
            # is redirected), but say so.
            log.warning("sandbox %s came back on %s instead of %s", sandbox_id, net.ip, preferred)
        (sandbox_dir / "run" / "net.json").write_text(json.dumps({"ip": net.ip, "gateway": net.gateway}))
        self.plans[sandbox_id] = plan
        self.audit_many([(None, "net.attach", sandbox_id, "ok",
                          {"ip": net.ip, "gateway": net.gateway, "proxy_port": PROXY_PORT_IN_SANDBOX,
                           "allow": [r.text for r in plan.allow], "deny": [r.text for r in plan.deny],
                           "secrets": [b.name for b in plan.secrets]}, None)])

    async def detach(self, sandbox_id: str) -> None:
        wired = self.plans.pop(sandbox_id, None) is not None
        if self.manager is None:
            return
        self.manager.release(sandbox_id)
        if not (wired or self._has_veth(sandbox_id)):
            return  # never networked (or already gone): nothing to remove
        try:
            await self.manager.detach(sandbox_id)
        except Exception as e:
            log.warning("network of %s: detach failed: %s", sandbox_id, e)

    def _has_veth(self, sandbox_id: str) -> bool:
        mgr = self.manager
        if mgr is None or mgr.host is None:
            return False
        return mgr.host.get(sandbox_id) is not None or \
            Path("/sys/class/net", veth_name(sandbox_id, mgr.veth_prefix)).exists()

    def update(self, sandbox_id: str, plan: NetworkPlan) -> None:
        if sandbox_id in self.plans and self.manager is not None:
            self.manager.update(sandbox_id, plan)
            self.plans[sandbox_id] = plan

    # ---- secrets ---------------------------------------------------------------------------------
    def set_secret(self, binding: SecretBinding, value: str) -> SecretInfo:
        try:
            info = self.secrets.set(binding, value)
        except SecretError as e:
            raise errors.InvalidRequestError(str(e)) from None
        if self.manager is not None:
            self.manager.proxy.forget_placeholders()
        return info

    def list_secrets(self) -> list[SecretInfo]:
        return self.secrets.list()

    def delete_secret(self, name: str) -> None:
        try:
            self.secrets.delete(name)
        except SecretError as e:
            raise errors.SecretNotFoundError(str(e)) from None
        if self.manager is not None:
            self.manager.proxy.forget_placeholders()

    # ---- events ----------------------------------------------------------------------------------
    def _sink(self, event: dict[str, Any]) -> None:
        """The proxy's and resolver's events (no secret values in them) become audit records, in
        batches: a busy sandbox opens many connections a second."""
        detail = {k: v for k, v in event.items() if k not in ("kind", "sandbox_id") and v is not None}
        kind = str(event.get("kind", "net.event"))
        result = "deny" if kind.endswith("deny") or kind.endswith("misuse") else "ok"
        with self._lock:
            self._q.append((None, kind, event.get("sandbox_id"), result, detail, time.time()))
            if self._flush_pending or self._loop is None:
                return
            self._flush_pending = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.call_later, 0.05, self.flush)

    def flush(self) -> None:
        with self._lock:
            items, self._q = self._q, []
            self._flush_pending = False
        if items:
            self.audit_many(items)

"""The daemon's one handle on sandbox networking: proxy + DNS + host wiring + secrets."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.network.dns import DnsLedger, DnsResponder, Resolver
from corral.network.netns import (
    CONNTRACK_PER_SANDBOX,
    DEFAULT_POOL,
    SOCKET_MARK,
    HostNetwork,
    SandboxNet,
    sandbox_env,
)
from corral.network.proxy import EgressProxy
from corral.network.secrets import CertificateAuthority, SecretStore
from corral.policy.network import NetworkPlan

log = logging.getLogger(__name__)

CA_PATH_IN_SANDBOX = "/etc/corral/ca.pem"
PROXY_PORT_IN_SANDBOX = 3128  # HTTP(S)_PROXY=http://<gateway>:3128 (any port of the gateway reaches the proxy)


class NetworkManager:
    """Start once per daemon; attach each sandbox (by the pid of a process in its netns).

    Events (``on_event``) are plain dicts without secret values: ``net.connect``, ``net.close``
    (bytes up/down), ``net.deny``, ``dns.deny``, ``secret.use``, ``secret.placeholder_misuse``."""

    def __init__(self, state_dir: str | Path, *, secrets: SecretStore | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 nameservers: list[tuple[str, int]] | None = None, pool: str = DEFAULT_POOL,
                 listen_addr: str = "127.0.0.1", proxy_port: int = 0, dns_port: int = 0,
                 upstream_ssl: ssl.SSLContext | None = None, max_connections_per_sandbox: int = 256,
                 ca_path_in_sandbox: str = CA_PATH_IN_SANDBOX, table: str = "corral",
                 veth_prefix: str = "cvh-", conntrack_per_sandbox: int = CONNTRACK_PER_SANDBOX) -> None:
        self.table = table
        self.conntrack_per_sandbox = conntrack_per_sandbox
        self.veth_prefix = veth_prefix
        self.state_dir = Path(state_dir)
        self.secrets = secrets if secrets is not None else SecretStore(self.state_dir / "secrets")
        self.ca = CertificateAuthority(self.state_dir / "ca")
        self.on_event = on_event
        self.resolver = Resolver(nameservers) if nameservers else Resolver()
        self.ledger = DnsLedger()
        self.pool = pool
        self.listen_addr = listen_addr
        self._ports = (proxy_port, dns_port)
        self.ca_path_in_sandbox = ca_path_in_sandbox
        self.proxy = EgressProxy(self.resolver, secrets=self.secrets, server_contexts=self.ca.server_context,
                                 upstream_ssl=upstream_ssl, on_event=on_event, ledger=self.ledger,
                                 max_connections_per_sandbox=max_connections_per_sandbox,
                                 never=[ipaddress.IPv4Network(pool)], explicit_port=PROXY_PORT_IN_SANDBOX)
        self.dns = DnsResponder(self.resolver, self.proxy.plan_for_address, self.ledger, on_event)
        self.host: HostNetwork | None = None

    @property
    def ca_file(self) -> Path:
        """The CA certificate on the host: mount it read-only at ``ca_path_in_sandbox``."""
        return self.ca.ca_path

    async def start(self) -> None:
        await self.proxy.start(self.listen_addr, self._ports[0], mark=SOCKET_MARK)
        await self.dns.start(self.listen_addr, self._ports[1], mark=SOCKET_MARK)
        assert self.proxy.address is not None and self.dns.address is not None
        self.host = HostNetwork(proxy_addr=self.listen_addr, proxy_port=self.proxy.address[1],
                                dns_port=self.dns.address[1], pool=self.pool, table=self.table,
                                veth_prefix=self.veth_prefix, conntrack_max=self.conntrack_per_sandbox)
        await asyncio.to_thread(self.host.ensure_table)

    def reserve(self, sandbox_id: str, preferred: str | None = None) -> tuple[str, str]:
        """(gateway, address) the sandbox will get at :meth:`attach`: known before it boots."""
        assert self.host is not None, "start() first"
        return self.host.reserve(sandbox_id, preferred)

    def release(self, sandbox_id: str) -> None:
        if self.host is not None:
            self.host.release(sandbox_id)

    async def attach(self, sandbox_id: str, pid: int, plan: NetworkPlan, preferred: str | None = None
                     ) -> dict[str, str]:
        """Wire the sandbox and return the environment it should get (proxy, CA trust, placeholders).
        Its /etc/resolv.conf should say ``nameserver <gateway>`` (see :meth:`net`)."""
        assert self.host is not None, "start() first"
        net = await asyncio.to_thread(self.host.setup, sandbox_id, pid, preferred)
        self.proxy.register(sandbox_id, net.ip, plan, gateway=net.gateway)
        return self.env(sandbox_id, plan)

    def env(self, sandbox_id: str, plan: NetworkPlan, gateway: str | None = None) -> dict[str, str]:
        if gateway is None:
            gateway = self.net(sandbox_id).gateway
        env = sandbox_env(f"http://{gateway}:{PROXY_PORT_IN_SANDBOX}", self.ca_path_in_sandbox)
        for b in plan.secrets:
            if b.env:
                env[b.env] = self.secrets.placeholder(b.name)
        return env

    def net(self, sandbox_id: str) -> SandboxNet:
        assert self.host is not None
        net = self.host.get(sandbox_id)
        if net is None:
            raise KeyError(sandbox_id)
        return net

    def resolv_conf(self, sandbox_id: str) -> str:
        return f"nameserver {self.net(sandbox_id).gateway}\noptions timeout:2 attempts:2\n"

    def update(self, sandbox_id: str, plan: NetworkPlan) -> None:
        self.proxy.set_plan(sandbox_id, plan)

    async def detach(self, sandbox_id: str) -> None:
        self.proxy.unregister(sandbox_id)
        self.ledger.forget(sandbox_id)
        if self.host is not None:
            await asyncio.to_thread(self.host.teardown, sandbox_id)

    async def stop(self, *, drop_table: bool = False) -> None:
        await self.proxy.stop()
        await self.dns.stop()
        if self.host is not None and drop_table:
            await asyncio.to_thread(self.host.drop_table)

"""The sandboxes' DNS: answers A queries only for names the querying sandbox may reach.

A name that no allow rule covers is answered NXDOMAIN *without* being sent upstream (ATTACKS E11:
a resolver that forwards every query is an exfiltration channel). Allowed names are resolved
through the upstream resolver, answers in special ranges that no allow CIDR covers are dropped
(rebinding, E4), CNAME chains are flattened, and AAAA is answered empty (sandboxes have no IPv6).
The sandbox is identified by the source address of the query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.policy.network import HostError, IPAddress, NetworkPlan, canonical_host, canonical_ip

log = logging.getLogger(__name__)

MAX_TTL_S = 60
# Per sandbox: queries a second (and the burst a bucket holds), and queries answered at once. A
# package manager resolving a few hundred names fits; a flood (each refused query was an audit
# record, each allowed one an upstream query) does not.
QUERIES_PER_S = 200
QUERY_BURST = 400
MAX_INFLIGHT = 64
EventSink = Callable[[dict[str, Any]], None]


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                out.append((parts[1], 53))
    except OSError:
        pass
    return out or [("127.0.0.1", 53)]


class ResolveError(Exception):
    pass


@dataclass
class Resolver:
    """Asks the upstream resolver(s); small positive cache bounded by the answer's TTL."""

    nameservers: list[tuple[str, int]] = field(default_factory=system_nameservers)
    timeout_s: float = 2.0
    _cache: dict[tuple[str, dns.rdatatype.RdataType], tuple[float, list[tuple[IPAddress, int]]]] = field(default_factory=dict)

    async def resolve(self, name: str, rdtype: dns.rdatatype.RdataType = dns.rdatatype.A) -> list[tuple[IPAddress, int]]:
        """(address, ttl) pairs for ``name`` (canonical, allowed: the caller checked)."""
        key = (name, rdtype)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit and hit[0] > now:
            return hit[1]
        last: Exception | None = None
        for host, port in self.nameservers:
            q = dns.message.make_query(name + ".", rdtype)
            try:
                r = await dns.asyncquery.udp(q, host, port=port, timeout=self.timeout_s)
                if r.flags & dns.flags.TC:
                    r = await dns.asyncquery.tcp(q, host, port=port, timeout=self.timeout_s)
            except (dns.exception.DNSException, OSError) as e:
                last = e
                continue
            if r.rcode() == dns.rcode.NXDOMAIN:
                self._cache[key] = (now + 5, [])
                return []
            if r.rcode() != dns.rcode.NOERROR:
                last = ResolveError(dns.rcode.to_text(r.rcode()))
                continue
            out: list[tuple[IPAddress, int]] = []
            for rrset in r.answer:
                if rrset.rdtype != rdtype:
                    continue
                for rd in rrset:
                    out.append((canonical_ip(ipaddress.ip_address(rd.address)), min(rrset.ttl, MAX_TTL_S)))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = (now + min((t for _, t in out), default=5), out)
            return out
        raise ResolveError(f"no upstream resolver answered for {name}: {last}")

    async def resolve_addresses(self, name: str) -> list[IPAddress]:
        """A then AAAA answers (the proxy dials IPv4 first)."""
        out = [ip for ip, _ in await self.resolve(name, dns.rdatatype.A)]
        try:
            out += [ip for ip, _ in await self.resolve(name, dns.rdatatype.AAAA)]
        except ResolveError:
            pass
        return out


class DnsLedger:
    """Which names each sandbox was handed which addresses for, so the transparent proxy can name
    a connection that carries no SNI or Host (ssh to ``github.com:22``)."""

    def __init__(self) -> None:
        self._by_sandbox: dict[str, dict[IPAddress, tuple[str, float]]] = {}

    def record(self, sandbox_id: str, ip: IPAddress, name: str, ttl_s: int) -> None:
        m = self._by_sandbox.setdefault(sandbox_id, {})
        if len(m) > 4096:
            now = time.monotonic()
            for k in [k for k, (_, exp) in m.items() if exp < now]:
                del m[k]
        m[ip] = (name, time.monotonic() + max(ttl_s, 0) + 300)

    def name_for(self, sandbox_id: str, ip: IPAddress) -> str | None:
        hit = self._by_sandbox.get(sandbox_id, {}).get(ip)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def forget(self, sandbox_id: str) -> None:
        self._by_sandbox.pop(sandbox_id, None)


# sandbox source address -> (sandbox id, plan)
PlanLookup = Callable[[str], "tuple[str, NetworkPlan] | None"]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        source = str(addr[0])
        if not self.responder._admit(source):
            return
        task = asyncio.ensure_future(self.responder._answer(data, source))
        self.responder._tasks.add(task)
        self.responder._inflight[source] = self.responder._inflight.get(source, 0) + 1

        def done(t: asyncio.Future[bytes | None]) -> None:
            self.responder._tasks.discard(t)
            left = self.responder._inflight.get(source, 1) - 1
            if left > 0:
                self.responder._inflight[source] = left
            else:
                self.responder._inflight.pop(source, None)
            if t.cancelled() or t.exception() is not None or self.transport is None:
                return
            reply = t.result()
            if reply is not None:
                self.transport.sendto(reply, addr)

        task.add_done_callback(done)


class DnsResponder:
    def __init__(self, resolver: Resolver, lookup: PlanLookup, ledger: DnsLedger | None = None,
                 on_event: EventSink | None = None) -> None:
        self.resolver = resolver
        self.lookup = lookup
        self.ledger = ledger or DnsLedger()
        self.on_event = on_event
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Future[bytes | None]] = set()
        self.address: tuple[str, int] | None = None
        # Per source address: a token bucket of queries, the queries in flight, and what was
        # dropped since the last summary (one event a second, not one per dropped query).
        self._buckets: dict[str, tuple[float, float]] = {}
        self._inflight: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._reported_at: dict[str, float] = {}

    def _admit(self, source: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(source, (float(QUERY_BURST), now))
        tokens = min(float(QUERY_BURST), tokens + (now - last) * QUERIES_PER_S)
        if tokens >= 1 and self._inflight.get(source, 0) < MAX_INFLIGHT:
            self._buckets[source] = (tokens - 1, now)
            return True
        self._buckets[source] = (tokens, now)
        self._dropped[source] = self._dropped.get(source, 0) + 1
        if now - self._reported_at.get(source, 0.0) >= 1.0:
            self._reported_at[source] = now
            owner = self.lookup(source)
            if owner is not None:
                self._emit({"kind": "dns.deny", "sandbox_id": owner[0], "destination": "",
                            "reason": f"query rate over {QUERIES_PER_S}/s: {self._dropped.pop(source)} "
                                      "queries dropped"})
        return False

    async def start(self, host: str, port: int, mark: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=(host, port))
        if mark is not None:  # the SO_MARK the host's rules look for (netns.SOCKET_MARK)
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        self._transport = transport
        sock = transport.get_extra_info("sockname")
        self.address = (str(sock[0]), int(sock[1]))

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for t in list(self._tasks):
            t.cancel()

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("DNS event sink failed")

    async def _answer(self, data: bytes, source: str) -> bytes | None:
        try:
            q = dns.message.from_wire(data)
        except Exception:
            return None
        if q.flags & dns.flags.QR or len(q.question) != 1:
            return None
        reply = dns.message.make_response(q)
        reply.flags |= dns.flags.RA
        owner = self.lookup(source)
        if owner is None:
            reply.set_rcode(dns.rcode.REFUSED)
            return reply.to_wire()
        sandbox_id, plan = owner
        question = q.question[0]
        qtext = question.name.to_text(omit_final_dot=True)
        try:
            name = canonical_host(qtext)
        except HostError:
            name = ""
        if not isinstance(name, str) or not name or question.rdclass != dns.rdataclass.IN:
            reply.set_rcode(dns.rcode.REFUSED)
            self._emit({"kind": "dns.deny", "sandbox_id": sandbox_id, "destination": qtext[:255],
                        "reason": "not a resolvable name"})
            return reply.to_wire()
        if not plan.name_may_resolve(name):
            reply.set_rcode(dns.rcode.NXDOMAIN)
            self._emit({"kind": "dns.deny", "sandbox_id": sandbox_id, "destination": name,
                        "reason": "name not allowed; not forwarded"})
            return reply.to_wire()
        if question.rdtype != dns.rdatatype.A:
            return reply.to_wire()  # NOERROR, no data: no IPv6 inside, other types not served
        try:
            answers = await self.resolver.resolve(name, dns.rdatatype.A)
        except ResolveError:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply.to_wire()
        kept = [(ip, ttl) for ip, ttl in answers if plan.address_allowed(ip)]
        dropped = [str(ip) for ip, _ in answers if not plan.address_allowed(ip)]
        if dropped:
            self._emit({"kind": "dns.deny", "sandbox_id": sandbox_id, "destination": name,
                        "reason": f"answer in a private or special range dropped: {', '.join(dropped)}"})
        if kept:
            ttl = min(t for _, t in kept)
            rrset = dns.rrset.from_text_list(question.name, ttl, "IN", "A", [str(ip) for ip, _ in kept])
            reply.answer.append(rrset)
            for ip, _ in kept:
                self.ledger.record(sandbox_id, ip, name, ttl)
        return reply.to_wire()

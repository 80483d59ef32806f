"""The egress proxy and credential broker: one process-wide server for every sandbox.

A connection is attributed to a sandbox by its source address (the host's nftables pin each
sandbox's veth to its address, so it cannot be spoofed) and decided against that sandbox's current
plan. Three ways in:

- explicit ``CONNECT host:port`` (HTTPS_PROXY) and absolute-form ``GET http://host/`` (HTTP_PROXY);
- transparent: every TCP connection of a sandbox is DNAT'd here; ``SO_ORIGINAL_DST`` gives the
  port, the TLS ClientHello's SNI or the HTTP Host header gives the name (else the name the DNS
  responder handed out for that address, else the address itself).

The proxy resolves names itself (only names the plan allows: a denied name never reaches a
resolver), decides again on the resolved address (no rebinding into private ranges), and dials
that address. CONNECT authority, SNI and Host must agree. Allowed TLS is spliced through untouched,
except for hosts with a bound secret: there the proxy terminates TLS with a leaf from the
installation CA, offers HTTP/1.1 only, injects the credential into requests for that host only, and
redacts the injected value from responses. Values never enter an event or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from corral.network.dns import DnsLedger, ResolveError, Resolver
from corral.policy.network import (
    BasicAuthInjection,
    Decision,
    HeaderInjection,
    HostError,
    IPAddress,
    IPNetwork,
    NetworkPlan,
    PlaceholderInjection,
    SecretBinding,
    canonical_host,
    canonical_ip,
    decide,
)

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
HEAD_LIMIT = 64 * 1024
PEEK_TIMEOUT_S = 0.3  # server-speaks-first protocols (ssh) wait this long before being named by address
READ_HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MAX_TRAILERS = 64
HOLD_S = 0.05  # how long a response tail that may begin a secret waits for the upstream's next bytes
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # used with fullmatch ('$' would accept a final LF)
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII only: what is checked is what is forwarded
_REQUEST_LINE = re.compile(rb"^[A-Z]{3,12} \S+ HTTP/1\.[01]\r\n")
_HOP_BY_HOP = {"proxy-connection", "proxy-authorization", "keep-alive"}

EventSink = Callable[[dict[str, Any]], None]


class SecretSource(Protocol):
    def get_value(self, name: str) -> str: ...

    def placeholder(self, name: str) -> str: ...


class _Reject(Exception):
    def __init__(self, status: int, reason: str, rule: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.rule = rule


@dataclass
class _Sandbox:
    sandbox_id: str
    address: str
    plan: NetworkPlan
    gateway: str | None
    active: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class _Conn:
    sb: _Sandbox
    mode: str
    host: str = ""
    port: int = 0
    ip: str = ""
    rule: str = ""
    tls: str = "none"
    up: int = 0
    down: int = 0
    started: float = field(default_factory=time.monotonic)


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), int(port)


def client_hello(data: bytes) -> tuple[str, str | None]:
    """("partial" | "ok" | "malformed", server name) of the TLS ClientHello at the start of
    ``data``. The handshake message may span several TLS records (legal fragmentation): they are
    put back together before the name is read, so splitting a ClientHello cannot hide its SNI."""
    hs = b""
    i = 0
    while True:
        if len(data) < i + 5:
            return "partial", None
        if data[i] != 0x16 or data[i + 1] != 0x03:
            return "malformed", None
        rec_len = struct.unpack_from("!H", data, i + 3)[0]
        if len(data) < i + 5 + rec_len:
            return "partial", None
        hs += data[i + 5:i + 5 + rec_len]
        i += 5 + rec_len
        if len(hs) >= 4:
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > 1 << 16:
                return "malformed", None
            if len(hs) >= need:
                break
    p = hs[4:need]
    if hs[0] != 1:
        return "malformed", None
    try:
        j = 2 + 32
        j += 1 + p[j]
        j += 2 + struct.unpack_from("!H", p, j)[0]
        j += 1 + p[j]
        if j == len(p):
            return "ok", None  # no extensions at all
        end = j + 2 + struct.unpack_from("!H", p, j)[0]
        if end > len(p):
            return "malformed", None
        j += 2
        while j + 4 <= end:
            etype, elen = struct.unpack_from("!HH", p, j)
            j += 4
            if etype == 0:
                k = j + 2
                while k + 3 <= j + elen:
                    ntype, nlen = p[k], struct.unpack_from("!H", p, k + 1)[0]
                    if ntype == 0:
                        return "ok", p[k + 3:k + 3 + nlen].decode("ascii", "replace")
                    k += 3 + nlen
                return "malformed", None  # a server_name extension without a host name
            j += elen
    except (IndexError, struct.error):
        return "malformed", None
    return "ok", None


def parse_sni(data: bytes) -> tuple[bool, str | None]:
    """(complete, server name) of the ClientHello at the start of ``data``."""
    status, name = client_hello(data)
    return status != "partial", name


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _is_tls(data: bytes) -> bool:
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03


def _split_authority(auth: str, default_port: int) -> tuple[str, int]:
    if auth.startswith("["):
        end = auth.find("]")
        if end < 0:
            raise _Reject(400, "malformed authority")
        host, rest = auth[:end + 1], auth[end + 1:]
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _Reject(400, "malformed authority")
    elif auth.count(":") == 1:
        host, _, port_s = auth.partition(":")
    elif ":" in auth:
        raise _Reject(400, "IPv6 literals need brackets")
    else:
        host, port_s = auth, ""
    if port_s and (not re.fullmatch(r"[0-9]{1,5}", port_s) or not 0 < int(port_s) < 65536):
        raise _Reject(400, f"invalid port in authority {auth[:100]!r}")
    return host, int(port_s) if port_s else default_port


def _canonical(host: str) -> str | IPAddress:
    try:
        return canonical_host(host)
    except HostError as e:
        raise _Reject(403, f"invalid host: {e}") from None


def _host_text(h: str | IPAddress) -> str:
    return h if isinstance(h, str) else str(h)


class _Relay(asyncio.Protocol):
    """One side of a pass-through splice; ``peer`` is the other side."""

    def __init__(self, conn: _Conn, upstream: bool, done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.upstream = upstream
        self.done = done
        self.peer: _Relay | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        transport = self.transport
        if self.peer is not None and self.peer.pending:
            for chunk in self.peer.pending:
                transport.write(chunk)
            self.peer.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream:
            self.conn.down += len(data)
        else:
            self.conn.up += len(data)
        peer = self.peer.transport if self.peer else None
        if peer is None:
            self.pending.append(data)
        else:
            peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport if self.peer else None
        if peer is not None and peer.can_write_eof():
            peer.write_eof()
        if self.peer is not None and self.peer.eof:
            self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()

    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()

    def _close(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class _Redactor:
    """Replaces each secret form in a byte stream by as many ``*`` (lengths, so framing, unchanged).

    A form is given with the offset where its secret material starts (``Bearer <value>``: after
    "Bearer "). The tail of a chunk that could begin a form is held back until more comes. When the
    stream pauses (the upstream sent nothing for a while) or ends with such a tail, the tail goes out,
    its secret part masked once it is long enough to mean anything (MIN_MASK bytes: shorter, an
    innocent last byte equal to a secret's first would be spoiled), and the stream's next bytes are
    masked too as far as they continue a form: a pause cannot split a value into two halves that
    each pass unseen.
    """

    MIN_MASK = 4

    def __init__(self, forms: Sequence[bytes | tuple[bytes, int]]) -> None:
        self.forms: list[bytes] = []
        self.secret_from: dict[bytes, int] = {}
        for f in forms:
            self.add(*(f if isinstance(f, tuple) else (f, 0)))
        self.held = b""
        self.cont: list[tuple[bytes, int]] = []  # (form, bytes of it already sent) after a pause

    def add(self, form: bytes, secret_from: int = 0) -> None:
        if len(form) >= 4 and form not in self.secret_from:
            self.forms.append(form)
            self.forms.sort(key=len, reverse=True)
            self.secret_from[form] = secret_from

    def feed(self, data: bytes) -> bytes:
        if self.cont:
            data = self._continue(data)
        data = self.held + data
        for f in self.forms:
            if f in data:
                data = data.replace(f, b"*" * len(f))
        # Hold back the longest tail that could be the start of a form split across chunks. Only the
        # positions of a form's first byte are candidates (this runs on every chunk of a response).
        hold = 0
        for f in self.forms:
            n = min(len(f) - 1, len(data))
            if n <= hold:
                continue
            tail = data[len(data) - n:]
            i = tail.find(f[:1])
            while i >= 0 and n - i > hold:
                if f.startswith(tail[i:]):
                    hold = n - i
                    break
                i = tail.find(f[:1], i + 1)
        self.held = data[len(data) - hold:] if hold else b""
        return data[:len(data) - hold] if hold else data

    def _continue(self, data: bytes) -> bytes:
        masked = bytearray(data)
        keep: list[tuple[bytes, int]] = []
        for f, k in self.cont:
            rest = f[k:]
            if data.startswith(rest):
                masked[:len(rest)] = b"*" * len(rest)
            elif rest.startswith(data):
                masked[:] = b"*" * len(data)
                keep.append((f, k + len(data)))
        self.cont = keep
        return bytes(masked)

    def flush(self) -> bytes:
        """The held tail, now (a pause or the end of the stream): see the class docstring."""
        out, self.held = bytearray(self.held), b""
        for j in range(len(out)):
            tail = bytes(out[j:])
            for f in self.forms:
                if f.startswith(tail):
                    self.cont.append((f, len(tail)))
                    start = j + self.secret_from[f]
                    if len(out) - start >= self.MIN_MASK:
                        out[start:] = b"*" * (len(out) - start)
        return bytes(out)


class EgressProxy:
    def __init__(self, resolver: Resolver, *, secrets: SecretSource | None = None,
                 server_contexts: Callable[[str], ssl.SSLContext] | None = None,
                 upstream_ssl: ssl.SSLContext | None = None, on_event: EventSink | None = None,
                 ledger: DnsLedger | None = None, max_connections_per_sandbox: int = 256,
                 never: Sequence[IPNetwork] = (), explicit_port: int = 3128) -> None:
        self.resolver = resolver
        # Connections to the sandbox's gateway on this port are proxy requests (HTTP(S)_PROXY): a
        # fixed port, so that the variables in a sandbox stay right across daemon restarts.
        self.explicit_port = explicit_port
        self.secrets = secrets
        self.server_contexts = server_contexts
        if upstream_ssl is None:
            upstream_ssl = ssl.create_default_context()
            upstream_ssl.set_alpn_protocols(["http/1.1"])
        self.upstream_ssl = upstream_ssl
        self.on_event = on_event
        self.ledger = ledger or DnsLedger()
        self.max_connections = max_connections_per_sandbox
        self.never = tuple(never)
        self._by_addr: dict[str, _Sandbox] = {}
        self._placeholder_cache: dict[str, str] = {}
        self._by_id: dict[str, _Sandbox] = {}
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------------ registry

    def register(self, sandbox_id: str, address: str, plan: NetworkPlan, gateway: str | None = None) -> None:
        sb = _Sandbox(sandbox_id, address, plan, gateway)
        self._by_addr[address] = sb
        self._by_id[sandbox_id] = sb

    def set_plan(self, sandbox_id: str, plan: NetworkPlan) -> None:
        """Live policy change: applies to new connections (and new requests on brokered ones)."""
        self._by_id[sandbox_id].plan = plan

    def unregister(self, sandbox_id: str) -> None:
        """Forget the sandbox and end its open connections (its veth is going away: no FIN will come)."""
        sb = self._by_id.pop(sandbox_id, None)
        if sb is not None:
            if self._by_addr.get(sb.address) is sb:
                self._by_addr.pop(sb.address, None)
            for t in list(sb.tasks):
                t.cancel()
        self._placeholder_cache.clear()

    def forget_placeholders(self) -> None:
        """A secret was set or deleted: placeholders are looked up again."""
        self._placeholder_cache.clear()

    def plan_for_address(self, address: str) -> tuple[str, NetworkPlan] | None:
        sb = self._by_addr.get(address)
        return (sb.sandbox_id, sb.plan) if sb else None

    # ------------------------------------------------------------------ server

    async def start(self, host: str, port: int = 0, mark: int | None = None) -> None:
        """Listen on ``host:port``; ``mark``: the SO_MARK the host's rules look for (netns.SOCKET_MARK)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)  # accepted sockets inherit it
        ls.bind((host, port))
        ls.listen(1024)
        ls.setblocking(False)
        self._listener = ls
        name = ls.getsockname()
        self.address = (str(name[0]), int(name[1]))
        loop.add_reader(ls.fileno(), self._accept)

    async def stop(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("accept failed")
                return
            sock.setblocking(False)
            task = asyncio.ensure_future(self._handle(sock, str(peer[0])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("egress event sink failed")

    def _event(self, kind: str, c: _Conn, **extra: Any) -> None:
        ev: dict[str, Any] = {"kind": kind, "sandbox_id": c.sb.sandbox_id, "destination": c.host, "port": c.port,
                              "ip": c.ip, "rule": c.rule, "mode": c.mode, "tls": c.tls}
        ev.update(extra)
        self._emit(ev)

    # ------------------------------------------------------------------ connection entry

    async def _handle(self, sock: socket.socket, peer: str) -> None:
        sb = self._by_addr.get(peer)
        if sb is None:
            sock.close()  # not a sandbox (E19): nobody else may use the proxy
            return
        c = _Conn(sb, "transparent")
        me = asyncio.current_task()
        if me is not None:
            sb.tasks.add(me)
            me.add_done_callback(sb.tasks.discard)
        if sb.active >= self.max_connections:
            self._event("net.deny", c, reason=f"more than {self.max_connections} concurrent connections")
            sock.close()
            return
        sb.active += 1
        try:
            local = sock.getsockname()
            orig = original_dst(sock)
            explicit = orig is None or orig == (local[0], local[1]) or (
                sb.gateway is not None and self.address is not None
                and orig in ((sb.gateway, self.address[1]), (sb.gateway, self.explicit_port))) or (
                # a gateway of an earlier wiring (a sandbox whose variables outlived a daemon restart)
                orig[1] == self.explicit_port and self._is_never(ipaddress.ip_address(orig[0]), orig[1]))
            if explicit:
                c.mode = "explicit"
                await self._explicit(c, sock)
            else:
                assert orig is not None
                await self._transparent(c, sock, orig)
        except _Reject as e:
            c.rule = c.rule or e.rule
            self._event("net.deny", c, reason=e.reason)
            with contextlib.suppress(OSError):
                if c.mode == "explicit" or c.tls == "none":
                    sock.send(_error_response(e.status, e.reason))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as e:
            log.debug("connection of %s ended: %s", sb.sandbox_id, type(e).__name__)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("egress proxy connection failed")
        finally:
            sb.active -= 1
            sock.close()

    async def _peek(self, sock: socket.socket, timeout: float, enough: Callable[[bytes], bool]) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        data = b""
        backoff = 0.0005
        while True:
            try:
                data = sock.recv(HEAD_LIMIT, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                available = False
            else:
                if not data or enough(data) or len(data) >= HEAD_LIMIT:
                    return data
                available = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return data
            if available:
                # Part of a head is here: look again soon, then less and less often (a sandbox holding
                # many half-sent heads open must not keep the daemon's loop spinning).
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, 0.05)
                continue
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _set_once, fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return data
            finally:
                loop.remove_reader(sock.fileno())

    @staticmethod
    def _complete(data: bytes) -> bool:
        if _is_tls(data):
            return parse_sni(data)[0]
        return b"\r\n\r\n" in data

    # ------------------------------------------------------------------ decisions

    async def _authorize(self, c: _Conn, host: str | IPAddress, port: int) -> IPAddress:
        """Decide on the name, resolve it (only if allowed), decide on the address; the address to dial."""
        c.host, c.port = _host_text(host), port
        plan = c.sb.plan
        d = decide(plan, host, port, None)
        if not d.allowed:
            raise _Reject(403, d.reason, d.rule)
        if not isinstance(host, str):
            self._check_never(c, host, port)
            c.ip, c.rule = str(host), d.rule
            return host
        try:
            addrs = await self.resolver.resolve_addresses(host)
        except ResolveError as e:
            raise _Reject(502, f"cannot resolve {host}: {e}", d.rule) from None
        if not addrs:
            raise _Reject(502, f"{host} has no address", d.rule)
        last: Decision | None = None
        for ip in sorted(addrs, key=lambda a: a.version):
            if self._is_never(ip, port):
                last = Decision(False, "", f"{ip} is a Corral-internal address")
                continue
            last = decide(plan, host, port, ip)
            if last.allowed:
                c.ip, c.rule = str(ip), last.rule
                return ip
        assert last is not None
        c.ip = str(addrs[0])
        raise _Reject(403, last.reason, last.rule)

    def _is_never(self, ip: IPAddress, port: int) -> bool:
        if any(ip.version == n.version and ip in n for n in self.never):
            return True
        return self.address is not None and (str(ip), port) == self.address

    def _check_never(self, c: _Conn, ip: IPAddress, port: int) -> None:
        if self._is_never(ip, port):
            raise _Reject(403, f"{ip} is a Corral-internal address")

    async def _dial_plain(self, ip: IPAddress, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(asyncio.open_connection(str(ip), port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise _Reject(502, f"cannot connect to {ip}:{port}: {type(e).__name__}") from None

    # ------------------------------------------------------------------ explicit proxy

    async def _explicit(self, c: _Conn, sock: socket.socket) -> None:
        data = await self._peek(sock, READ_HEAD_TIMEOUT_S, lambda d: b"\r\n\r\n" in d)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            raise _Reject(400, "incomplete request head")
        line = data[:data.find(b"\r\n")].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Reject(400, "malformed request line")
        method, target = parts[0], parts[1]
        if method == "CONNECT":
            sock.recv(end + 4)  # consume exactly the CONNECT head; the tunnel follows
            host_s, port = _split_authority(target, 0)
            if port == 0:
                raise _Reject(400, "CONNECT needs host:port")
            host = _canonical(host_s)
            c.mode = "connect"
            ip = await self._authorize(c, host, port)
            sock.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = await self._peek(sock, PEEK_TIMEOUT_S, self._complete)
            await self._tunnel(c, sock, host, port, ip, first)
        elif target.startswith("http://"):
            c.mode = "http"
            await self._http(c, sock, fixed=None, default_port=80, proxy_form=True)
        else:
            raise _Reject(400, "this is a proxy: send CONNECT host:port or an absolute http:// URL")

    async def _tunnel(self, c: _Conn, sock: socket.socket, host: str | IPAddress, port: int, ip: IPAddress,
                      first: bytes) -> None:
        if _is_tls(first):
            status, sni = client_hello(first)
            if status != "ok":  # a name the proxy cannot read is not a name it checked
                c.tls = "passthrough"
                raise _Reject(400, f"{'incomplete' if status == 'partial' else 'malformed'} TLS ClientHello")
            if sni:
                sni_host = _canonical(sni)
                if isinstance(host, str) and sni_host != host:
                    c.tls = "passthrough"
                    raise _Reject(403, f"TLS SNI {_host_text(sni_host)} does not match {host}", c.rule)
            binding = c.sb.plan.secret_for(host) if isinstance(host, str) else None
            if binding is not None and self.server_contexts is not None and self.secrets is not None:
                assert isinstance(host, str)
                c.tls = "terminated"
                await self._broker(c, sock, host, port, ip)
            else:
                c.tls = "passthrough"
                await self._splice(c, sock, ip, port)
        elif _REQUEST_LINE.match(first):
            await self._http(c, sock, fixed=(host, port), default_port=port, proxy_form=False)
        else:
            await self._splice(c, sock, ip, port)

    # ------------------------------------------------------------------ transparent

    async def _transparent(self, c: _Conn, sock: socket.socket, orig: tuple[str, int]) -> None:
        orig_ip = canonical_ip(ipaddress.ip_address(orig[0]))
        port = orig[1]
        first = await self._peek(sock, PEEK_TIMEOUT_S, self._complete)
        host: str | IPAddress
        if _is_tls(first):
            status, sni = client_hello(first)
            if status != "ok":
                c.tls = "passthrough"
                raise _Reject(400, f"{'incomplete' if status == 'partial' else 'malformed'} TLS ClientHello")
            host = _canonical(sni) if sni else (self.ledger.name_for(c.sb.sandbox_id, orig_ip) or orig_ip)
        elif _REQUEST_LINE.match(first):
            c.mode = "transparent-http"
            await self._http(c, sock, fixed=None, default_port=port, proxy_form=False)
            return
        else:
            host = self.ledger.name_for(c.sb.sandbox_id, orig_ip) or orig_ip
        ip = await self._authorize(c, host, port)
        await self._tunnel(c, sock, host, port, ip, first)

    # ------------------------------------------------------------------ pass-through

    async def _splice(self, c: _Conn, sock: socket.socket, ip: IPAddress, port: int) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        down = _Relay(c, upstream=False, done=done)
        up = _Relay(c, upstream=True, done=done)
        down.peer, up.peer = up, down
        try:
            await asyncio.wait_for(loop.create_connection(lambda: up, str(ip), port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise _Reject(502, f"cannot connect to {ip}:{port}: {type(e).__name__}") from None
        self._event("net.connect", c)
        dup = socket.socket(fileno=sock.detach())
        try:
            await loop.connect_accepted_socket(lambda: down, dup)
        except BaseException:
            dup.close()
            up._close()
            raise
        try:
            await done
        finally:
            down._close()
            self._event("net.close", c, bytes_up=c.up, bytes_down=c.down,
                        duration_s=round(time.monotonic() - c.started, 3))

    # ------------------------------------------------------------------ HTTP (plain and brokered)

    async def _broker(self, c: _Conn, sock: socket.socket, host: str, port: int, ip: IPAddress) -> None:
        assert self.server_contexts is not None
        loop = asyncio.get_running_loop()
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(str(ip), port, ssl=self.upstream_ssl, server_hostname=host),
                CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise _Reject(502, f"cannot open TLS to {host}:{port}: {type(e).__name__}") from None
        ctx = self.server_contexts(host)
        reader = asyncio.StreamReader(limit=HEAD_LIMIT)
        proto = asyncio.StreamReaderProtocol(reader)
        dup = socket.socket(fileno=sock.detach())
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: proto, dup, ssl=ctx,
                                                              ssl_handshake_timeout=10)
        except BaseException:
            dup.close()
            up_w.close()
            raise
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        self._event("net.connect", c)
        await self._serve(c, reader, writer, fixed=(host, port), default_port=port, proxy_form=False,
                          upstream=(up_r, up_w, host, port), brokered=True)

    async def _http(self, c: _Conn, sock: socket.socket, *, fixed: tuple[str | IPAddress, int] | None,
                    default_port: int, proxy_form: bool) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=HEAD_LIMIT)
        proto = asyncio.StreamReaderProtocol(reader)
        dup = socket.socket(fileno=sock.detach())
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: proto, dup)
        except BaseException:
            dup.close()
            raise
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        await self._serve(c, reader, writer, fixed=fixed, default_port=default_port, proxy_form=proxy_form,
                          upstream=None, brokered=False)

    async def _serve(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     **session: Any) -> None:
        """Run an HTTP session; a refusal is answered on the client's stream (inside TLS when brokered)."""
        try:
            await self._http_session(c, reader, writer, **session)
        except _Reject as e:
            self._event("net.deny", c, reason=e.reason, **({"rule": e.rule} if e.rule else {}))
            with contextlib.suppress(Exception):
                writer.write(_error_response(e.status, e.reason))
                await writer.drain()
        finally:
            writer.close()
            if c.ip:  # (a plain-HTTP session refused before any upstream was chosen connected nothing)
                self._event("net.close", c, bytes_up=c.up, bytes_down=c.down,
                            duration_s=round(time.monotonic() - c.started, 3))

    def _placeholders(self, plan: NetworkPlan) -> list[tuple[SecretBinding, str]]:
        if self.secrets is None:
            return []
        out = []
        for b in plan.secrets:
            ph = self._placeholder_cache.get(b.name)
            if ph is None:
                try:
                    ph = self.secrets.placeholder(b.name)  # stable for the life of the secret
                except Exception:
                    continue
                self._placeholder_cache[b.name] = ph
            out.append((b, ph))
        return out

    async def _http_session(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                            fixed: tuple[str | IPAddress, int] | None, default_port: int, proxy_form: bool,
                            upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter, str | IPAddress, int] | None,
                            brokered: bool) -> None:
        up_w: asyncio.StreamWriter | None = None
        down_task: asyncio.Task[None] | None = None
        current: tuple[str | IPAddress, int] | None = None
        redactor = _Redactor([])
        switching = False
        decided_for: NetworkPlan | None = None

        async def pump(up_r: asyncio.StreamReader) -> None:
            def flush() -> None:
                rest = redactor.flush()
                if rest and not writer.is_closing():
                    writer.write(rest)

            try:
                while True:
                    if redactor.held:
                        # A tail that may begin a secret waits for the upstream's next bytes, not
                        # longer than HOLD_S: the wait is on the upstream only (never on a client
                        # that reads slowly, which could otherwise time the split itself).
                        try:
                            chunk = await asyncio.wait_for(up_r.read(65536), HOLD_S)
                        except TimeoutError:
                            flush()
                            await writer.drain()
                            continue
                    else:
                        chunk = await up_r.read(65536)
                    if not chunk:
                        break
                    c.down += len(chunk)
                    out = redactor.feed(chunk) if redactor.forms else chunk
                    writer.write(out)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError, OSError):
                pass
            finally:
                flush()
                if not switching:
                    # The upstream ended the exchange (maybe the body is delimited by close): so do we.
                    writer.close()

        async def end_upstream(w: asyncio.StreamWriter) -> None:
            """Half-close the upstream and give it up to 30 s to finish its responses."""
            with contextlib.suppress(Exception):
                if w.can_write_eof():
                    w.write_eof()
            if down_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(down_task), 30)

        if upstream is not None:
            up_r0, up_w, h0, p0 = upstream
            current = (h0, p0)
            down_task = asyncio.ensure_future(pump(up_r0))
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial.strip():
                        raise _Reject(400, "incomplete request head") from None
                    break
                except asyncio.LimitOverrunError:
                    raise _Reject(431, "request head too large") from None
                if down_task is not None and down_task.done():
                    break  # the upstream closed; the client will see the close
                method, target, headers = _parse_head(head)
                host_hdrs = [v for k, v in headers if k.lower() == "host"]
                if len(host_hdrs) > 1:
                    raise _Reject(400, "more than one Host header")
                if proxy_form:
                    if not target.startswith("http://"):
                        raise _Reject(400, "absolute http:// URL expected")
                    rest = target[7:]
                    slash = rest.find("/")
                    auth, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
                    if "@" in auth:
                        raise _Reject(403, "credentials in the URL authority are refused")
                else:
                    if not host_hdrs:
                        raise _Reject(400, "Host header required")
                    auth, path = host_hdrs[0], target
                    if not path.startswith("/") and path != "*":
                        raise _Reject(400, "origin-form request target expected")
                host_s, port = _split_authority(auth, default_port)
                host = _canonical(host_s)
                if host_hdrs and proxy_form:
                    hh, hp = _split_authority(host_hdrs[0], 80)
                    if _canonical(hh) != host or hp != port:
                        raise _Reject(403, f"Host header {host_hdrs[0][:100]!r} does not match {auth[:100]!r}")
                if fixed is not None and (host, port) != fixed:
                    raise _Reject(421 if brokered else 403,
                                  f"Host {_host_text(host)}:{port} does not match {_host_text(fixed[0])}:{fixed[1]}")
                if current != (host, port) or up_w is None:
                    if up_w is not None:
                        # A new authority on this client connection: let the old upstream finish its
                        # responses, then dial the new one.
                        switching = True
                        await end_upstream(up_w)
                        up_w.close()
                        up_w = None
                        switching = False
                        redactor = _Redactor([])
                    ip = await self._authorize(c, host, port)
                    up_r, up_w = await self._dial_plain(ip, port)
                    current = (host, port)
                    self._event("net.connect", c)
                    down_task = asyncio.ensure_future(pump(up_r))
                plan = c.sb.plan
                if brokered and plan is not decided_for:
                    # Live policy: a brokered connection is re-decided when the plan changes.
                    d = decide(plan, host, port, ipaddress.ip_address(c.ip) if c.ip else None)
                    if not d.allowed:
                        raise _Reject(403, d.reason, d.rule)
                    decided_for = plan
                if brokered:
                    binding = plan.secret_for(_host_text(host))
                    if binding is not None and not binding.request_allowed(method, path):
                        raise _Reject(403, f"secret {binding.name!r} may not be used for {method} "
                                           f"{path.split('?', 1)[0][:200]}", f"secret:{binding.name}")
                out_headers, uses, misuses, forms = self._inject(plan, _host_text(host), headers, brokered)
                for form, secret_from in forms:
                    redactor.add(form, secret_from)
                line_text = f"{method} {path}"
                for b, ph in self._placeholders(plan):
                    if ph in line_text and (b.name, "request-target") not in misuses:
                        misuses.append((b.name, "request-target"))
                for name in uses:
                    self._event("secret.use", c, secret=name)
                for name, where in misuses:
                    self._event("secret.placeholder_misuse", c, secret=name, where=where)
                upgrade = any(k.lower() == "upgrade" for k, _ in out_headers)
                te = [v.lower() for k, v in out_headers if k.lower() == "transfer-encoding"]
                cl = [v for k, v in out_headers if k.lower() == "content-length"]
                if te and cl:
                    raise _Reject(400, "both Content-Length and Transfer-Encoding")
                if te and te != ["chunked"]:
                    raise _Reject(501, "only Transfer-Encoding: chunked is supported")
                if len(set(cl)) > 1 or (cl and not re.fullmatch(r"[0-9]{1,15}", cl[0])):
                    raise _Reject(400, "invalid Content-Length")
                if brokered and upgrade:
                    raise _Reject(403, "protocol upgrades are refused on brokered connections")
                out = [f"{method} {path} HTTP/1.1"]
                # Rebuilt from the checked authority: the upstream reads the name the policy decided on.
                ht = _host_text(host)
                ht = f"[{ht}]" if ":" in ht else ht
                out.append(f"Host: {ht}" + (f":{port}" if port != (443 if brokered else 80) else ""))
                out += [f"{k}: {v}" for k, v in out_headers if k.lower() != "host"]
                data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
                up_w.write(data)
                c.up += len(data)
                if cl:
                    await self._copy_n(reader, up_w, int(cl[0]), c)
                elif te:
                    await self._copy_chunked(reader, up_w, c)
                await up_w.drain()
                if upgrade:
                    while chunk := await reader.read(65536):
                        c.up += len(chunk)
                        up_w.write(chunk)
                        await up_w.drain()
                    break
            if up_w is not None:
                await end_upstream(up_w)
        finally:
            if down_task is not None and not down_task.done():
                down_task.cancel()
            if up_w is not None:
                up_w.close()

    def _inject(self, plan: NetworkPlan, host: str, headers: list[tuple[str, str]], brokered: bool
                ) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]], list[tuple[bytes, int]]]:
        """(headers to send, secrets used, (secret, where) placeholder misuses, forms to redact)."""
        binding = plan.secret_for(host) if brokered else None
        out = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        if binding is not None:
            # The response is scanned for the value: ask for it unencoded and whole (a compressed or
            # ranged echo of the credential would pass the scan).
            out = [(k, v) for k, v in out if k.lower() not in ("accept-encoding", "range", "if-range")]
            out.append(("Accept-Encoding", "identity"))
        uses: list[str] = []
        misuses: list[tuple[str, str]] = []
        forms: list[tuple[bytes, int]] = []  # (form, where its secret material starts)
        placeholders = self._placeholders(plan)
        value: str | None = None
        if binding is not None:
            assert self.secrets is not None
            try:
                value = self.secrets.get_value(binding.name)
            except Exception:
                raise _Reject(502, f"secret {binding.name!r} is unavailable") from None
            forms.append((value.encode(), 0))
        inj = binding.injection if binding else None
        declared: set[str] = set()
        if isinstance(inj, PlaceholderInjection):
            declared = {h.lower() for h in inj.headers}
        new: list[tuple[str, str]] = []
        for k, v in out:
            lk = k.lower()
            for b, ph in placeholders:
                if ph not in v:
                    continue
                if binding is not None and b.name == binding.name and lk in declared and value is not None:
                    v = v.replace(ph, value)
                    if binding.name not in uses:
                        uses.append(binding.name)
                else:
                    misuses.append((b.name, f"header {k}"))
            new.append((k, v))
        if binding is not None and value is not None:
            if isinstance(inj, HeaderInjection):
                rendered = inj.template.replace("{value}", value)
                new = [(k, v) for k, v in new if k.lower() != inj.header.lower()]
                new.append((inj.header, rendered))
                forms.append((rendered.encode(), len(inj.template.split("{value}", 1)[0].encode())))
                if binding.name not in uses:
                    uses.append(binding.name)
            elif isinstance(inj, BasicAuthInjection):
                token = base64.b64encode(f"{inj.username}:{value}".encode()).decode()
                new = [(k, v) for k, v in new if k.lower() != "authorization"]
                new.append(("Authorization", f"Basic {token}"))
                forms.append((token.encode(), 0))
                if binding.name not in uses:
                    uses.append(binding.name)
        return new, uses, misuses, forms

    @staticmethod
    async def _copy_n(reader: asyncio.StreamReader, w: asyncio.StreamWriter, n: int, c: _Conn) -> None:
        while n > 0:
            chunk = await reader.read(min(n, 65536))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)
            c.up += len(chunk)
            w.write(chunk)
            await w.drain()

    @classmethod
    async def _copy_chunked(cls, reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: _Conn) -> None:
        """Forward a chunked body re-framed: each size line rewritten from the parsed size (chunk
        extensions dropped), trailers dropped. What the upstream parses is what was checked: a lax
        upstream parser cannot read a second request out of an extension or a trailer with a bare LF."""

        async def line() -> bytes:
            try:
                raw = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise _Reject(400, "chunk line too long") from None
            if b"\r" in raw[:-2] or b"\n" in raw[:-2] or b"\x00" in raw:
                raise _Reject(400, "control characters in a chunk line")
            return raw[:-2]

        while True:
            size_s = (await line()).split(b";", 1)[0].strip(b" \t")
            if not size_s or len(size_s) > 16 or not re.fullmatch(rb"[0-9a-fA-F]+", size_s):
                raise _Reject(400, "malformed chunk size")
            size = int(size_s, 16)
            head = f"{size:x}\r\n".encode()
            w.write(head)
            c.up += len(head)
            if size == 0:
                for _ in range(MAX_TRAILERS + 1):
                    if not await line():
                        w.write(b"\r\n")
                        c.up += 2
                        return
                raise _Reject(400, "too many trailer lines")
            await cls._copy_n(reader, w, size, c)
            crlf = await reader.readexactly(2)
            if crlf != b"\r\n":
                raise _Reject(400, "malformed chunk")
            w.write(crlf)


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Reject(400, "malformed request line")
    if not _TARGET.fullmatch(parts[1]) or b"#" in parts[1]:
        raise _Reject(400, "the request target has control, space, non-ASCII or '#' characters")
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        if not raw or raw[:1] in (b" ", b"\t"):
            raise _Reject(400, "obsolete header folding or empty header line")
        name, sep, value = raw.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _Reject(400, "malformed header")
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            raise _Reject(400, "control characters in a header value")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return parts[0].decode(), parts[1].decode("latin-1"), headers


def _error_response(status: int, reason: str) -> bytes:
    text = {400: "Bad Request", 403: "Forbidden", 421: "Misdirected Request", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 502: "Bad Gateway"}.get(status, "Error")
    body = f"corral egress: {reason}\n".encode("utf-8", "replace")
    safe = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")[:200]
    return (f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\nX-Corral-Reason: ").encode() + safe + b"\r\n\r\n" + body

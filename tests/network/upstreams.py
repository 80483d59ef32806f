"""Test upstreams on this machine: a header-reflecting HTTP(S) echo server, a fake authoritative DNS
server that records every query, a test CA, an event loop in a thread, and namespaces.

Nothing here sends a packet off the machine: servers bind loopback or addresses inside network
namespaces the tests create.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import dns.message
import dns.rcode
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


class LoopThread:
    """An asyncio loop in a thread, so that tests can run blocking clients (subprocesses) freely."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrap() -> T:
            return fn()
        return self.run(wrap())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# ----------------------------------------------------------------------------------------- TLS


class UpstreamCA:
    """A CA for the *upstream* servers (not Corral's): the proxy and the clients trust it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral test upstream CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_path = directory / "upstream-ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, names: list[str]) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = self.dir / f"leaf-{uuid.uuid4().hex[:8]}"
        stem.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        stem.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(stem.with_suffix(".pem"), stem.with_suffix(".key"))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


# ----------------------------------------------------------------------------------------- servers


@dataclass
class Seen:
    host: str
    path: str
    headers: dict[str, str]
    tls: bool


@dataclass
class EchoServer:
    """HTTP/1.1 keep-alive server. ``/redirect?to=URL`` answers 302; ``/big?n=N`` sends N bytes;
    anything else answers 200 with a JSON reflection of the request head (headers included)."""

    seen: list[Seen] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("sslcontext") is not None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                _, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                if n:
                    await reader.readexactly(n)
                self.seen.append(Seen(headers.get("host", ""), path, headers, tls))
                if path.startswith("/redirect?to="):
                    status, body, extra = "302 Found", b"", f"Location: {path.split('=', 1)[1]}\r\n"
                elif path.startswith("/big?n="):
                    status, body, extra = "200 OK", b"x" * int(path.split("=", 1)[1]), ""
                else:
                    status, extra = "200 OK", ""
                    body = json.dumps({"host": headers.get("host"), "path": path, "headers": headers,
                                       "tls": tls}).encode()
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
                             "Content-Type: application/json\r\n\r\n".encode() + body)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def serve(self, sock: socket.socket, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.servers.append(await asyncio.start_server(self.handle, sock=sock, ssl=ssl_ctx))

    async def close(self) -> None:
        for s in self.servers:
            s.close()


class FakeDNS(asyncio.DatagramProtocol):
    """An authoritative server for a fixed zone that records every query name it receives."""

    def __init__(self, zone: dict[str, list[str]]) -> None:
        self.zone = zone
        self.queries: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text(omit_final_dot=True).lower()
        self.queries.append(name)
        r = dns.message.make_response(q)
        ips = self.zone.get(name)
        if ips is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        else:
            want = q.question[0].rdtype
            v = [ip for ip in ips if (ipaddress.ip_address(ip).version == 4) == (want == 1)]
            if v and want in (1, 28):
                r.answer.append(dns.rrset.from_text_list(q.question[0].name, 30, "IN",
                                                         "A" if want == 1 else "AAAA", v))
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)


# ----------------------------------------------------------------------------------------- namespaces


def run(args: list[str], check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout, **kw)


class Namespace:
    """A network namespace held by a ``sleep`` (``unshare -n``); commands run in it with nsenter."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "-n", "sleep", "3600"])
        # unshare execs sleep in place: the pid is the namespace's holder. Wait until it is in.
        # (Never go on before: nsenter on this pid would then configure the host's own namespace.)
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"unshare -n exited with {self.proc.returncode}")
            try:
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != mine:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("unshare -n did not enter a new network namespace within 10 s")
            threading.Event().wait(0.01)
        self.pid = self.proc.pid

    def exec(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", "-t", str(self.pid), "-n", *args], check=False, **kw)

    def popen(self, args: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-n", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def socket(self, family: int, type_: int, bind: tuple[str, int]) -> socket.socket:
        """A socket created (and bound) inside this namespace, usable from the host process."""
        out: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                s = socket.socket(family, type_)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(bind)
                if type_ == socket.SOCK_STREAM:
                    s.listen(128)
                s.setblocking(False)
                out.append(s)
            except BaseException as e:
                out.append(e)

        t = threading.Thread(target=inside)  # setns changes only this thread, which then ends
        t.start()
        t.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def upstream_network(addresses: list[str]) -> Iterator[Namespace]:
    """A namespace reachable from the host at 198.18.0.0/24 (benchmarking range) through a veth,
    holding ``addresses``. Removed (veth, route, namespace) on exit."""
    ns = Namespace()
    host_if = "ctu-" + uuid.uuid4().hex[:8]
    try:
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "ctu-peer"])
        run(["ip", "link", "set", "ctu-peer", "netns", str(ns.pid)])
        run(["ip", "addr", "add", "198.18.0.1/24", "dev", host_if])
        run(["ip", "link", "set", host_if, "up"])
        script = ["ip link set ctu-peer name eth0", "ip link set eth0 up", "ip link set lo up"]
        script += [f"ip addr add {a}/24 dev eth0" for a in addresses]
        script.append("ip route add default via 198.18.0.1")
        r = ns.exec(["sh", "-c", " && ".join(script)])
        assert r.returncode == 0, r.stderr
        yield ns
    finally:
        run(["ip", "link", "del", host_if], check=False)
        ns.close()


def sandbox_python(ns: Namespace, code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return ns.exec([sys.executable, "-c", code], timeout=timeout)

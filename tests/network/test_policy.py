"""Pure: canonicalisation of hosts, parsing of policy entries, and the decision function."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from corral.policy.network import (
    BasicAuthInjection,
    HeaderInjection,
    HostError,
    NetworkPolicy,
    PlaceholderInjection,
    SecretBinding,
    canonical_host,
    compile_network,
    decide,
)

ip = ipaddress.ip_address


@pytest.mark.parametrize("spelling", [
    "127.0.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0x7F.0x0.0x0.0x1", "0177.0.0.1", "017700000001",
    "127.1", "127.0.1", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "127.0.0.1.",
])
def test_loopback_spellings_are_one_address(spelling: str) -> None:
    assert canonical_host(spelling) == ip("127.0.0.1")


@pytest.mark.parametrize(("spelling", "expected"), [
    ("169.254.169.254", "169.254.169.254"), ("2852039166", "169.254.169.254"), ("0xa9fea9fe", "169.254.169.254"),
    ("[2606:4700::1111]", "2606:4700::1111"), ("2606:4700:0:0::1111", "2606:4700::1111"),
    ("[::ffff:1.1.1.1]", "1.1.1.1"), ("0", "0.0.0.0"), ("[FD00:EC2::254]", "fd00:ec2::254"),
])
def test_ip_spellings(spelling: str, expected: str) -> None:
    assert canonical_host(spelling) == ip(expected)


@pytest.mark.parametrize(("spelling", "expected"), [
    ("GitHub.COM", "github.com"), ("github.com.", "github.com"), ("bücher.example", "xn--bcher-kva.example"),
    ("a-b_c.example", "a-b_c.example"), ("x" * 63 + ".com", "x" * 63 + ".com"),
])
def test_names_are_canonical(spelling: str, expected: str) -> None:
    assert canonical_host(spelling) == expected


@pytest.mark.parametrize("bad", [
    "", "evil.example\x00.allowed.com", "allowed.com@evil", "evil\\allowed.com", "a..b.com", ".com", "..",
    "x" * 64 + ".com", ".".join(["abcdefghi"] * 26), "evil.com/allowed.com", "a b.com", "allowed.com\n",
    "256.1.1.1", "1.2.3.4.5", "08.1.1.1", "0x1g.1.1.1", "foo.123", "[::1%eth0]", "[1.2.3.4]",
    "-bad.com", "bad-.com", "exa%2emple.com", "allowed.com#evil", "allowed.com?x", "::ffff::1::",
    "allowed.com:443",
    # IDNA 2003 maps these away (straße -> strasse) where IDNA 2008 keeps them (xn--strae-oqa): one
    # spelling, two domains; a deny written one way would not stop the other.
    "straße.example.org", "ς.example", "a\u200db.example", "a\u200cb.example",
])
def test_hostile_names_are_rejected(bad: str) -> None:
    with pytest.raises(HostError):
        canonical_host(bad)


@pytest.mark.parametrize("bad", [
    "*", "*.com", "*.co.uk", "*.uk", "com", "co.uk", "github.io", "*.github.io", "foo.*.com", "*github.com",
    "0.0.0.0/0", "::/0", "pypi.org:0", "pypi.org:70000", "pypi.org:443-80", "pypi.org:x", "a\x00.com",
    "allowed.com@evil.com", "back\\slash.com", "10.0.0.0/33", "[::1", "",
])
def test_bad_allow_entries_are_rejected(bad: str) -> None:
    with pytest.raises(ValidationError):
        NetworkPolicy(allow=[bad])


def test_deny_may_be_broad_and_extra_fields_are_refused() -> None:
    NetworkPolicy(allow=["pypi.org"], deny=["*", "*.com", "0.0.0.0/0"])
    with pytest.raises(ValidationError):
        NetworkPolicy.model_validate({"allow": [], "allow_all": True})
    p = NetworkPolicy(allow=["pypi.org"])
    with pytest.raises(ValidationError):
        p.allow = ["x.org"]  # type: ignore[misc]


PLAN = compile_network(NetworkPolicy(
    allow=["pypi.org", "*.github.com", "github.com:22", "10.20.0.0/16", "api.example.org:8000-8100",
           "[2001:db8::1]:443", "2001:db8:1::/48:8443", "ports.example.org:*"],
    deny=["gist.github.com", "10.20.99.0/24:443"],
))
PUBLIC = ip("93.184.216.34")


@pytest.mark.parametrize(("host", "port", "resolved", "allowed", "rule"), [
    ("pypi.org", 443, PUBLIC, True, "pypi.org"),
    ("PyPI.org.", 80, PUBLIC, True, "pypi.org"),
    ("pypi.org", 8080, PUBLIC, False, ""),                   # default ports are 80 and 443
    ("api.github.com", 443, PUBLIC, True, "*.github.com"),
    ("github.com", 443, PUBLIC, False, ""),                  # *.x does not cover x
    ("github.com", 22, PUBLIC, True, "github.com:22"),
    ("github.com", 25, PUBLIC, False, ""),
    ("gist.github.com", 443, PUBLIC, False, "gist.github.com"),  # deny wins
    ("x.gist.github.com", 443, PUBLIC, True, "*.github.com"),    # exact deny is exact
    ("evil.com", 443, PUBLIC, False, ""),
    ("pypi.org.evil.com", 443, PUBLIC, False, ""),
    ("evilpypi.org", 443, PUBLIC, False, ""),
    ("api.example.org", 8050, PUBLIC, True, "api.example.org:8000-8100"),
    ("ports.example.org", 5, PUBLIC, True, "ports.example.org:*"),
    # rebinding: an allowed name resolving into a special range
    ("pypi.org", 443, ip("169.254.169.254"), False, "pypi.org"),
    ("pypi.org", 443, ip("127.0.0.1"), False, "pypi.org"),
    ("pypi.org", 443, ip("192.168.1.1"), False, "pypi.org"),
    ("pypi.org", 443, ip("100.100.100.200"), False, "pypi.org"),
    ("pypi.org", 443, ip("0.0.0.0"), False, "pypi.org"),
    ("pypi.org", 443, ip("::1"), False, "pypi.org"),
    ("pypi.org", 443, ip("fd00:ec2::254"), False, "pypi.org"),
    ("pypi.org", 443, ip("fe80::1"), False, "pypi.org"),
    ("pypi.org", 443, ip("::ffff:10.0.0.1"), False, "pypi.org"),
    ("pypi.org", 443, ip("10.20.1.1"), True, "pypi.org"),        # ... unless an allow CIDR covers it
    ("pypi.org", 443, ip("10.20.99.1"), False, "10.20.99.0/24:443"),
    # literals
    ("10.20.3.4", 443, None, True, "10.20.0.0/16"),
    ("16703972", 443, None, False, ""),                       # 9.244.... not allowed
    ("10.20.99.5", 443, None, False, "10.20.99.0/24:443"),
    ("10.20.99.5", 80, None, True, "10.20.0.0/16"),
    ("10.21.0.1", 443, None, False, ""),
    ("2130706433", 80, None, False, ""),
    ("0x7f.1", 80, None, False, ""),
    ("[::ffff:169.254.169.254]", 80, None, False, ""),
    ("169.254.169.254", 80, None, False, ""),
    ("2001:db8::1", 443, None, True, "[2001:db8::1]:443"),
    ("[2001:db8:1::5]", 8443, None, True, "2001:db8:1::/48:8443"),
    ("2001:db8:1::5", 443, None, False, ""),
    ("1.1.1.1", 443, None, False, ""),
    ("evil.example\x00.pypi.org", 443, PUBLIC, False, ""),
    ("pypi.org@evil.com", 443, PUBLIC, False, ""),
    ("pypi.org", 0, PUBLIC, False, ""),
])
def test_decide(host: str, port: int, resolved: ipaddress.IPv4Address | None, allowed: bool, rule: str) -> None:
    d = decide(PLAN, host, port, resolved)
    assert (d.allowed, d.rule) == (allowed, rule), d.reason


def test_no_allow_list_means_no_egress() -> None:
    plan = compile_network(NetworkPolicy())
    assert not decide(plan, "pypi.org", 443, PUBLIC).allowed
    assert not decide(plan, "1.1.1.1", 443, None).allowed
    assert not plan.name_may_resolve("pypi.org")


def test_names_are_resolved_only_when_allowed() -> None:
    assert PLAN.name_may_resolve("api.github.com")
    assert not PLAN.name_may_resolve("gist.github.com")
    assert not PLAN.name_may_resolve("exfil-c2VjcmV0.evil.com")
    # a CIDR rule never makes a *name* resolvable (else any name would reach the resolver)
    assert not compile_network(NetworkPolicy(allow=["10.0.0.0/8"])).name_may_resolve("x.internal.corp")
    # a deny on one port only leaves the name resolvable for the others
    plan = compile_network(NetworkPolicy(allow=["a.example.org"], deny=["a.example.org:80"]))
    assert plan.name_may_resolve("a.example.org")
    assert not decide(plan, "a.example.org", 80, PUBLIC).allowed
    assert decide(plan, "a.example.org", 443, PUBLIC).allowed


def test_secret_bindings() -> None:
    b = SecretBinding(name="github", hosts=("API.GitHub.com.", "*.githubusercontent.example"))
    assert b.hosts == ("api.github.com", "*.githubusercontent.example")
    assert b.matches("api.github.com") and b.matches("raw.githubusercontent.example")
    assert not b.matches("github.com") and not b.matches("api.github.com.evil.com")
    assert isinstance(b.injection, HeaderInjection) and b.injection.template == "Bearer {value}"
    SecretBinding(name="n", hosts=("x.example.org",), injection=BasicAuthInjection(username="x-access-token"))
    SecretBinding(name="n", hosts=("x.example.org",), injection={"kind": "placeholder", "headers": ["X-Key"]})
    plan = compile_network(NetworkPolicy(allow=["api.github.com"]), [b])
    assert plan.secret_for("api.github.com") == b and plan.secret_for("evil.com") is None
    for bad in [
        {"name": "Bad Name", "hosts": ["a.example.org"]},
        {"name": "n", "hosts": []},
        {"name": "n", "hosts": ["*"]},
        {"name": "n", "hosts": ["*.com"]},
        {"name": "n", "hosts": ["10.0.0.0/8"]},
        {"name": "n", "hosts": ["a.example.org"], "injection": {"kind": "header", "template": "no value"}},
        {"name": "n", "hosts": ["a.example.org"], "injection": {"kind": "header", "template": "{value}{value}"}},
        {"name": "n", "hosts": ["a.example.org"], "injection": {"kind": "header", "header": "Host"}},
        {"name": "n", "hosts": ["a.example.org"], "injection": {"kind": "header", "template": "x\r\nEvil: {value}"}},
        {"name": "n", "hosts": ["a.example.org"], "injection": {"kind": "placeholder", "headers": ["Content-Length"]}},
        {"name": "n", "hosts": ["a.example.org"], "injection": {"kind": "basic", "username": "a:b"}},
        {"name": "n", "hosts": ["a.example.org"], "env": "1BAD"},
        {"name": "n", "hosts": ["a.example.org"], "value": "leak"},
    ]:
        with pytest.raises(ValidationError):
            SecretBinding.model_validate(bad)
    assert PlaceholderInjection().headers == ("Authorization",)


def test_secret_request_rules() -> None:
    b = SecretBinding(name="gh", hosts=("api.github.com",), allow_requests=("get /repos/org/*", "* /graphql"))
    assert b.allow_requests == ("GET /repos/org/*", "* /graphql")
    ok = [("GET", "/repos/org/x"), ("GET", "/repos/org/x/y?ref=main"), ("POST", "/graphql")]
    bad = [("POST", "/repos/org/x"), ("GET", "/repos/other/x"), ("GET", "/repos/org/../other/x"),
           ("GET", "/repos/org/%2e%2e/other"), ("GET", "/repos/org/./x"), ("GET", "/repos/org%2f..%2fother/x"),
           ("GET", "/repos/org\\x"), ("GET", "/repos/org/x%00"), ("GET", "http://evil/repos/org/x"),
           ("GET", "/graphql/x"), ("get", "/repos/org/a"), ("GET", "/repos/org/x/..;/..;/admin"),
           ("GET", "/repos/org/x%23/../../admin"), ("GET", "/repos/org/x%0a"), ("GET", "/repos/org/%ff")]
    for method, target in ok:
        assert b.request_allowed(method, target), (method, target)
    for method, target in bad:
        assert not b.request_allowed(method, target), (method, target)
    assert SecretBinding(name="x", hosts=("a.example.org",)).request_allowed("DELETE", "/anything")
    for rule in ("GET", "GET repos", "GET /a b", "G3T /a", "/a", "GET /search?q=*", "GET /a[bc]"):
        with pytest.raises(ValueError):
            SecretBinding(name="x", hosts=("a.example.org",), allow_requests=(rule,))

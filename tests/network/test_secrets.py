"""Secrets at rest and the installation CA (no network)."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from corral.network.proxy import _Redactor, parse_sni
from corral.network.secrets import CertificateAuthority, SecretError, SecretStore
from corral.policy.network import SecretBinding

B = SecretBinding(name="github", hosts=("api.github.com",), env="GITHUB_TOKEN")
VALUE = "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"


def test_store_encrypts_at_rest_with_a_private_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_SECRET_KEY", raising=False)
    store = SecretStore(tmp_path)
    info = store.set(B, VALUE)
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600
    for f in tmp_path.iterdir():
        assert VALUE.encode() not in f.read_bytes()
    assert store.get_value("github") == VALUE
    assert SecretStore(tmp_path).get_value("github") == VALUE  # a new instance reads the same key
    listed = store.list()
    assert [(i.name, i.binding) for i in listed] == [("github", B)]
    assert VALUE not in repr(listed)
    # The placeholder is stable across updates and does not reveal the exact length.
    assert info.placeholder.startswith("corral-placeholder-github-") and len(info.placeholder) % 16 == 0
    assert store.set(B, VALUE + "x").placeholder == info.placeholder
    store.delete("github")
    assert store.list() == []
    with pytest.raises(SecretError) as e:
        store.get_value("github")
    assert VALUE not in str(e.value)


def test_tampering_and_wrong_key_are_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_SECRET_KEY", base64.b64encode(os.urandom(32)).decode())
    store = SecretStore(tmp_path)
    store.set(B, VALUE)
    assert not (tmp_path / "secret.key").exists()  # the environment's key is used, no file
    monkeypatch.setenv("CORRAL_SECRET_KEY", os.urandom(32).hex())
    with pytest.raises(SecretError, match="cannot be decrypted"):
        SecretStore(tmp_path).get_value("github")
    monkeypatch.setenv("CORRAL_SECRET_KEY", "short")
    with pytest.raises(SecretError):
        SecretStore(tmp_path).get_value("github")


def test_values_that_could_split_headers_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_SECRET_KEY", raising=False)
    store = SecretStore(tmp_path)
    for bad in ["", "a\r\nX-Evil: 1", "a\x00b"]:
        with pytest.raises(SecretError):
            store.set(B, bad)
    data = json.loads((tmp_path / "secrets.json").read_text()) if (tmp_path / "secrets.json").exists() else {}
    assert data == {}


def test_ca_issues_leaves_clients_can_verify(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(ca.ca_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert CertificateAuthority(tmp_path).ca_pem == ca.ca_pem  # persistent per installation
    ctx = ca.server_context("api.github.com")
    assert ca.server_context("api.github.com") is ctx  # cached
    chain, _ = ca.leaf_pem("api.github.com")
    leaf = x509.load_pem_x509_certificate(chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.github.com"]
    client = ssl.create_default_context(cadata=ca.ca_pem.decode())
    client.load_verify_locations(cadata=ca.ca_pem.decode())
    # A full in-memory handshake: the client trusts the leaf for its name only.
    for name, ok in (("api.github.com", True), ("evil.com", False)):
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        cl = client.wrap_bio(c_in, c_out, server_hostname=name)
        sv = ctx.wrap_bio(s_in, s_out, server_side=True)
        err = None
        for _ in range(10):
            for side in (cl, sv):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    err = e
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if err:
                break
        assert (err is None) == ok


def test_sni_parser_and_redactor() -> None:
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(c_in, c_out, server_hostname="pypi.org")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = c_out.read()
    assert parse_sni(hello) == (True, "pypi.org")
    assert parse_sni(hello[:20]) == (False, None)
    # Split over TLS records of 7 bytes each: the same name; cut short: partial; garbage: malformed.
    from corral.network.proxy import client_hello

    body = hello[5:]
    split = b"".join(b"\x16\x03\x01" + len(body[k:k + 7]).to_bytes(2, "big") + body[k:k + 7]
                     for k in range(0, len(body), 7))
    assert client_hello(split) == ("ok", "pypi.org")
    assert client_hello(split[:len(split) // 2]) == ("partial", None)
    assert client_hello(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff")[0] == "malformed"
    assert client_hello(hello[:5] + b"\x02" + hello[6:])[0] == "malformed"  # not a ClientHello
    r = _Redactor([b"SECRETVALUE"])
    out = r.feed(b"abc SECRET") + r.feed(b"VALUE def SEC") + r.feed(b"RETVALUE") + r.flush()
    assert out == b"abc *********** def ***********"


def test_redactor_pauses_cannot_split_a_value_past_it() -> None:
    """A response tail that may begin a secret is held; when the stream pauses there (the upstream
    sends nothing for a while, or a reading pattern made the chunk end there), the tail goes out with
    its secret part masked and the next bytes are masked as far as they continue the form. Random
    chunkings with pauses anywhere: no 8-byte window of the value ever comes out, and streams
    without the value come out unchanged."""
    import os
    import random

    value = b"ghp_" + os.urandom(16).hex().encode()
    forms = [(value, 0), (b"Bearer " + value, 7)]
    rng = random.Random(7)

    def run(body: bytes) -> bytes:
        r = _Redactor(forms)
        out, i = b"", 0
        while i < len(body):
            n = rng.randrange(1, 40)
            out += r.feed(body[i:i + n])
            i += n
            if rng.random() < 0.3:
                out += r.flush()  # a pause
        return out + r.flush()

    for _ in range(3000):
        pad = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(0, 40)))  # never part of the value
        body = pad + b"Authorization: Bearer " + value + b"\r\n" + value[:rng.randrange(8)] + pad  # + a near miss
        out = run(body)
        assert len(out) == len(body)
        assert not any(value[k:k + 8] in out for k in range(len(value) - 7)), (body, out)
    for _ in range(3000):
        body = os.urandom(rng.randrange(1, 200))
        assert run(body) == body


def test_chunked_request_bodies_are_reframed_not_relayed() -> None:
    """A chunked body goes upstream re-framed from what was parsed: extensions and trailers dropped,
    bare LFs refused, so an upstream with a lax parser cannot find a smuggled second request (one that
    would bypass request rules, or carry the injected credential in its body to a place the attacker
    reads)."""
    import asyncio
    from types import SimpleNamespace

    from corral.network.proxy import EgressProxy, _Reject

    async def relay(data: bytes) -> bytes:
        reader = asyncio.StreamReader(limit=4096)
        reader.feed_data(data)
        reader.feed_eof()
        sent: list[bytes] = []

        class W:
            def write(self, b: bytes) -> None:
                sent.append(bytes(b))

            async def drain(self) -> None:
                pass

        await EgressProxy._copy_chunked(reader, W(), SimpleNamespace(up=0))  # type: ignore[arg-type]
        return b"".join(sent)

    ok = asyncio.run(relay(b"5;name=\"v\"\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next HTTP/1.1\r\n"))
    assert ok == b"5\r\nhello\r\n0\r\n\r\n"
    smuggled = (b"0\r\nx: y\n\nDELETE /forbidden HTTP/1.1\nHost: echo.test\nContent-Length: 60\n\r\n\r\n",
                b"5\n\r\nhello\r\n0\r\n\r\n", b"5;a\nb\r\nhello\r\n0\r\n\r\n", b"0\r\n" + b"t: 1\r\n" * 100 + b"\r\n",
                b"5\r\n" + b"x" * 5000 + b"\r\n0\r\n\r\n"[:0] + b"z" * 5000)
    for bad in smuggled:
        with pytest.raises((_Reject, asyncio.IncompleteReadError)):
            asyncio.run(relay(bad))

"""The daemon <-> agent wire format (corral.agent.protocol). The agent is untrusted: every parse of
its frames must fail with ProtocolError, never with another exception and never by trusting a length."""

from __future__ import annotations

import json
import posixpath
import struct
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from corral.agent import protocol as P

kinds = st.sampled_from(sorted(P.KINDS))
payloads = st.binary(max_size=4096)


def split(frame: bytes) -> tuple[bytes, bytes]:
    """Parse one frame the way the readers do: header first, then exactly `length` bytes."""
    kind, length = P.parse_header(frame[:P.HEADER.size])
    body = frame[P.HEADER.size:]
    assert len(body) == length
    return kind, body


def test_header_layout() -> None:
    assert P.HEADER.size == 5
    assert P.encode(P.STDOUT, b"hi") == b"O\x00\x00\x00\x02hi"
    assert P.encode(P.JSON, b"") == b"J\x00\x00\x00\x00"
    assert P.KINDS == {b"J", b"O", b"E", b"I", b"D"}
    assert P.CHUNK < P.MAX_FRAME


@given(kind=kinds, payload=payloads)
def test_frame_round_trip(kind: bytes, payload: bytes) -> None:
    assert split(P.encode(kind, payload)) == (kind, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4), max_leaves=20)


@given(obj=st.dictionaries(st.text(), json_values, max_size=6))
@example(obj={"op": "exec", "argv": ["sh", "-c", "echo \u00e9\x00"], "env": {"A": "\udc80"}})
def test_json_frame_round_trip(obj: dict[str, Any]) -> None:
    kind, body = split(P.encode_json(obj))
    assert kind == P.JSON
    assert P.decode_json(body) == obj


def test_json_frames_are_compact() -> None:
    assert P.encode_json({"op": "ping", "n": 1})[5:] == b'{"op":"ping","n":1}'


@pytest.mark.parametrize("kind", [b"X", b"j", b"\x00", b"\xff", b"A"])
def test_unknown_kind_is_rejected(kind: bytes) -> None:
    with pytest.raises(P.ProtocolError, match="unknown frame kind"):
        P.parse_header(P.HEADER.pack(kind, 0))


def test_max_frame_is_accepted_one_more_byte_is_not() -> None:
    assert P.parse_header(P.HEADER.pack(P.DATA, P.MAX_FRAME)) == (P.DATA, P.MAX_FRAME)
    assert len(P.encode(P.DATA, b"x" * P.MAX_FRAME)) == P.MAX_FRAME + 5
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.encode(P.DATA, b"x" * (P.MAX_FRAME + 1))
    for length in (P.MAX_FRAME + 1, 2**31, 2**32 - 1):
        with pytest.raises(P.ProtocolError, match="exceeds"):
            P.parse_header(P.HEADER.pack(P.JSON, length))


def test_oversize_json_is_refused_by_the_sender() -> None:
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.encode_json({"data": "x" * P.MAX_FRAME})


@given(header=st.binary(min_size=5, max_size=5))
def test_any_header_parses_or_raises_protocol_error(header: bytes) -> None:
    try:
        kind, length = P.parse_header(header)
    except P.ProtocolError:
        return
    assert kind in P.KINDS and 0 <= length <= P.MAX_FRAME


@pytest.mark.parametrize("payload", [
    b"", b"{", b"}", b"{'a': 1}", b'{"a":}', b"\xff\xfe", b"\x00", b"null", b"[]", b"[1, 2]", b'"text"', b"1",
    b"NaN", b"true", b'{"a":1}{"b":2}', b'{"a": 1} x',
], ids=repr)
def test_bad_json_is_rejected(payload: bytes) -> None:
    with pytest.raises(P.ProtocolError, match="JSON frame"):
        P.decode_json(payload)


@given(payload=st.binary(max_size=512))
def test_any_payload_decodes_to_an_object_or_raises_protocol_error(payload: bytes) -> None:
    try:
        obj = P.decode_json(payload)
    except P.ProtocolError:
        return
    assert isinstance(obj, dict)


@pytest.mark.parametrize("payload", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
                         ids=["list", "object"])
def test_deeply_nested_json_is_a_protocol_error(payload: bytes) -> None:
    assert len(payload) <= P.MAX_FRAME  # fits in one frame: an agent can send it
    with pytest.raises(P.ProtocolError):
        P.decode_json(payload)


# ---- check_path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/a", "/a/b/c", "/a/./b", "/a/.../b", "/..a/b..", "/a b/\u00e9", "/a/",
                                  "//a", "/" + "x" * 4095, "/a/.b", "/-rf"])
def test_accepts_absolute_clean_paths(path: str) -> None:
    assert P.check_path(path) == path


@pytest.mark.parametrize("path,why", [
    ("", "non-empty"), (None, "non-empty"), (b"/a", "non-empty"), (1, "non-empty"), (["/a"], "non-empty"),
    ("a", "not absolute"), ("./a", "not absolute"), ("a/../b", "not absolute"), ("~/a", "not absolute"),
    ("..", "not absolute"), (" /a", "not absolute"),
    ("/..", r"'\.\.' component"), ("/a/..", r"'\.\.' component"), ("/a/../b", r"'\.\.' component"),
    ("/../../etc/passwd", r"'\.\.' component"), ("/a//../b", r"'\.\.' component"),
    ("/a\x00", "NUL"), ("\x00/a", "NUL"), ("/a/\x00/b", "NUL"),
    ("/" + "x" * 4096, "longer than 4096"),
], ids=repr)
def test_rejects_bad_paths(path: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        P.check_path(path)


@given(path=st.text(max_size=64) | st.text(alphabet="/.a\x00", max_size=24))
@example(path="/" + "a" * 5000)
def test_any_text_is_accepted_only_if_it_is_safe(path: str) -> None:
    try:
        out = P.check_path(path)
    except ValueError:
        return
    assert out == path
    assert path.startswith("/") and "\x00" not in path and len(path) <= 4096
    assert ".." not in path.split("/")
    # Resolved under a sandbox root, it stays inside that root.
    assert (posixpath.normpath("/sbroot/" + path) + "/").startswith("/sbroot/")


component = st.text(alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                    min_size=1, max_size=12).filter(lambda c: c != "..")


@given(parts=st.lists(component, max_size=8), trailing=st.booleans())
def test_any_clean_absolute_path_is_accepted(parts: list[str], trailing: bool) -> None:
    path = "/" + "/".join(parts) + ("/" if trailing and parts else "")
    assert P.check_path(path) == path


def test_check_path_survives_the_wire() -> None:
    """What the daemon checks is what the agent receives."""
    path = "/tmp/\u00e9 x/\"q\""
    obj = P.decode_json(split(P.encode_json({"op": "stat", "path": path}))[1])
    assert P.check_path(obj["path"]) == path


def test_version_is_an_int() -> None:
    assert isinstance(P.VERSION, int) and P.VERSION >= 1
    assert json.loads(P.encode_json({"v": P.VERSION})[5:]) == {"v": P.VERSION}
    assert struct.calcsize(">cI") == P.HEADER.size

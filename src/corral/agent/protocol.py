"""Wire format between the daemon and the in-sandbox agent. Stdlib only: it ships into sandboxes.

A connection carries frames: 1 byte kind + 4 bytes big-endian length + payload.
Kinds: J = a JSON object (requests, replies, events); O / E = stdout / stderr bytes;
I = stdin bytes; D = file content bytes. One connection serves one operation: the first frame the
client sends is a J request with an "op"; the agent answers with a J reply that has "ok".
"""

from __future__ import annotations

import json
import struct

TYPE_CHECKING = False  # importing typing costs ~2 ms of every sandbox start; annotations are postponed
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
HEADER = struct.Struct(">cI")
MAX_FRAME = 1 << 20  # 1 MiB: streams are chunked below this
CHUNK = 256 * 1024

JSON = b"J"
STDOUT = b"O"
STDERR = b"E"
STDIN = b"I"
DATA = b"D"
KINDS = frozenset((JSON, STDOUT, STDERR, STDIN, DATA))


class ProtocolError(Exception):
    pass


def encode(kind: bytes, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(kind, len(payload)) + payload


def encode_json(obj: dict[str, Any]) -> bytes:
    return encode(JSON, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(header: bytes) -> tuple[bytes, int]:
    kind, length = HEADER.unpack(header)
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind!r}")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return kind, length


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:  # RecursionError: hostile, deeply nested JSON
        raise ProtocolError(f"bad JSON frame: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON frame is not an object")
    return obj


def check_path(path: Any) -> str:
    """Validate a path the files API is asked about. Raises ValueError with the reason.

    Paths are absolute and free of '..' components and NUL bytes; they are resolved by the agent
    inside the sandbox's own root, never on the host.
    """
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    if "\x00" in path:
        raise ValueError("path contains a NUL byte")
    if not path.startswith("/"):
        raise ValueError(f"path {path!r} is not absolute")
    if ".." in path.split("/"):
        raise ValueError(f"path {path!r} has a '..' component")
    if len(path) > 4096:
        raise ValueError("path is longer than 4096 bytes")
    return path

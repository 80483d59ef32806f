"""Hash chaining of audit records. Pure: the store persists, this module computes and verifies.

Each record's hash is SHA-256 over its predecessor's hash and a canonical JSON encoding of its own
fields, so editing, deleting or reordering any record breaks every hash after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


@dataclass
class AuditEntry:
    seq: int
    ts: float
    key_id: str | None
    action: str
    target: str | None
    result: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def canonical(entry: AuditEntry) -> bytes:
    body = {"seq": entry.seq, "ts": repr(float(entry.ts)), "key_id": entry.key_id, "action": entry.action,
            "target": entry.target, "result": entry.result, "detail": entry.detail}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(entry: AuditEntry) -> str:
    return hashlib.sha256(entry.prev_hash.encode() + b"\n" + canonical(entry)).hexdigest()


@dataclass
class VerifyResult:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    message: str = ""


def verify(entries: Iterable[AuditEntry]) -> VerifyResult:
    prev, expected_seq, n = GENESIS, 1, 0
    for e in entries:
        n += 1
        if e.seq != expected_seq:
            return VerifyResult(False, n, e.seq, f"record {expected_seq} is missing (found {e.seq})")
        if e.prev_hash != prev:
            return VerifyResult(False, n, e.seq, f"record {e.seq} does not link to record {e.seq - 1}")
        if record_hash(e) != e.hash:
            return VerifyResult(False, n, e.seq, f"record {e.seq} was modified after it was written")
        prev, expected_seq = e.hash, e.seq + 1
    return VerifyResult(True, n, None, f"{n} records, chain intact")

"""Hash chaining of audit records (corral.audit.chain): any edit, deletion or reordering is found,
at the record where the chain first breaks, with a message that says what happened."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from corral.audit import chain
from corral.audit.chain import GENESIS, AuditEntry

N = 6


def build(n: int = N, details: list[dict[str, Any]] | None = None) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    prev = GENESIS
    for i in range(1, n + 1):
        e = AuditEntry(seq=i, ts=1_700_000_000.0 + i / 7, key_id="key-0001" if i % 2 else None,
                       action="sandbox.create" if i % 3 else "files.write", target=f"sb-{i:012x}",
                       result="201", detail=(details[i - 1] if details else {"i": i, "path": f"/tmp/{i}"}),
                       prev_hash=prev, hash="")
        e.hash = chain.record_hash(e)
        prev = e.hash
        out.append(e)
    return out


def test_a_built_chain_verifies() -> None:
    r = chain.verify(build())
    assert (r.ok, r.records, r.first_bad_seq) == (True, N, None)
    assert r.message == f"{N} records, chain intact"


def test_empty_chain_verifies() -> None:
    r = chain.verify([])
    assert (r.ok, r.records) == (True, 0)


def test_first_record_links_to_genesis_and_hashes_are_sha256_hex() -> None:
    entries = build()
    assert entries[0].prev_hash == GENESIS == "0" * 64
    for e in entries:
        assert len(e.hash) == 64 and int(e.hash, 16) >= 0
    assert len({e.hash for e in entries}) == N


def test_verify_accepts_a_generator() -> None:
    assert chain.verify(e for e in build()).ok


def test_to_dict_has_every_field() -> None:
    e = build(1)[0]
    assert e.to_dict() == {f.name: getattr(e, f.name) for f in dataclasses.fields(AuditEntry)}


def test_canonical_form_is_stable() -> None:
    """The hash of a record must never change across versions: it is what old logs are verified with."""
    e = AuditEntry(seq=1, ts=1.5, key_id="key-1", action="a", target=None, result="200",
                   detail={"b": [1, "\u00e9"], "a": None}, prev_hash=GENESIS, hash="")
    assert chain.canonical(e) == (b'{"action":"a","detail":{"a":null,"b":[1,"\\u00e9"]},"key_id":"key-1",'
                                  b'"result":"200","seq":1,"target":null,"ts":"1.5"}')
    assert chain.record_hash(e) == chain.record_hash(copy.deepcopy(e))
    # The hash covers the record's content and its predecessor, not its own hash field.
    assert chain.record_hash(dataclasses.replace(e, hash="f" * 64)) == chain.record_hash(e)


def test_integer_and_float_timestamps_hash_alike() -> None:
    # SQLite may hand back a REAL that happens to be integral; the canonical form uses repr(float).
    e = build(1)[0]
    assert chain.record_hash(dataclasses.replace(e, ts=1700000000)) == \
        chain.record_hash(dataclasses.replace(e, ts=1700000000.0))


EDITS: list[tuple[str, Any]] = [
    ("ts", 1.0), ("key_id", "key-evil"), ("key_id", None), ("action", "sandbox.get"), ("target", "sb-ffffffffffff"),
    ("target", None), ("result", "200"), ("detail", {}), ("detail", {"i": 0}), ("hash", "0" * 64),
]


@pytest.mark.parametrize("field,value", EDITS, ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("k", range(1, N + 1))
def test_editing_any_field_of_any_record_is_found_there(k: int, field: str, value: Any) -> None:
    entries = build()
    if getattr(entries[k - 1], field) == value:
        value = "x"
    setattr(entries[k - 1], field, value)
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq, r.records) == (False, k, k)
    assert r.message == f"record {k} was modified after it was written"


@pytest.mark.parametrize("k", range(1, N + 1))
def test_editing_a_nested_detail_value_is_found(k: int) -> None:
    entries = build(details=[{"argv": ["ls", "-l"], "env": {"A": "1"}} for _ in range(N)])
    entries[k - 1].detail["env"]["A"] = "2"
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, k)


@pytest.mark.parametrize("k", range(1, N + 1))
def test_changing_prev_hash_is_found_as_a_broken_link(k: int) -> None:
    entries = build()
    entries[k - 1].prev_hash = "f" * 64
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, k)
    assert r.message == f"record {k} does not link to record {k - 1}"


@pytest.mark.parametrize("k", range(1, N + 1))
def test_rehashing_an_edited_record_breaks_the_next_link(k: int) -> None:
    """An editor who recomputes the edited record's hash still breaks its successor's link."""
    entries = build()
    entries[k - 1].result = "500"
    entries[k - 1].hash = chain.record_hash(entries[k - 1])
    r = chain.verify(entries)
    if k == N:
        assert r.ok  # the last record has no successor: only an anchor outside the log can catch this
    else:
        assert (r.ok, r.first_bad_seq) == (False, k + 1)
        assert r.message == f"record {k + 1} does not link to record {k}"


@pytest.mark.parametrize("k", range(1, N))
def test_deleting_a_record_is_found(k: int) -> None:
    entries = build()
    del entries[k - 1]
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, k + 1)
    assert r.message == f"record {k} is missing (found {k + 1})"


def test_deleting_a_record_and_renumbering_is_found_as_a_broken_link() -> None:
    entries = build()
    del entries[2]
    for i, e in enumerate(entries, start=1):
        e.seq = i
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert "does not link" in r.message


def test_tail_truncation_needs_an_anchor() -> None:
    """Dropping the newest records leaves a valid, shorter chain: verify reports how many records it saw,
    so a caller that knows the expected count (or the last hash) can compare."""
    r = chain.verify(build()[:-2])
    assert (r.ok, r.records) == (True, N - 2)


@pytest.mark.parametrize("k", range(1, N))
def test_swapping_neighbours_is_found(k: int) -> None:
    entries = build()
    entries[k - 1], entries[k] = entries[k], entries[k - 1]
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, k + 1)
    assert f"record {k} is missing" in r.message


def test_swapping_with_seqs_renumbered_is_found() -> None:
    entries = build()
    entries[1], entries[2] = entries[2], entries[1]
    entries[1].seq, entries[2].seq = 2, 3
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, 2)
    assert r.message == "record 2 does not link to record 1"


def test_inserting_a_record_is_found() -> None:
    entries = build()
    forged = dataclasses.replace(entries[2])
    entries.insert(3, forged)
    r = chain.verify(entries)
    assert (r.ok, r.first_bad_seq) == (False, 3)


def test_a_chain_that_does_not_start_at_one_is_found() -> None:
    r = chain.verify(build()[2:])
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert r.message == "record 1 is missing (found 3)"


def test_records_counts_up_to_the_bad_one() -> None:
    entries = build()
    entries[3].action = "x"
    assert chain.verify(entries).records == 4

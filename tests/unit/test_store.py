"""The store (corral.daemon.store) on a temporary SQLite file: migrations, table definitions, sandbox
records, and the append-only, hash-chained audit log."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.audit import chain
from corral.daemon import store as st_mod
from corral.daemon.store import SandboxRecord, Store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "corral.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    yield s
    s.close()


def raw(db: Path) -> contextlib.closing[sqlite3.Connection]:
    """A connection that bypasses the Store, like someone with access to the file (autocommit; closed on exit)."""
    return contextlib.closing(sqlite3.connect(db, isolation_level=None))


# ---- migrations ----------------------------------------------------------------------------------
def test_migrations_are_numbered_in_order() -> None:
    versions = [v for v, _, _ in st_mod.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert all(desc.strip() and stmts for _, desc, stmts in st_mod.MIGRATIONS)


def test_schema_version_is_the_last_migration(store: Store) -> None:
    assert store.schema_version() == st_mod.MIGRATIONS[-1][0]


def test_migrations_apply_once_and_reopen_is_idempotent(db: Path) -> None:
    Store(db).close()
    with raw(db) as c:
        first = c.execute("SELECT version, description, applied_at FROM schema_version ORDER BY version").fetchall()
        schema = c.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    assert [r[0] for r in first] == [v for v, _, _ in st_mod.MIGRATIONS]
    for _ in range(2):
        s = Store(db)
        assert s.migrate() == st_mod.MIGRATIONS[-1][0]  # and a second migrate() in the same process
        assert s.schema_version() == st_mod.MIGRATIONS[-1][0]
        s.close()
    with raw(db) as c:
        assert c.execute("SELECT version, description, applied_at FROM schema_version ORDER BY version").fetchall() == first
        assert c.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == schema


def test_the_database_is_in_wal_mode(db: Path, store: Store) -> None:
    with raw(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _pragma(db: Path, table: str) -> list[tuple[str, int]]:
    with raw(db) as c:
        return [(r[1], r[5]) for r in c.execute(f"PRAGMA table_info({table})")]  # (name, pk position)


def test_every_table_has_a_definition_and_every_definition_a_table(db: Path, store: Store) -> None:
    with raw(db) as c:
        in_db = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
    assert in_db == set(st_mod.metadata.tables)


@pytest.mark.parametrize("table", sorted(st_mod.metadata.tables))
def test_table_definition_columns_match_the_migrated_database(db: Path, store: Store, table: str) -> None:
    t = st_mod.metadata.tables[table]
    cols = _pragma(db, table)
    assert [name for name, _ in cols] == [c.name for c in t.columns]
    assert {name for name, pk in cols if pk} == {c.name for c in t.primary_key.columns}
    assert store.table_columns(table) == [c.name for c in t.columns]


def test_audit_table_is_append_only_by_trigger(db: Path, store: Store) -> None:
    with raw(db) as c:
        triggers = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name='audit'")}
    assert {"audit_no_update", "audit_no_delete"} <= triggers


# ---- sandboxes -----------------------------------------------------------------------------------
def rec(sid: str = "sb-0123456789ab", created_at: float = 1000.0, **kw: Any) -> SandboxRecord:
    base: dict[str, Any] = dict(id=sid, template="base", policy={"template": "base", "env": {"A": "\u00e9"}},
                                metadata={"owner": "me"}, desired="running", status="creating", reason="Creating",
                                message="", created_at=created_at)
    base.update(kw)
    return SandboxRecord(**base)


def test_sandbox_insert_get_round_trip(store: Store) -> None:
    r = rec(started_at=1001.5, timeout_at=2000.0, owner_key="key-0001")
    store.insert_sandbox(r)
    assert store.get_sandbox(r.id) == r
    assert store.get_sandbox("sb-ffffffffffff") is None


def test_sandbox_update(store: Store) -> None:
    store.insert_sandbox(rec())
    store.update_sandbox("sb-0123456789ab", status="running", reason="Started", started_at=5.0,
                         policy={"template": "busybox"}, metadata={"k": "v"})
    got = store.get_sandbox("sb-0123456789ab")
    assert got is not None
    assert (got.status, got.reason, got.started_at) == ("running", "Started", 5.0)
    assert got.policy == {"template": "busybox"} and got.metadata == {"k": "v"}
    assert got.desired == "running" and got.created_at == 1000.0  # untouched columns stay


def test_update_of_an_unknown_column_raises(store: Store) -> None:
    store.insert_sandbox(rec())
    with pytest.raises(sqlalchemy.exc.SQLAlchemyError):
        store.update_sandbox("sb-0123456789ab", no_such_column=1)


def test_duplicate_sandbox_id_raises(store: Store) -> None:
    store.insert_sandbox(rec())
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.insert_sandbox(rec())


def test_sandbox_list_is_ordered_and_hides_deleted(store: Store) -> None:
    a, b, c = rec("sb-00000000000a", 3.0), rec("sb-00000000000b", 1.0), rec("sb-00000000000c", 2.0)
    for r in (a, b, c):
        store.insert_sandbox(r)
    assert [r.id for r in store.list_sandboxes()] == [b.id, c.id, a.id]
    store.update_sandbox(c.id, deleted_at=9.0)
    assert [r.id for r in store.list_sandboxes()] == [b.id, a.id]
    assert [r.id for r in store.list_sandboxes(include_deleted=True)] == [b.id, c.id, a.id]
    assert store.get_sandbox(c.id) is None


def test_sandboxes_survive_reopening(db: Path) -> None:
    s = Store(db)
    s.insert_sandbox(rec())
    s.close()
    s = Store(db)
    assert s.get_sandbox("sb-0123456789ab") == rec()
    s.close()


def test_api_keys_round_trip(store: Store) -> None:
    store.add_api_key("key-1", "local-admin", "ab" * 32, "admin")
    (k,) = store.api_keys()
    assert {x: k[x] for x in ("id", "name", "key_hash", "role")} == {
        "id": "key-1", "name": "local-admin", "key_hash": "ab" * 32, "role": "admin"}
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.add_api_key("key-2", "dup", "ab" * 32, "admin")  # key hashes are unique


# ---- audit ---------------------------------------------------------------------------------------
def test_audit_append_builds_a_chain(store: Store) -> None:
    entries = [store.append_audit("key-1", "sandbox.create", "sb-0123456789ab", "201", {"i": i}) for i in range(3)]
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == chain.GENESIS
    assert [e.prev_hash for e in entries[1:]] == [e.hash for e in entries[:-1]]
    assert store.audit_entries() == entries
    assert chain.verify(store.iter_audit()).ok


def test_audit_chain_continues_across_reopening(db: Path) -> None:
    s = Store(db)
    first = [s.append_audit(None, "a", None, "200", {"n": i}) for i in range(3)]
    s.close()
    s = Store(db)
    more = [s.append_audit("key-1", "b", "sb-0123456789ab", "204", {}) for _ in range(2)]
    assert [e.seq for e in more] == [4, 5]
    assert more[0].prev_hash == first[-1].hash
    r = chain.verify(s.iter_audit())
    assert (r.ok, r.records) == (True, 5)
    s.close()


def test_audit_queries(store: Store) -> None:
    for i in range(6):
        store.append_audit(None, "x", "sb-00000000000a" if i % 2 else "sb-00000000000b", "200", {"i": i})
    assert [e.seq for e in store.audit_entries(target="sb-00000000000a")] == [2, 4, 6]
    assert [e.seq for e in store.audit_entries(after_seq=4)] == [5, 6]
    assert [e.seq for e in store.audit_entries(limit=2)] == [1, 2]
    assert [e.seq for e in store.iter_audit(batch=4)] == [1, 2, 3, 4, 5, 6]


def test_audit_detail_with_unicode_and_floats_verifies_after_reload(store: Store) -> None:
    store.append_audit(None, "files.write", None, "200",
                       {"path": "/tmp/\u00e9\udc80\u2028", "f": 0.1, "big": 10**20, "neg": -0.0, "n": None,
                        "nested": {"b": [1, 2.5, "x"], "a": True}})
    assert chain.verify(store.iter_audit()).ok


detail_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3), max_leaves=8)


@settings(max_examples=30)
@given(details=st.lists(st.dictionaries(st.text(), detail_values, max_size=4), min_size=1, max_size=4))
def test_any_json_detail_verifies_after_reload(tmp_path_factory: pytest.TempPathFactory,
                                               details: list[dict[str, Any]]) -> None:
    s = Store(tmp_path_factory.mktemp("h") / "corral.db")
    for d in details:
        s.append_audit(None, "x", None, "200", d)
    r = chain.verify(s.iter_audit())
    s.close()
    assert r.ok, r.message


@pytest.mark.parametrize("sql", [
    "UPDATE audit SET result = '403' WHERE seq = 2",
    "UPDATE audit SET detail = '{}'",
    "DELETE FROM audit WHERE seq = 3",
    "DELETE FROM audit",
])
def test_update_and_delete_on_the_audit_table_raise(db: Path, store: Store, sql: str) -> None:
    for i in range(3):
        store.append_audit(None, "a", None, "200", {"i": i})
    before = store.audit_entries()
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="append-only"):
        with store.engine.begin() as c:
            c.exec_driver_sql(sql)
    with raw(db) as c, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        c.execute(sql)
    assert store.audit_entries() == before


def test_insert_or_replace_on_the_audit_table_raises(db: Path, store: Store) -> None:
    for i in range(3):
        store.append_audit(None, "a", None, "200", {"i": i})
    with raw(db) as c, pytest.raises(sqlite3.IntegrityError):
        c.execute("INSERT OR REPLACE INTO audit (seq, ts, key_id, action, target, result, detail, prev_hash, hash) "
                  "SELECT seq, ts, key_id, action, target, '403', detail, prev_hash, hash FROM audit WHERE seq = 2")


@pytest.mark.parametrize("column,value", [("result", "'403'"), ("detail", "'{\"i\": 99}'"), ("ts", "ts + 1"),
                                          ("key_id", "'key-evil'"), ("action", "'sandbox.get'")])
def test_an_edit_after_dropping_the_triggers_fails_verify(db: Path, column: str, value: str) -> None:
    s = Store(db)
    for i in range(4):
        s.append_audit("key-1", "a", "sb-0123456789ab", "200", {"i": i})
    s.close()
    with raw(db) as c:  # an attacker with write access to the file
        c.execute("DROP TRIGGER audit_no_update")
        c.execute(f"UPDATE audit SET {column} = {value} WHERE seq = 2")
    s = Store(db)
    r = chain.verify(s.iter_audit())
    s.close()
    assert (r.ok, r.first_bad_seq) == (False, 2)
    assert r.message == "record 2 was modified after it was written"


def test_a_deletion_after_dropping_the_triggers_fails_verify(db: Path) -> None:
    s = Store(db)
    for i in range(4):
        s.append_audit(None, "a", None, "200", {"i": i})
    s.close()
    with raw(db) as c:
        c.execute("DROP TRIGGER audit_no_delete")
        c.execute("DELETE FROM audit WHERE seq = 2")
    s = Store(db)
    r = chain.verify(s.iter_audit())
    s.close()
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert r.message == "record 2 is missing (found 3)"


def test_sandbox_record_fields_match_the_table() -> None:
    fields = [f.name for f in dataclasses.fields(SandboxRecord) if f.name != "extra"]
    assert fields == [c.name for c in st_mod.sandboxes.columns]

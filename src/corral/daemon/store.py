"""The store: SQLAlchemy 2 on SQLite (WAL). The only module that writes SQL.

Schema changes are migrations: append to ``MIGRATIONS``, never edit one that has shipped. The
audit table is append-only at the database level (triggers refuse UPDATE and DELETE), and every
record carries the hash of its predecessor (see ``corral.audit.chain``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.pool import StaticPool

from corral.audit.chain import GENESIS, AuditEntry, record_hash

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema", [
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL, created_at REAL NOT NULL)""",
        """CREATE TABLE sandboxes (
            id TEXT PRIMARY KEY, template TEXT NOT NULL, policy TEXT NOT NULL, metadata TEXT NOT NULL,
            desired TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL,
            created_at REAL NOT NULL, started_at REAL, stopped_at REAL, timeout_at REAL, deleted_at REAL,
            owner_key TEXT)""",
        "CREATE INDEX sandboxes_live ON sandboxes (deleted_at)",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY, ts REAL NOT NULL, key_id TEXT, action TEXT NOT NULL,
            target TEXT, result TEXT NOT NULL, detail TEXT NOT NULL, prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)""",
        "CREATE INDEX audit_target ON audit (target, seq)",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    ]),
    (2, "audit: refuse INSERT OR REPLACE over an existing record", [
        """CREATE TRIGGER audit_no_replace BEFORE INSERT ON audit
            WHEN NEW.seq <= (SELECT COALESCE(MAX(seq), 0) FROM audit)
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    ]),
    (3, "snapshots", [
        """CREATE TABLE snapshots (
            id TEXT PRIMARY KEY, name TEXT UNIQUE, sandbox_id TEXT NOT NULL, template TEXT NOT NULL,
            parent TEXT, created_at REAL NOT NULL, files INTEGER NOT NULL, size_bytes INTEGER NOT NULL,
            new_bytes INTEGER NOT NULL, deleted_at REAL)""",
    ]),
    (4, "volumes", [
        """CREATE TABLE volumes (
            name TEXT PRIMARY KEY, size_mib INTEGER NOT NULL, created_at REAL NOT NULL)""",
    ]),
    (5, "audit: query by kind and time", [
        "CREATE INDEX audit_action ON audit (action, seq)",
        "CREATE INDEX audit_ts ON audit (ts)",
    ]),
]

metadata = MetaData()
schema_version = Table("schema_version", metadata, Column("version", Integer, primary_key=True),
                       Column("description", Text), Column("applied_at", Float))
api_keys = Table("api_keys", metadata, Column("id", String, primary_key=True), Column("name", String),
                 Column("key_hash", String), Column("role", String), Column("created_at", Float))
sandboxes = Table(
    "sandboxes", metadata, Column("id", String, primary_key=True), Column("template", String),
    Column("policy", Text), Column("metadata", Text), Column("desired", String), Column("status", String),
    Column("reason", String), Column("message", Text), Column("created_at", Float), Column("started_at", Float),
    Column("stopped_at", Float), Column("timeout_at", Float), Column("deleted_at", Float), Column("owner_key", String),
)
snapshots = Table(
    "snapshots", metadata, Column("id", String, primary_key=True), Column("name", String),
    Column("sandbox_id", String), Column("template", String), Column("parent", String),
    Column("created_at", Float), Column("files", Integer), Column("size_bytes", Integer),
    Column("new_bytes", Integer), Column("deleted_at", Float),
)
volumes = Table("volumes", metadata, Column("name", String, primary_key=True), Column("size_mib", Integer),
                Column("created_at", Float))
audit = Table(
    "audit", metadata, Column("seq", Integer, primary_key=True), Column("ts", Float), Column("key_id", String),
    Column("action", String), Column("target", String), Column("result", String), Column("detail", Text),
    Column("prev_hash", String), Column("hash", String),
)


@dataclass
class SandboxRecord:
    id: str
    template: str
    policy: dict[str, Any]
    metadata: dict[str, str]
    desired: str
    status: str
    reason: str
    message: str
    created_at: float
    started_at: float | None = None
    stopped_at: float | None = None
    timeout_at: float | None = None
    deleted_at: float | None = None
    owner_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _row_to_sandbox(row: Any) -> SandboxRecord:
    m = row._mapping
    return SandboxRecord(
        id=m["id"], template=m["template"], policy=json.loads(m["policy"]), metadata=json.loads(m["metadata"]),
        desired=m["desired"], status=m["status"], reason=m["reason"], message=m["message"],
        created_at=m["created_at"], started_at=m["started_at"], stopped_at=m["stopped_at"],
        timeout_at=m["timeout_at"], deleted_at=m["deleted_at"], owner_key=m["owner_key"],
    )


class Store:
    def __init__(self, url_or_path: str | Path):
        url = str(url_or_path)
        if "://" not in url:
            url = f"sqlite:///{url}"
        self.engine: Engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", self._on_connect)
        self._lock = threading.RLock()
        self._last_hash: str | None = None
        self._last_seq = 0
        self.migrate()

    @staticmethod
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA recursive_triggers=ON")  # REPLACE then fires the DELETE trigger too
        cur.close()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._lock, self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ---- migrations --------------------------------------------------------------------------
    def migrate(self) -> int:
        with self._tx() as c:
            c.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                              "description TEXT, applied_at REAL)")
            current = c.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc())).first()
            have = current[0] if current else 0
            for version, desc, stmts in MIGRATIONS:
                if version <= have:
                    continue
                for stmt in stmts:
                    c.exec_driver_sql(stmt)
                c.execute(insert(schema_version).values(version=version, description=desc, applied_at=time.time()))
                have = version
        return have

    def schema_version(self) -> int:
        with self._tx() as c:
            return int(c.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc()).limit(1))
                       .scalar_one())

    def table_columns(self, table: str) -> list[str]:
        with self._tx() as c:
            return [r[1] for r in c.exec_driver_sql(f"PRAGMA table_info({table})")]

    # ---- API keys ----------------------------------------------------------------------------
    def add_api_key(self, key_id: str, name: str, key_hash: str, role: str) -> None:
        with self._tx() as c:
            c.execute(insert(api_keys).values(id=key_id, name=name, key_hash=key_hash, role=role, created_at=time.time()))

    def api_keys(self) -> list[dict[str, Any]]:
        with self._tx() as c:
            return [dict(r._mapping) for r in c.execute(select(api_keys))]

    # ---- sandboxes ---------------------------------------------------------------------------
    def insert_sandbox(self, rec: SandboxRecord) -> None:
        with self._tx() as c:
            c.execute(insert(sandboxes).values(
                id=rec.id, template=rec.template, policy=json.dumps(rec.policy), metadata=json.dumps(rec.metadata),
                desired=rec.desired, status=rec.status, reason=rec.reason, message=rec.message,
                created_at=rec.created_at, started_at=rec.started_at, stopped_at=rec.stopped_at,
                timeout_at=rec.timeout_at, deleted_at=rec.deleted_at, owner_key=rec.owner_key))

    def update_sandbox(self, sandbox_id: str, **values: Any) -> None:
        for k in ("policy", "metadata"):
            if k in values:
                values[k] = json.dumps(values[k])
        with self._tx() as c:
            c.execute(update(sandboxes).where(sandboxes.c.id == sandbox_id).values(**values))

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        with self._tx() as c:
            row = c.execute(select(sandboxes).where(sandboxes.c.id == sandbox_id,
                                                    sandboxes.c.deleted_at.is_(None))).first()
        return _row_to_sandbox(row) if row else None

    def list_sandboxes(self, include_deleted: bool = False) -> list[SandboxRecord]:
        q = select(sandboxes).order_by(sandboxes.c.created_at)
        if not include_deleted:
            q = q.where(sandboxes.c.deleted_at.is_(None))
        with self._tx() as c:
            return [_row_to_sandbox(r) for r in c.execute(q)]

    # ---- snapshots ---------------------------------------------------------------------------
    def insert_snapshot(self, **values: Any) -> None:
        with self._tx() as c:
            c.execute(insert(snapshots).values(**values))

    def list_snapshots(self) -> list[dict[str, Any]]:
        with self._tx() as c:
            rows = c.execute(select(snapshots).where(snapshots.c.deleted_at.is_(None)).order_by(snapshots.c.created_at))
            return [dict(r._mapping) for r in rows]

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as c:
            c.execute(update(snapshots).where(snapshots.c.id == snapshot_id).values(deleted_at=time.time(), name=None))

    # ---- volumes -----------------------------------------------------------------------------
    def insert_volume(self, name: str, size_mib: int) -> None:
        with self._tx() as c:
            c.execute(insert(volumes).values(name=name, size_mib=size_mib, created_at=time.time()))

    def list_volumes(self) -> list[dict[str, Any]]:
        with self._tx() as c:
            return [dict(r._mapping) for r in c.execute(select(volumes).order_by(volumes.c.name))]

    def delete_volume(self, name: str) -> None:
        with self._tx() as c:
            c.execute(volumes.delete().where(volumes.c.name == name))

    # ---- audit -------------------------------------------------------------------------------
    def append_audit(self, key_id: str | None, action: str, target: str | None, result: str,
                     detail: dict[str, Any]) -> AuditEntry:
        return self.append_audit_many([(key_id, action, target, result, detail, None)])[0]

    def append_audit_many(self, items: list[tuple[str | None, str, str | None, str, dict[str, Any], float | None]]
                          ) -> list[AuditEntry]:
        """Append records (key_id, action, target, result, detail, ts or None for now) in one transaction."""
        out: list[AuditEntry] = []
        with self._tx() as c:
            if self._last_hash is None:
                last = c.execute(select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)).first()
                self._last_seq, self._last_hash = (last[0], last[1]) if last else (0, GENESIS)
            seq, prev = self._last_seq, self._last_hash
            rows = []
            for key_id, action, target, result, detail, ts in items:
                seq += 1
                entry = AuditEntry(seq=seq, ts=ts if ts is not None else time.time(), key_id=key_id, action=action,
                                   target=target, result=result, detail=detail, prev_hash=prev, hash="")
                entry.hash = record_hash(entry)
                prev = entry.hash
                out.append(entry)
                rows.append(dict(seq=entry.seq, ts=entry.ts, key_id=key_id, action=action, target=target,
                                 result=result, detail=json.dumps(detail, sort_keys=True, separators=(",", ":")),
                                 prev_hash=entry.prev_hash, hash=entry.hash))
            try:
                if rows:
                    c.execute(insert(audit), rows)
            except Exception:
                self._last_hash = None  # re-read the tail next time
                raise
            self._last_seq, self._last_hash = seq, prev
            return out

    def audit_entries(self, target: str | None = None, after_seq: int = 0, limit: int | None = None,
                      kind: str | None = None, since: float | None = None, until: float | None = None
                      ) -> list[AuditEntry]:
        """Records after ``after_seq``; ``kind`` matches an action exactly or, ending in '.', as a prefix."""
        q = select(audit).where(audit.c.seq > after_seq).order_by(audit.c.seq)
        if target:
            q = q.where(audit.c.target == target)
        if kind:
            q = q.where(audit.c.action.startswith(kind, autoescape=True) if kind.endswith(".")
                        else audit.c.action == kind)
        if since is not None:
            q = q.where(audit.c.ts >= since)
        if until is not None:
            q = q.where(audit.c.ts < until)
        if limit:
            q = q.limit(limit)
        with self._tx() as c:
            rows = c.execute(q).all()
        return [AuditEntry(seq=r.seq, ts=r.ts, key_id=r.key_id, action=r.action, target=r.target, result=r.result,
                           detail=json.loads(r.detail), prev_hash=r.prev_hash, hash=r.hash) for r in rows]

    def audit_last_seq(self) -> int:
        with self._tx() as c:
            row = c.execute(select(audit.c.seq).order_by(audit.c.seq.desc()).limit(1)).first()
        return int(row[0]) if row else 0

    def iter_audit(self, batch: int = 5000) -> Iterator[AuditEntry]:
        after = 0
        while True:
            rows = self.audit_entries(after_seq=after, limit=batch)
            if not rows:
                return
            yield from rows
            after = rows[-1].seq

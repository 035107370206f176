"""Versioned schema migrations of the bank's database, for SQLite and PostgreSQL.

Each migration runs once, in order, in one transaction with the record that it ran
(``schema_migrations``); concurrent workers starting together wait for each other (SQLite's write
lock, a PostgreSQL advisory lock). A database newer than this code is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from eclm.errors import BankError
from module_bank.db import Database, Tx

MIGRATION_LOCK = 4_201_311  # the advisory lock key that serialises migrations on PostgreSQL

BASE = """
CREATE TABLE IF NOT EXISTS deltas (
    delta_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, received {real} NOT NULL,
    status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',
    payload {blob}, merged_round INTEGER, bytes INTEGER NOT NULL DEFAULT 0,
    parts TEXT NOT NULL DEFAULT '[]', done TEXT NOT NULL DEFAULT '{{}}', waiting_since INTEGER
);
CREATE INDEX IF NOT EXISTS deltas_status ON deltas(status);
CREATE TABLE IF NOT EXISTS versions (
    part_id TEXT NOT NULL, version INTEGER NOT NULL, created {real} NOT NULL, round INTEGER,
    deltas TEXT NOT NULL, PRIMARY KEY (part_id, version)
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, created {real} NOT NULL, outcome TEXT NOT NULL, metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejects (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    kind TEXT NOT NULL, subject TEXT NOT NULL, created {real} NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (kind, subject)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, last_seen {real} NOT NULL, online INTEGER NOT NULL DEFAULT 0,
    bundle TEXT NOT NULL DEFAULT '', modules TEXT NOT NULL DEFAULT '{{}}', importance TEXT NOT NULL DEFAULT '[]',
    trainable INTEGER NOT NULL DEFAULT 1, profile TEXT NOT NULL DEFAULT '', last_derived TEXT NOT NULL DEFAULT '',
    last_event TEXT NOT NULL DEFAULT '', profiled INTEGER NOT NULL DEFAULT 0
)
"""

WORKERS = """
CREATE TABLE IF NOT EXISTS claims (name TEXT PRIMARY KEY, owner TEXT NOT NULL, until {real} NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    device_id TEXT PRIMARY KEY, profile TEXT NOT NULL, importance TEXT NOT NULL, reason TEXT NOT NULL,
    enqueued {real} NOT NULL, not_before {real} NOT NULL, owner TEXT NOT NULL DEFAULT '',
    until {real} NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS job_done (device_id TEXT PRIMARY KEY, finished {real} NOT NULL)
"""

PG_PARTS = """
CREATE TABLE IF NOT EXISTS bank_info (id INTEGER PRIMARY KEY CHECK (id = 1), info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bank_secret (id INTEGER PRIMARY KEY CHECK (id = 1), secret BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS part_tensors (
    part_id TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (part_id, version)
)
"""


def _statements(template: str, dialect: str) -> list[str]:
    types = {"real": "DOUBLE PRECISION", "blob": "BYTEA"} if dialect == "postgresql" else {"real": "REAL",
                                                                                        "blob": "BLOB"}
    return [s.strip() for s in template.format(**types).split(";") if s.strip()]


def _base(tx: Tx, dialect: str) -> None:
    for sql in _statements(BASE, dialect):
        tx.execute(sql)
    if dialect != "sqlite":
        return
    # A SQLite ledger from before migrations were versioned may lack columns added since.
    device_cols = {r[1] for r in tx.query("PRAGMA table_info(devices)")}
    if "profiled" not in device_cols:
        tx.execute("ALTER TABLE devices ADD COLUMN profiled INTEGER NOT NULL DEFAULT 0")
        tx.execute("UPDATE devices SET profiled = 1 WHERE profile != '' OR modules != '{}'")
    delta_cols = {r[1] for r in tx.query("PRAGMA table_info(deltas)")}
    for name, decl in (("parts", "TEXT NOT NULL DEFAULT '[]'"), ("done", "TEXT NOT NULL DEFAULT '{}'"),
                       ("waiting_since", "INTEGER")):
        if name not in delta_cols:
            tx.execute(f"ALTER TABLE deltas ADD COLUMN {name} {decl}")


def _workers(tx: Tx, dialect: str) -> None:
    for sql in _statements(WORKERS, dialect):
        tx.execute(sql)
    tx.execute("CREATE INDEX IF NOT EXISTS deltas_pending ON deltas(status, received)")


def _pg_parts(tx: Tx, dialect: str) -> None:
    if dialect == "postgresql":  # a directory bank keeps its tensors in files beside the SQLite ledger
        for sql in _statements(PG_PARTS, dialect):
            tx.execute(sql)


def _environments(tx: Tx, dialect: str) -> None:
    # Where each device works and which environment line its module versions come from (cloud_sync/lines.py).
    for name in ("environment", "line_env"):
        tx.execute(f"ALTER TABLE devices ADD COLUMN {name} TEXT NOT NULL DEFAULT ''")


def _sent(tx: Tx, dialect: str) -> None:
    # The module versions (by line key) last sent to each device, so that a refused version is not sent again
    # after a restart or by another worker (cloud_sync/lines.py ``behind``).
    tx.execute("ALTER TABLE devices ADD COLUMN sent TEXT NOT NULL DEFAULT '{}'")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Tx, str], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger: deltas, versions, rounds, rejects, quarantine, meta, devices", _base),
    Migration(2, "workers: merge claims and the derivation job queue", _workers),
    Migration(3, "bank parts and info in the database (PostgreSQL)", _pg_parts),
    Migration(4, "devices: environment and the environment line of their versions", _environments),
    Migration(5, "devices: the module versions last sent to each", _sent),
)
LATEST = MIGRATIONS[-1].version


def migrate(db: Database) -> int:
    """Bring ``db`` to the latest schema; returns how many migrations ran now."""
    with db.transaction() as tx:
        if db.dialect == "postgresql":
            tx.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                   "name TEXT NOT NULL, applied " + ("DOUBLE PRECISION" if db.dialect == "postgresql" else "REAL")
                   + " NOT NULL)")
        done = {int(r[0]) for r in tx.query("SELECT version FROM schema_migrations")}
        if done and max(done) > LATEST:
            raise BankError(f"the bank database {db.location} has schema version {max(done)}; this ECLM knows "
                            f"up to {LATEST}", hint="upgrade ECLM on this machine to the version the bank uses")
        ran = 0
        for m in MIGRATIONS:
            if m.version in done:
                continue
            m.apply(tx, db.dialect)
            tx.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                       (m.version, m.name, time.time()))
            ran += 1
        return ran


def schema_version(db: Database) -> int:
    rows = db.query("SELECT MAX(version) FROM schema_migrations")
    return int(rows[0][0] or 0)

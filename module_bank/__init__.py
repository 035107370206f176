"""The module bank (torch-free): module versions and tensors, lineage, the delta ledger, devices,
merge claims and derivation jobs, behind one interface with two backends.

A location is a directory (SQLite ledger + safetensors files: the embedded default) or a
``postgresql://`` URL (everything in one PostgreSQL database, shared by several merger workers).
This package is the only code that writes SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eclm.errors import BankError
from module_bank.db import Database, connect, is_postgres, redact
from module_bank.files import DirectoryBank
from module_bank.info import (
    BANK_FILE,
    BANK_SCHEMA_VERSION,
    SECRET_BYTES,
    VALIDATION_SECRET_FILE,
    BankInfo,
    BankStore,
    PartRecord,
    bank_id_for,
)
from module_bank.ledger import Ledger, StoredDelta
from module_bank.work import ClaimLost, Job, JobQueue

LEDGER_FILE = "sync.sqlite"

__all__ = [
    "BANK_FILE", "BANK_SCHEMA_VERSION", "LEDGER_FILE", "SECRET_BYTES", "VALIDATION_SECRET_FILE", "Bank", "BankInfo",
    "BankStore", "ClaimLost", "Database", "DirectoryBank", "Job", "JobQueue", "Ledger", "PartRecord", "StoredDelta",
    "bank_id_for", "copy_bank", "is_postgres", "open_bank", "open_store", "read_ledger", "redact",
]


def open_store(location: str | Path) -> BankStore:
    """The parts and description of the bank at ``location`` (a directory or a ``postgresql://`` URL)."""
    if is_postgres(location):
        from module_bank.db import PostgresDatabase
        from module_bank.pgstore import PostgresBank

        return PostgresBank(PostgresDatabase(str(location), max_size=2))
    return DirectoryBank(Path(location))


def copy_bank(source: str | Path, dest: str | Path) -> BankInfo:
    """Copy a bank's description, current part versions and validation secret to another location
    (a directory bank into PostgreSQL when a lab grows into a fleet); the ledger starts empty there.
    """
    src, dst = open_store(source), open_store(dest)
    if dst.exists():
        raise BankError(f"{redact(dest)} already holds a bank", hint="copy into an empty database or directory")
    info = src.info()
    dst.write(info, {pid: src.read_part(pid) for pid in info.parts})
    secret, _ = src.validation_secret()
    dst.set_validation_secret(secret)
    return info


def read_ledger(location: str | Path) -> Ledger:
    """The ledger of the bank at ``location`` for reading beside running workers (SQLite: read-only)."""
    if is_postgres(location):
        return Ledger(connect(location))
    from module_bank.db import SqliteDatabase

    return Ledger(SqliteDatabase(Path(location) / LEDGER_FILE, readonly=True))


@dataclass
class Bank:
    """A bank's store, ledger and shared database, opened together (one connection pool on PostgreSQL)."""

    location: str
    store: BankStore
    ledger: Ledger
    db: Database

    @property
    def shared(self) -> bool:
        """Whether several processes may use this bank at once (PostgreSQL)."""
        return self.db.dialect == "postgresql"

    def close(self) -> None:
        self.ledger.close()


def open_bank(location: str | Path) -> Bank:
    """Open the bank at ``location`` with its ledger (migrated to the latest schema)."""
    if not is_postgres(location) and not (Path(location) / BANK_FILE).is_file():
        raise BankError(f"no module bank at {location} (missing {BANK_FILE})",
                        hint="create one with `eclm-cloud train --dataset digits --bank DIR`, or pass "
                        "--bank postgresql://USER@HOST/DB")
    db = connect(location, LEDGER_FILE)
    if is_postgres(location):
        from module_bank.pgstore import PostgresBank

        store: BankStore = PostgresBank(db)  # type: ignore[arg-type]
    else:
        store = DirectoryBank(Path(location))
    return Bank(str(location), store, Ledger(db), db)

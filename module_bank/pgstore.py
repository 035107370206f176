"""A module bank in PostgreSQL: the description, every part version's tensors (bytea) and the secret.

Tensors are stored as the same safetensors bytes a directory bank writes to its files, in
``part_tensors`` (bytea; a digits part is kilobytes, a resnet18 part a few megabytes, well inside
bytea's 1 GB), so both backends hash and read them alike. Large objects were not needed: one version
is written once and read whole.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from eclm.errors import BankError
from eclm.tensors import decode_tensors, encode_tensors
from module_bank.db import PostgresDatabase, redact
from module_bank.info import SECRET_BYTES, BankInfo, StoreBase
from module_bank.migrations import migrate


class PostgresBank(StoreBase):
    """The bank's parts and description in the same PostgreSQL database as its ledger."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self.location = db.location
        migrate(db)

    def exists(self) -> bool:
        return bool(self.db.query("SELECT 1 FROM bank_info WHERE id = 1"))

    def info(self) -> BankInfo:
        rows = self.db.query("SELECT info FROM bank_info WHERE id = 1")
        if not rows:
            raise BankError(f"no module bank in {redact(self.location)}",
                            hint="create one with `eclm-cloud train --dataset digits --bank postgresql://...`")
        try:
            return BankInfo.from_dict(json.loads(rows[0][0]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BankError(f"corrupt bank description in {redact(self.location)}: {exc}",
                            hint="re-create the bank") from exc

    def read_part(self, part_id: str, version: int | None = None) -> dict[str, np.ndarray]:
        """Tensors of a part at ``version`` (default: current), checked against the recorded hash."""
        rec = self.info().record(part_id)
        if rec is None:
            raise BankError(f"bank {redact(self.location)} has no part {part_id!r}", hint="check the module id")
        version = rec.version if version is None else version
        rows = self.db.query("SELECT sha256, data FROM part_tensors WHERE part_id = ? AND version = ?",
                             (part_id, version))
        if not rows:
            raise BankError(f"part {part_id} v{version} is missing from {redact(self.location)}",
                            hint="restore the bank database or re-create the bank")
        data = bytes(rows[0][1])
        digest = hashlib.sha256(data).hexdigest()
        if digest != rows[0][0] or (version == rec.version and digest != rec.sha256):
            raise BankError(f"part {part_id} v{version} does not match its recorded sha256",
                            hint="restore the bank database")
        return decode_tensors(data)

    def write_part_version(self, part_id: str, version: int, tensors: dict[str, np.ndarray]) -> str:
        """Store one part's tensors at ``version``; returns their sha256.

        A version the ledger has committed is never overwritten (a worker that lost its claim cannot
        replace the tensors another worker's round released); an orphan of a round that never committed is.
        """
        data = encode_tensors(tensors)
        digest = hashlib.sha256(data).hexdigest()
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO part_tensors (part_id, version, sha256, data) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (part_id, version) DO UPDATE SET sha256 = excluded.sha256, data = excluded.data "
                       "WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.part_id = excluded.part_id "
                       "AND v.version = excluded.version)", (part_id, version, digest, data))
            stored = tx.query("SELECT sha256 FROM part_tensors WHERE part_id = ? AND version = ?", (part_id, version))
        if stored[0][0] != digest:
            raise BankError(f"{part_id} v{version} was released by another worker", hint="nothing to do: this "
                            "worker's round is void and its deltas stay pending")
        return digest

    def version_sha256(self, part_id: str, version: int) -> str | None:
        rows = self.db.query("SELECT sha256 FROM part_tensors WHERE part_id = ? AND version = ?", (part_id, version))
        return str(rows[0][0]) if rows else None

    def write_info(self, info: BankInfo) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO bank_info (id, info) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET info = "
                       "excluded.info", (json.dumps(info.to_dict(), sort_keys=True),))

    def validation_secret(self) -> tuple[bytes, bool]:
        """The bank's validation secret (made once, by whichever worker comes first); and whether it was made now."""
        import secrets

        made = secrets.token_bytes(SECRET_BYTES)
        with self.db.transaction() as tx:
            n = tx.execute("INSERT INTO bank_secret (id, secret) VALUES (1, ?) ON CONFLICT (id) DO NOTHING", (made,))
            found = bytes(tx.query("SELECT secret FROM bank_secret WHERE id = 1")[0][0])
        return found, n == 1

    def set_validation_secret(self, secret: bytes) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO bank_secret (id, secret) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET secret = "
                       "excluded.secret", (secret,))

    def fault(self, parts: list[str]) -> str:
        try:
            self.db.query("SELECT 1")
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

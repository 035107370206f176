"""A module bank in a directory: ``bank.json`` plus ``parts/<id>/v<version>.safetensors`` (the embedded default)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eclm.errors import BankError
from eclm.hashing import atomic_write_bytes, atomic_write_json, sha256_file
from eclm.tensors import encode_tensors, read_tensors
from module_bank.info import BANK_FILE, SECRET_BYTES, VALIDATION_SECRET_FILE, BankInfo, StoreBase


class DirectoryBank(StoreBase):
    """A bank in a directory: ``bank.json`` plus ``parts/<id>/v<version>.safetensors``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def _part_path(self, part_id: str, version: int) -> Path:
        return self.root / "parts" / part_id / f"v{version}.safetensors"

    def exists(self) -> bool:
        return (self.root / BANK_FILE).is_file()

    def info(self) -> BankInfo:
        path = self.root / BANK_FILE
        if not path.is_file():
            raise BankError(
                f"no module bank at {self.root} (missing {BANK_FILE})",
                hint="create one with `eclm-cloud train --dataset digits --bank DIR`",
            )
        try:
            return BankInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BankError(f"corrupt {path}: {exc}", hint="re-create the bank") from exc

    def read_part(self, part_id: str, version: int | None = None) -> dict[str, np.ndarray]:
        """Tensors of a part at ``version`` (default: current), checked against the recorded hash."""
        rec = self.info().record(part_id)
        if rec is None:
            raise BankError(f"bank {self.root} has no part {part_id!r}", hint="check the module id")
        version = rec.version if version is None else version
        path = self._part_path(part_id, version)
        if not path.is_file():
            raise BankError(f"bank file {path} is missing", hint="restore the bank or re-create it")
        if version == rec.version and sha256_file(path) != rec.sha256:
            raise BankError(f"bank file {path} does not match its recorded sha256", hint="restore it")
        return read_tensors(path)

    def write_part_version(self, part_id: str, version: int, tensors: dict[str, np.ndarray]) -> str:
        """Write one part's tensors at ``version`` (atomically); returns the file's sha256."""
        path = self._part_path(part_id, version)
        atomic_write_bytes(path, encode_tensors(tensors))
        return sha256_file(path)

    def part_file(self, part_id: str, version: int) -> Path:
        return self._part_path(part_id, version)

    def version_sha256(self, part_id: str, version: int) -> str | None:
        """The sha256 of a stored version's tensors, or None when that version is not stored."""
        path = self._part_path(part_id, version)
        return sha256_file(path) if path.is_file() else None

    def fault(self, parts: list[str]) -> str:
        """Why the bank cannot take a new version of ``parts`` (empty when it can)."""
        try:
            info = self.info()
            for pid in parts:
                rec = info.record(pid)
                path = self._part_path(pid, (rec.version if rec is not None else 0) + 1)
                if path.exists() and not path.is_file():
                    return f"{path} is not a regular file"
                path.parent.mkdir(parents=True, exist_ok=True)
                probe = path.parent / f".probe-{pid}"
                probe.write_bytes(b"")
                probe.unlink()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    def validation_secret(self) -> tuple[bytes, bool]:
        """The bank's validation secret, made (mode 0600) if the bank has none; and whether it was made now."""
        path = self.root / VALIDATION_SECRET_FILE
        try:
            found = path.read_bytes()
        except FileNotFoundError:
            found = b""
        except OSError as exc:
            raise BankError(f"cannot read {path}: {exc}", hint="make the bank directory readable") from exc
        if len(found) == SECRET_BYTES:
            return found, False
        import secrets

        made = secrets.token_bytes(SECRET_BYTES)
        try:
            atomic_write_bytes(path, made)  # a private temporary file renamed into place: mode 0600
            path.chmod(0o600)
        except OSError as exc:
            raise BankError(f"cannot write {path}: {exc}", hint="make the bank directory writable") from exc
        return made, True

    def set_validation_secret(self, secret: bytes) -> None:
        """Keep ``secret`` as the bank's validation secret (mode 0600): a copied bank gates on the same split."""
        path = self.root / VALIDATION_SECRET_FILE
        atomic_write_bytes(path, secret)
        path.chmod(0o600)

    def write_info(self, info: BankInfo) -> None:
        """Replace ``bank.json`` atomically."""
        atomic_write_json(self.root / BANK_FILE, info.to_dict())


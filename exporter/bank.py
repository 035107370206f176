"""The module bank: every part of the modular model, versioned, in safe tensor files (torch-free)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from eclm.errors import BankError
from eclm.hashing import atomic_write_bytes, atomic_write_json, canonical_json, sha256_file
from eclm.tensors import encode_tensors, read_tensors

BANK_SCHEMA_VERSION = 1
BANK_FILE = "bank.json"
# Random bytes made with the bank that decide the merge gate's validation split (exporter.data.gate_split).
# Mode 0600, never in bank.json and never in a bundle: without it the split cannot be rebuilt from public
# data and the seed, so nobody can tune a delta against the exact samples the gate checks.
VALIDATION_SECRET_FILE = "validation.secret"
SECRET_BYTES = 32


@dataclass
class PartRecord:
    """One bank part (a module, or a fixed part such as the stem): its id, version and figures."""

    part_id: str
    kind: str  # "module" or "fixed"
    version: int
    sha256: str
    costs: dict[str, int]
    layer: int | None = None
    index: int | None = None
    width: float | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "part_id": self.part_id,
            "kind": self.kind,
            "version": self.version,
            "sha256": self.sha256,
            "costs": self.costs,
            "layer": self.layer,
            "index": self.index,
            "width": self.width,
            "lineage": self.lineage,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PartRecord:
        return PartRecord(**d)


@dataclass
class BankInfo:
    """The bank's description: config, data provenance, normalisation, labels, parts, metrics."""

    bank_id: str
    config: dict[str, Any]
    dataset: str
    seed: int
    normalisation: dict[str, list[float]]
    labels: list[str]
    parts: dict[str, PartRecord]
    metrics: dict[str, Any] = field(default_factory=dict)
    subtasks: list[list[int]] = field(default_factory=list)
    schema_version: int = BANK_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "bank_id": self.bank_id,
            "config": self.config,
            "dataset": self.dataset,
            "seed": self.seed,
            "normalisation": self.normalisation,
            "labels": self.labels,
            "metrics": self.metrics,
            "subtasks": self.subtasks,
            "parts": {k: v.to_dict() for k, v in sorted(self.parts.items())},
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> BankInfo:
        if d.get("schema_version") != BANK_SCHEMA_VERSION:
            raise BankError(
                f"bank schema version {d.get('schema_version')!r} is not {BANK_SCHEMA_VERSION}",
                hint="re-create the bank with this version of eclm-cloud train",
            )
        return BankInfo(
            bank_id=d["bank_id"],
            config=d["config"],
            dataset=d["dataset"],
            seed=d["seed"],
            normalisation=d["normalisation"],
            labels=d["labels"],
            parts={k: PartRecord.from_dict(v) for k, v in d["parts"].items()},
            metrics=d.get("metrics", {}),
            subtasks=d.get("subtasks", []),
        )


class BankStore(Protocol):
    """What a bank backend offers; a directory today, a database and object store for a fleet."""

    def info(self) -> BankInfo: ...

    def read_part(self, part_id: str, version: int | None = None) -> dict[str, np.ndarray]: ...

    def write(self, info: BankInfo, tensors: dict[str, dict[str, np.ndarray]]) -> None: ...


def bank_id_for(config: dict[str, Any], part_hashes: dict[str, str]) -> str:
    """A content address: same config and same tensors give the same id."""
    h = hashlib.sha256(canonical_json({"config": config, "parts": part_hashes}))
    return h.hexdigest()[:16]


class DirectoryBank:
    """A bank in a directory: ``bank.json`` plus ``parts/<id>/v<version>.safetensors``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

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
        rec = self.info().parts.get(part_id)
        if rec is None:
            raise BankError(f"bank {self.root} has no part {part_id!r}", hint="check the module id")
        version = rec.version if version is None else version
        path = self._part_path(part_id, version)
        if not path.is_file():
            raise BankError(f"bank file {path} is missing", hint="restore the bank or re-create it")
        if version == rec.version and sha256_file(path) != rec.sha256:
            raise BankError(f"bank file {path} does not match its recorded sha256", hint="restore it")
        return read_tensors(path)

    def read_all(self) -> dict[str, np.ndarray]:
        """Every current tensor, keyed by its full state-dict name."""
        out: dict[str, np.ndarray] = {}
        for part_id in self.info().parts:
            out.update(self.read_part(part_id))
        return out

    def write_part_version(self, part_id: str, version: int, tensors: dict[str, np.ndarray]) -> str:
        """Write one part's tensors at ``version`` (atomically); returns the file's sha256."""
        path = self._part_path(part_id, version)
        atomic_write_bytes(path, encode_tensors(tensors))
        return sha256_file(path)

    def part_file(self, part_id: str, version: int) -> Path:
        return self._part_path(part_id, version)

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

    def write_info(self, info: BankInfo) -> None:
        """Replace ``bank.json`` atomically."""
        atomic_write_json(self.root / BANK_FILE, info.to_dict())

    def write(self, info: BankInfo, tensors: dict[str, dict[str, np.ndarray]]) -> None:
        """Write parts (at their recorded versions) and then ``bank.json``, each atomically."""
        for part_id, named in tensors.items():
            rec = info.parts[part_id]
            path = self._part_path(part_id, rec.version)
            atomic_write_bytes(path, encode_tensors(named))
            rec.sha256 = sha256_file(path)
        self.validation_secret()
        atomic_write_json(self.root / BANK_FILE, info.to_dict())

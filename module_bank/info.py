"""What a module bank holds, whatever stores it: its description, part records, and the store interface."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from eclm.errors import BankError
from eclm.hashing import canonical_json
from eclm.parts import split_line_key

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
    # Environment lines (docs/method.md): a part's versions merged from the devices of one environment,
    # keyed ``PART@ENV`` (eclm.parts.line_key). Not parts of the model: export and derivation never see them.
    lines: dict[str, PartRecord] = field(default_factory=dict)

    def record(self, key: str) -> PartRecord | None:
        """The record of a part or of an environment line (None when the bank has neither)."""
        return self.parts.get(key) or self.lines.get(key)

    def line_record(self, key: str) -> PartRecord:
        """The record of the environment line ``key`` (``PART@ENV``), made from its part's when it has none yet
        (costs and place are the part's; version and hash are set when the line's first version is written).
        """
        if key not in self.lines:
            part = self.parts[split_line_key(key)[0]]
            self.lines[key] = PartRecord(key, part.kind, part.version, part.sha256, dict(part.costs), part.layer,
                                         part.index, part.width)
        return self.lines[key]

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
            **({"lines": {k: v.to_dict() for k, v in sorted(self.lines.items())}} if self.lines else {}),
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
            lines={k: PartRecord.from_dict(v) for k, v in d.get("lines", {}).items()},
        )


class BankStore(Protocol):
    """What a bank backend offers: a directory of files (:class:`module_bank.files.DirectoryBank`) or
    PostgreSQL (:class:`module_bank.pgstore.PostgresBank`).
    """

    location: str

    def exists(self) -> bool: ...

    def info(self) -> BankInfo: ...

    def read_part(self, part_id: str, version: int | None = None) -> dict[str, np.ndarray]: ...

    def read_all(self) -> dict[str, np.ndarray]: ...

    def write_part_version(self, part_id: str, version: int, tensors: dict[str, np.ndarray]) -> str: ...

    def version_sha256(self, part_id: str, version: int) -> str | None: ...

    def write_info(self, info: BankInfo) -> None: ...

    def write(self, info: BankInfo, tensors: dict[str, dict[str, np.ndarray]]) -> None: ...

    def validation_secret(self) -> tuple[bytes, bool]: ...

    def set_validation_secret(self, secret: bytes) -> None: ...

    def fault(self, parts: list[str]) -> str: ...


def bank_id_for(config: dict[str, Any], part_hashes: dict[str, str]) -> str:
    """A content address: same config and same tensors give the same id."""
    h = hashlib.sha256(canonical_json({"config": config, "parts": part_hashes}))
    return h.hexdigest()[:16]


class StoreBase:
    """What both stores do the same way, through their own :meth:`read_part`, :meth:`write_part_version`,
    :meth:`validation_secret` and :meth:`write_info`.
    """

    def info(self) -> BankInfo:
        raise NotImplementedError

    def read_part(self, part_id: str, version: int | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def write_part_version(self, part_id: str, version: int, tensors: dict[str, np.ndarray]) -> str:
        raise NotImplementedError

    def validation_secret(self) -> tuple[bytes, bool]:
        raise NotImplementedError

    def write_info(self, info: BankInfo) -> None:
        raise NotImplementedError

    def read_all(self) -> dict[str, np.ndarray]:
        """Every current tensor, keyed by its full state-dict name."""
        out: dict[str, np.ndarray] = {}
        for part_id in self.info().parts:
            out.update(self.read_part(part_id))
        return out

    def write(self, info: BankInfo, tensors: dict[str, dict[str, np.ndarray]]) -> None:
        """Write parts (at their recorded versions, recording their hashes), the secret, then the description."""
        for part_id, named in tensors.items():
            rec = info.parts[part_id]
            rec.sha256 = self.write_part_version(part_id, rec.version, named)
        self.validation_secret()
        self.write_info(info)

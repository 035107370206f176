"""The durable outbox: one file per delta (safetensors with a JSON header), removed only once acknowledged."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from eclm import jsonsafe
from eclm.errors import DataError
from eclm.hashing import atomic_write_bytes
from eclm.ids import check_delta_id

SUFFIX = ".delta"
ACKED = "acked.log"


@dataclass(frozen=True)
class OutboxEntry:
    """A delta waiting to be sent: its metadata and tensors."""

    delta_id: str
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    path: Path


class Outbox:
    """Entries are written atomically, listed oldest first, and deleted by :meth:`ack`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _next_seq(self) -> int:
        seqs = [int(p.name.split("-", 1)[0]) for p in self.folder.glob(f"*{SUFFIX}") if p.name[:8].isdigit()]
        return max(seqs, default=0) + 1

    def put(self, delta_id: str, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
        """Store one delta durably; returns its file."""
        check_delta_id(delta_id)
        header = {"eclm": jsonsafe.dumps({**meta, "delta_id": delta_id}, sort_keys=True)}  # NaN -> null
        data = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, metadata=header)
        with self._lock:
            path = self.folder / f"{self._next_seq():08d}-{delta_id}{SUFFIX}"
            atomic_write_bytes(path, data)
        return path

    @staticmethod
    def id_of(path: Path) -> str:
        """The delta id in an entry's file name (``SEQ-ID.delta``)."""
        return path.name[: -len(SUFFIX)].split("-", 1)[1]

    def holds(self, delta_id: str) -> bool:
        """True while an entry of exactly this delta id waits for its ack."""
        return any(self.id_of(p) == delta_id for p in self.pending())

    def pending(self) -> list[Path]:
        """Files of unacknowledged deltas, oldest first."""
        return sorted(self.folder.glob(f"*{SUFFIX}"))

    def __len__(self) -> int:
        return len(self.pending())

    def bytes_pending(self) -> int:
        return sum(p.stat().st_size for p in self.pending())

    @staticmethod
    def read(path: Path) -> OutboxEntry:
        """Parse one outbox file; a corrupt file raises :class:`DataError`."""
        raw = path.read_bytes()
        try:
            tensors = dict(load(raw))
            n = int.from_bytes(raw[:8], "little")
            meta = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["eclm"])
        except Exception as exc:
            raise DataError(f"outbox entry {path.name} is corrupt: {exc}", hint="it will be set aside") from exc
        return OutboxEntry(meta["delta_id"], meta, tensors, path)

    def ack(self, delta_id: str) -> bool:
        """Remove the entry of ``delta_id`` (after the cloud acknowledged it); False if absent.

        The id and the samples it covered are appended to ``acked.log`` first, so that after a crash
        the runtime still knows the delta existed.
        """
        check_delta_id(delta_id)
        with self._lock:
            for p in self.pending():
                if self.id_of(p) != delta_id:
                    continue
                try:
                    upto = int(self.read(p).meta.get("trained_upto", 0))
                except (DataError, ValueError, TypeError):
                    upto = 0
                with open(self.folder / ACKED, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"delta_id": delta_id, "trained_upto": upto}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                p.unlink()
                return True
        return False

    def _acked(self) -> list[dict[str, Any]]:
        path = self.folder / ACKED
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
        return out

    def known_ids(self) -> set[str]:
        """Ids of every delta kept: pending or already acknowledged."""
        ids = {self.id_of(p) for p in self.pending()}
        return ids | {str(r.get("delta_id")) for r in self._acked()}

    def max_trained_upto(self) -> int:
        """The newest sample id any kept delta was trained on."""
        values = [int(r.get("trained_upto", 0)) for r in self._acked()]
        for p in self.pending():
            try:
                values.append(int(self.read(p).meta.get("trained_upto", 0)))
            except (DataError, ValueError, TypeError):
                continue
        return max(values, default=0)

    def quarantine(self, path: Path) -> None:
        """Move an unreadable entry aside so it blocks nothing and is not lost."""
        bad = self.folder / "corrupt"
        bad.mkdir(exist_ok=True)
        path.replace(bad / path.name)

"""The durable outbox: one file per delta (safetensors with a JSON header), removed only once acknowledged."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from eclm.errors import DataError
from eclm.hashing import atomic_write_bytes

SUFFIX = ".delta"


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
        header = {"eclm": json.dumps({**meta, "delta_id": delta_id}, sort_keys=True)}
        data = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, metadata=header)
        with self._lock:
            path = self.folder / f"{self._next_seq():08d}-{delta_id}{SUFFIX}"
            atomic_write_bytes(path, data)
        return path

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
        """Remove the entry of ``delta_id`` (after the cloud acknowledged it); False if absent."""
        with self._lock:
            for p in self.folder.glob(f"*-{delta_id}{SUFFIX}"):
                p.unlink()
                return True
        return False

    def quarantine(self, path: Path) -> None:
        """Move an unreadable entry aside so it blocks nothing and is not lost."""
        bad = self.folder / "corrupt"
        bad.mkdir(exist_ok=True)
        path.replace(bad / path.name)

"""The device's sample store: labelled samples in SQLite, durable, bounded, oldest evicted first."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HOLDOUT_EVERY_DEFAULT = 5  # every 5th sample (by id) is held out: a 20% holdout share


@dataclass(frozen=True)
class Batch:
    """Samples as arrays: inputs (N, ...) float32, labels (N,) int64, and their ids."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


class SampleStore:
    """Samples survive restarts and crashes (WAL, synchronous=FULL); at most ``capacity`` are kept."""

    def __init__(self, path: Path, input_shape: tuple[int, ...], capacity: int = 10_000,
                 holdout_every: int = HOLDOUT_EVERY_DEFAULT) -> None:
        self.path = path
        self.input_shape = tuple(input_shape)
        self.capacity = capacity
        self.holdout_every = max(2, holdout_every)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, "
            "label INTEGER NOT NULL, shape TEXT NOT NULL, x BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, x: np.ndarray, y: np.ndarray) -> int:
        """Store a batch in one transaction; evict the oldest beyond capacity. Returns samples held."""
        shape = ",".join(str(d) for d in self.input_shape)
        rows = [(time.time(), int(label), shape, np.ascontiguousarray(s, dtype="<f4").tobytes())
                for s, label in zip(x, y, strict=True)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO samples (created, label, shape, x) VALUES (?, ?, ?, ?)", rows)
                self._db.execute(
                    "DELETE FROM samples WHERE id NOT IN (SELECT id FROM samples ORDER BY id DESC LIMIT ?)",
                    (self.capacity,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._count()

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def count(self) -> int:
        with self._lock:
            return self._count()

    def last_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM samples").fetchone()
            return int(row[0] or 0)

    def _load(self, where: str, args: tuple[int, ...] = ()) -> Batch:
        with self._lock:
            rows = self._db.execute(f"SELECT id, label, x FROM samples WHERE {where} ORDER BY id", args).fetchall()
        n = len(rows)
        x = np.empty((n, *self.input_shape), dtype=np.float32)
        for i, (_, _, blob) in enumerate(rows):
            x[i] = np.frombuffer(blob, dtype="<f4").reshape(self.input_shape)
        y = np.array([r[1] for r in rows], dtype=np.int64)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return Batch(x, y, ids)

    def recent(self, n: int) -> Batch:
        """The newest ``n`` samples, whatever their share."""
        return self._load("id > (SELECT COALESCE(MAX(id), 0) FROM samples) - ?", (n,))

    def training_set(self) -> Batch:
        """Every sample not in the holdout share."""
        return self._load("id % ? != 0", (self.holdout_every,))

    def holdout_set(self) -> Batch:
        """The holdout share: samples whose id is a multiple of ``holdout_every`` (stable over restarts)."""
        return self._load("id % ? = 0", (self.holdout_every,))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

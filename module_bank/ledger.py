"""The sync ledger (SQLite beside the bank, or PostgreSQL): every delta once, module versions, lineage, devices.

It is the authority for module versions: a merge writes the new part files first, then records
the versions and marks its deltas merged in one transaction, then rewrites ``bank.json`` from
here. ``kill -9`` anywhere leaves either the old state (new files orphaned, deltas still
pending) or the new one (``bank.json`` is reconciled on start-up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from module_bank.db import Database, SqliteDatabase, Tx
from module_bank.migrations import migrate
from module_bank.work import fence

MAX_QUARANTINE = 10_000  # newest records kept (deltas keep their 'quarantined' state regardless)


@dataclass(frozen=True)
class StoredDelta:
    """A delta as the ledger holds it."""

    delta_id: str
    device_id: str
    payload: bytes
    received: float = 0.0
    done: dict[str, str] = field(default_factory=dict)  # part -> outcome of the rounds that took it
    waiting_since: int | None = None  # the round from which some of its parts wait for support


class Ledger:
    """Thread-safe access to the ledger database (either engine; ``Ledger(path)`` opens a SQLite file)."""

    def __init__(self, db: Database | Path) -> None:
        self.db: Database = SqliteDatabase(db) if isinstance(db, Path) else db
        self.path = self.db.location
        # (claim, owner): round commits check in their transaction that ``owner`` still holds ``claim``.
        self.fence: tuple[str, str] | None = None
        if not getattr(self.db, "readonly", False):
            migrate(self.db)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.db.transaction() as tx:
            yield tx

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self.db.query(sql, params)
        return rows[0][0] if rows else None

    # deltas
    def known(self, delta_id: str) -> str | None:
        found = self._one("SELECT status FROM deltas WHERE delta_id = ?", (delta_id,))
        return None if found is None else str(found)

    def store_delta(self, delta_id: str, device_id: str, payload: bytes, parts: list[str] | None = None) -> bool:
        """Record a valid delta (and the parts it carries) as pending, once; False if its id was seen before."""
        return self.store_deltas([(delta_id, device_id, payload, parts or [])])[0]

    def store_deltas(self, items: list[tuple[str, str, bytes, list[str]]]) -> list[bool]:
        """Store valid deltas ``(id, device, payload, parts)`` as pending in one transaction (one sync to disk for
        the batch) and mark their devices online; per item, whether it was new (False: its id was seen before).
        """
        now = time.time()
        out: list[bool] = []
        with self.transaction() as db:
            for delta_id, device_id, payload, parts in items:
                out.append(db.execute(
                    "INSERT INTO deltas (delta_id, device_id, received, status, payload, bytes, parts) "
                    "VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (delta_id) DO NOTHING",
                    (delta_id, device_id, now, payload, len(payload), json.dumps(sorted(parts)))) == 1)
            for device_id in sorted({i[1] for i in items}):
                db.execute("UPDATE devices SET last_seen = ?, online = 1 WHERE device_id = ?", (now, device_id))
        return out

    def statuses(self, delta_ids: list[str]) -> dict[str, str]:
        """The status of each of ``delta_ids`` the ledger knows."""
        out: dict[str, str] = {}
        for i in range(0, len(delta_ids), 500):
            chunk = delta_ids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            out.update({str(r[0]): str(r[1]) for r in self.db.query(
                f"SELECT delta_id, status FROM deltas WHERE delta_id IN ({marks})", tuple(chunk))})
        return out

    def known_devices(self, device_ids: list[str]) -> set[str]:
        """Which of ``device_ids`` are devices of this bank (see :meth:`known_device`)."""
        out: set[str] = set()
        for i in range(0, len(device_ids), 500):
            chunk = device_ids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            out.update(str(r[0]) for r in self.db.query(
                f"SELECT device_id FROM devices WHERE device_id IN ({marks}) AND (profiled = 1 OR last_derived != '')",
                tuple(chunk)))
        return out

    def support_counts(self, parts: list[str]) -> dict[str, int]:
        """Per part, the distinct devices whose pending deltas carry it and no round has taken it from yet
        (:meth:`support` counted in the database, without reading every pending delta).
        """
        out: dict[str, int] = {}
        for pid in sorted(set(parts)):
            quoted = json.dumps(pid).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            out[pid] = int(self._one("SELECT COUNT(DISTINCT device_id) FROM deltas WHERE status = 'pending' AND "
                                     "parts LIKE ? ESCAPE '\\' AND done NOT LIKE ? ESCAPE '\\'",
                                     (f"%{quoted}%", f"%{quoted}:%")))
        return out

    def reject(self, reason: str, detail: str, delta_id: str | None = None, device_id: str = "",
               size: int = 0) -> None:
        """Count a rejection; a rejected delta with an id is recorded (without payload) so it is not re-counted."""
        with self.transaction() as db:
            if delta_id is not None:
                n = db.execute(
                    "INSERT INTO deltas (delta_id, device_id, received, status, reason, detail, bytes) "
                    "VALUES (?, ?, ?, 'rejected', ?, ?, ?) ON CONFLICT (delta_id) DO NOTHING",
                    (delta_id, device_id, time.time(), reason, detail, size))
                if n == 0:
                    return
            db.execute("INSERT INTO rejects (reason, count) VALUES (?, 1) "
                       "ON CONFLICT(reason) DO UPDATE SET count = rejects.count + 1", (reason,))

    def quarantine(self, delta_id: str, reason: str) -> None:
        """Take a stored delta out of the rounds for good, with the reason (its payload is kept for a look)."""
        with self.transaction() as db:
            db.execute("UPDATE deltas SET status = 'quarantined', reason = 'quarantined', detail = ? "
                       "WHERE delta_id = ?", (reason, delta_id))
        self.record_quarantine("delta", delta_id, reason)

    def record_quarantine(self, kind: str, subject: str, reason: str) -> None:
        """Record that one message, delta or derivation job was set aside (latest reason per subject)."""
        with self.transaction() as db:
            db.execute("INSERT INTO quarantine (kind, subject, created, reason) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(kind, subject) DO UPDATE SET created = excluded.created, reason = excluded.reason",
                       (kind, subject[:200], time.time(), reason[:500]))
            db.execute("DELETE FROM quarantine WHERE created < (SELECT created FROM quarantine ORDER BY created DESC "
                       "LIMIT 1 OFFSET ?)", (MAX_QUARANTINE - 1,))
            db.execute("INSERT INTO rejects (reason, count) VALUES (?, 1) "
                       "ON CONFLICT(reason) DO UPDATE SET count = rejects.count + 1", (f"quarantined_{kind}",))

    def quarantined(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT kind, subject, created, reason FROM quarantine ORDER BY created DESC "
                             "LIMIT ?", (limit,))
        return [{"kind": r[0], "subject": r[1], "created": r[2], "reason": r[3]} for r in rows]

    def pending(self, limit: int = 10_000) -> list[StoredDelta]:
        rows = self.db.query("SELECT delta_id, device_id, payload, received, done, waiting_since FROM deltas "
                             "WHERE status = 'pending' ORDER BY received LIMIT ?", (limit,))
        return [StoredDelta(r[0], r[1], bytes(r[2]), float(r[3]), json.loads(r[4] or "{}"), r[5]) for r in rows]

    def pending_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM deltas WHERE status = 'pending'"))

    def ready_count(self) -> int:
        """Pending deltas not (yet) waiting for support: the new ones a round has not looked at."""
        return int(self._one("SELECT COUNT(*) FROM deltas WHERE status = 'pending' AND waiting_since IS NULL"))

    def support(self) -> dict[str, set[str]]:
        """Per part, the distinct devices whose pending deltas carry it and have not had it merged yet."""
        rows = self.db.query("SELECT device_id, parts, done FROM deltas WHERE status = 'pending'")
        out: dict[str, set[str]] = {}
        for device, parts, done in rows:
            taken = json.loads(done or "{}")
            for pid in json.loads(parts or "[]"):
                if pid not in taken:
                    out.setdefault(pid, set()).add(device)
        return out

    def waiting(self) -> int:
        """Pending deltas of which some parts wait for support from more devices."""
        return int(self._one("SELECT COUNT(*) FROM deltas WHERE status = 'pending' AND reason = 'waiting_support'"))

    def expired_parts(self) -> int:
        """Parts of deltas that expired waiting for support (counted, never silently dropped)."""
        return int(self.meta("expired_parts") or 0)

    def settle(self, round_no: int, done: dict[str, dict[str, str]], waiting: dict[str, str],
               expired: dict[str, str], expired_parts: int) -> None:
        """Record what a look at the pending deltas decided when no round was committed (see :meth:`commit_round`)."""
        with self.transaction() as db:
            self._check_fence(db)
            self._settle(db, round_no, done, waiting, expired, expired_parts)

    @staticmethod
    def _settle(db: Tx, round_no: int, done: dict[str, dict[str, str]], waiting: dict[str, str],
                expired: dict[str, str], expired_parts: int) -> None:
        for d, outcomes in done.items():
            db.execute("UPDATE deltas SET done = ? WHERE delta_id = ? AND status = 'pending'",
                       (json.dumps(outcomes, sort_keys=True), d))
        for d, detail in waiting.items():
            db.execute("UPDATE deltas SET reason = 'waiting_support', detail = ?, "
                       "waiting_since = COALESCE(waiting_since, ?) WHERE delta_id = ? AND status = 'pending'",
                       (detail[:500], round_no, d))
        for d, detail in expired.items():
            db.execute("UPDATE deltas SET status = 'expired', reason = 'expired', detail = ?, payload = NULL "
                       "WHERE delta_id = ? AND status = 'pending'", (detail[:500], d))
        if expired_parts:
            db.execute("INSERT INTO meta (key, value) VALUES ('expired_parts', ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = CAST(CAST(meta.value AS INTEGER) + ? AS TEXT)", (str(expired_parts), expired_parts))

    # versions
    def versions(self) -> dict[str, int]:
        rows = self.db.query("SELECT part_id, MAX(version) FROM versions GROUP BY part_id")
        return {r[0]: int(r[1]) for r in rows}

    def versions_since_round(self, round_no: int) -> dict[str, int]:
        """The newest version of each part made by a round after ``round_no``."""
        rows = self.db.query("SELECT part_id, MAX(version) FROM versions WHERE round > ? GROUP BY part_id",
                             (round_no,))
        return {str(r[0]): int(r[1]) for r in rows}

    def seed_versions(self, versions: dict[str, int]) -> None:
        """Record the bank's starting versions (once)."""
        with self.transaction() as db:
            for part_id, v in versions.items():
                db.execute("INSERT INTO versions (part_id, version, created, round, deltas) "
                           "VALUES (?, ?, ?, NULL, '[]') ON CONFLICT (part_id, version) DO NOTHING",
                           (part_id, v, time.time()))

    def next_round(self) -> int:
        return int(self._one("SELECT MAX(round) FROM rounds") or 0) + 1

    def commit_round(self, round_no: int, new_versions: dict[str, tuple[int, list[str]]], merged: list[str],
                     held: list[str], held_reason: str, metrics: dict[str, Any],
                     best_released: float | None = None, *, done: dict[str, dict[str, str]] | None = None,
                     waiting: dict[str, str] | None = None, expired: dict[str, str] | None = None,
                     expired_parts: int = 0, reasons: dict[str, str] | None = None) -> None:
        """One transaction: new versions with lineage, deltas merged (or held back), the round's record,
        and the best validation accuracy of any released version (the merge gate's reference).

        ``done`` records per delta which parts rounds took (and how); ``waiting`` keeps deltas pending whose
        other parts wait for support; ``expired`` ends deltas whose waiting parts expired; ``reasons`` names
        why a held delta was held when it is not ``held_reason``.
        """
        now = time.time()
        with self.transaction() as db:
            self._check_fence(db)
            self._settle(db, round_no, done or {}, waiting or {}, expired or {}, expired_parts)
            if best_released is not None:
                db.execute("INSERT INTO meta (key, value) VALUES ('best_released', ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (repr(float(best_released)),))
            for part_id, (version, deltas) in new_versions.items():
                db.execute("INSERT INTO versions (part_id, version, created, round, deltas) VALUES (?, ?, ?, ?, ?)",
                           (part_id, version, now, round_no, json.dumps(deltas)))
            for d in merged:
                db.execute("UPDATE deltas SET status = 'merged', merged_round = ?, payload = NULL "
                           "WHERE delta_id = ? AND status = 'pending'", (round_no, d))
            for d in held:
                db.execute("UPDATE deltas SET status = 'held', reason = ?, merged_round = ? "
                           "WHERE delta_id = ? AND status = 'pending'", ((reasons or {}).get(d, held_reason),
                                                                         round_no, d))
            db.execute("INSERT INTO rounds (round, created, outcome, metrics) VALUES (?, ?, ?, ?)",
                       (round_no, now, "held" if held else "merged", json.dumps(metrics)))

    def _check_fence(self, db: Tx) -> None:
        if self.fence is not None:
            fence(db, *self.fence)

    def set_meta(self, key: str, value: str, *, fenced: bool = False) -> None:
        with self.transaction() as db:
            if fenced:
                self._check_fence(db)
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def set_meta_once(self, key: str, value: str) -> bool:
        """Set ``key`` unless it is set; whether this call set it."""
        with self.transaction() as db:
            return db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                              (key, value)) == 1

    def meta(self, key: str) -> str | None:
        found = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if found is None else str(found)

    def reset_best_released(self, validation_key: str) -> None:
        """Forget the best released accuracy (it was measured on another validation split) and note the new one."""
        with self.transaction() as db:
            db.execute("DELETE FROM meta WHERE key = 'best_released'")
            db.execute("INSERT INTO meta (key, value) VALUES ('validation_key', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (validation_key,))

    def best_released(self) -> float | None:
        """Best validation accuracy of a released version, or None before the first gated round."""
        found = self.meta("best_released")
        return None if found is None else float(found)

    def lineage(self, part_id: str) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT version, created, round, deltas FROM versions WHERE part_id = ? "
                             "ORDER BY version", (part_id,))
        return [{"version": r[0], "created": r[1], "round": r[2], "deltas": json.loads(r[3])} for r in rows]

    # devices
    def touch_device(self, device_id: str, **fields: Any) -> None:
        cols = {k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in fields.items()}
        with self.transaction() as db:
            db.execute("INSERT INTO devices (device_id, last_seen) VALUES (?, ?) ON CONFLICT (device_id) DO NOTHING",
                       (device_id, time.time()))
            sets = ", ".join(f"{k} = ?" for k in cols)
            db.execute(f"UPDATE devices SET last_seen = ?{', ' + sets if sets else ''} WHERE device_id = ?",
                       (time.time(), *cols.values(), device_id))

    def known_device(self, device_id: str) -> bool:
        """A device of this bank: it sent a valid profile for the bank, or a bundle was derived for it."""
        return self._one("SELECT 1 FROM devices WHERE device_id = ? AND (profiled = 1 OR last_derived != '')",
                         (device_id,)) is not None

    def device(self, device_id: str) -> dict[str, Any] | None:
        found = self.devices(device_id)
        return found[0] if found else None

    def devices(self, device_id: str | None = None) -> list[dict[str, Any]]:
        if device_id is None:
            rows = self.db.query_dicts("SELECT * FROM devices ORDER BY device_id")
        else:
            rows = self.db.query_dicts("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        for d in rows:
            d["modules"] = json.loads(d["modules"])
            d["importance"] = json.loads(d["importance"])
            d["sent"] = json.loads(d.get("sent") or "{}")
        return rows

    def note_sent(self, sent: dict[str, dict[str, int]]) -> None:
        """Remember, per device, the versions (by line key) just sent to it; one transaction for all."""
        if not sent:
            return
        ids = sorted(sent)
        with self.transaction() as db:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ", ".join("?" * len(chunk))
                for device_id, before in db.query(f"SELECT device_id, sent FROM devices WHERE device_id IN ({marks})",
                                                  tuple(chunk)):
                    held = {**json.loads(before or "{}"), **sent[device_id]}
                    db.execute("UPDATE devices SET sent = ? WHERE device_id = ?", (json.dumps(held), device_id))

    def device_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM devices"))

    # reports
    def delta_rows(self) -> list[tuple[str, str, str, str]]:
        """(delta id, device id, status, reason) of every delta the ledger knows."""
        return [(str(r[0]), str(r[1]), str(r[2]), str(r[3]))
                for r in self.db.query("SELECT delta_id, device_id, status, reason FROM deltas")]

    def round_metrics(self) -> list[dict[str, Any]]:
        """Every round's recorded figures, oldest first."""
        return [json.loads(r[0]) for r in self.db.query("SELECT metrics FROM rounds ORDER BY round")]

    def delta_states(self) -> dict[str, tuple[str, int | None]]:
        """Every delta id with its status and the round that merged or held it (for reports and tests)."""
        rows = self.db.query("SELECT delta_id, status, merged_round FROM deltas")
        return {str(r[0]): (str(r[1]), None if r[2] is None else int(r[2])) for r in rows}

    def summary(self) -> dict[str, Any]:
        by_status = {str(k): int(v) for k, v in self.db.query("SELECT status, COUNT(*) FROM deltas GROUP BY status")}
        rejects = {str(k): int(v) for k, v in self.db.query("SELECT reason, count FROM rejects ORDER BY reason")}
        rounds = self.db.query("SELECT round, outcome, metrics FROM rounds ORDER BY round DESC LIMIT 5")
        uplink = int(self._one("SELECT COALESCE(SUM(bytes), 0) FROM deltas"))
        return {
            "deltas": by_status,
            "rejected_by_reason": rejects,
            "recent_rounds": [{"round": r[0], "outcome": r[1], **json.loads(r[2])} for r in rounds],
            "uplink_bytes": uplink,
        }

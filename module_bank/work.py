"""Work shared by merger workers through the bank's database: round claims and the derivation job queue.

A claim is a lease on a name (``merge``) held by one worker until it lapses; the round's commit
checks in its own transaction that the worker still holds it (a fence), so a worker that was
paused past its lease cannot commit over another's round. Jobs are one row per device (the newest
request replaces a waiting one); a worker takes the oldest ready job with ``FOR UPDATE SKIP LOCKED``
on PostgreSQL (SQLite's write lock does the same for one machine), runs it under a lease, and its
finish time rate-limits the device's next job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from eclm.errors import BankError
from module_bank.db import Database, Tx
from module_bank.migrations import migrate


class ClaimLost(BankError):
    """The worker's lease was taken by another worker: its round must not commit."""


def claim(db: Database, name: str, owner: str, seconds: float, now: float | None = None) -> bool:
    """Take or renew the lease ``name`` for ``seconds``; False while another owner holds it."""
    now = time.time() if now is None else now
    with db.transaction() as tx:
        n = tx.execute("INSERT INTO claims (name, owner, until) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                       "SET owner = excluded.owner, until = excluded.until "
                       "WHERE claims.owner = excluded.owner OR claims.until < ?", (name, owner, now + seconds, now))
    return n == 1


def release(db: Database, name: str, owner: str) -> None:
    with db.transaction() as tx:
        tx.execute("DELETE FROM claims WHERE name = ? AND owner = ?", (name, owner))


def holder(db: Database, name: str) -> tuple[str, float] | None:
    rows = db.query("SELECT owner, until FROM claims WHERE name = ?", (name,))
    return (str(rows[0][0]), float(rows[0][1])) if rows else None


def fence(tx: Tx, name: str, owner: str) -> None:
    """Inside a commit: lock the claim's row and fail with :class:`ClaimLost` unless ``owner`` holds it."""
    if tx.execute("UPDATE claims SET owner = owner WHERE name = ? AND owner = ?", (name, owner)) != 1:
        raise ClaimLost(f"the {name} claim of {owner} was taken over by another worker; nothing was committed",
                        hint="nothing to do: the other worker merges these deltas")


@dataclass(frozen=True)
class Job:
    """One derivation request: a device's profile and the importance its bundle is derived for."""

    device: str
    profile: str
    importance: list[list[float]]
    reason: str
    enqueued: float = 0.0


class JobQueue:
    """The derivation jobs in the bank's database, shared by every worker."""

    def __init__(self, db: Database, min_interval: float = 60.0, lease: float = 600.0) -> None:
        self.db = db
        self.min_interval = min_interval
        self.lease = lease
        migrate(db)

    def submit(self, job: Job, now: float | None = None) -> None:
        """Queue ``job``; a job of the same device that waits is replaced (the newest request wins)."""
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO jobs (device_id, profile, importance, reason, enqueued, not_before) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET profile = excluded.profile, "
                       "importance = excluded.importance, reason = excluded.reason, enqueued = excluded.enqueued",
                       (job.device, job.profile, json.dumps(job.importance), job.reason[:200], now, now))

    def take(self, owner: str, now: float | None = None) -> Job | None:
        """Lease the oldest job whose device may derive again (its last one finished ``min_interval`` ago).

        A job leased by ``owner`` itself is taken again: a worker restarted under its old name is not
        running it any more.
        """
        now = time.time() if now is None else now
        lock = " FOR UPDATE OF j SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        with self.db.transaction() as tx:
            rows = tx.query("SELECT j.device_id, j.profile, j.importance, j.reason, j.enqueued FROM jobs j "
                            "LEFT JOIN job_done d ON d.device_id = j.device_id WHERE j.not_before <= ? "
                            "AND (j.owner = '' OR j.owner = ? OR j.until < ?) "
                            "AND (d.finished IS NULL OR d.finished <= ?) ORDER BY j.enqueued LIMIT 1" + lock,
                            (now, owner, now, now - self.min_interval))
            if not rows:
                return None
            device, profile, importance, reason, enqueued = rows[0]
            tx.execute("UPDATE jobs SET owner = ?, until = ?, attempts = attempts + 1 WHERE device_id = ?",
                       (owner, now + self.lease, device))
        return Job(str(device), str(profile), json.loads(importance), str(reason), float(enqueued))

    def finish(self, job: Job, now: float | None = None) -> None:
        """The job ran (well or not): drop it unless a newer request replaced it, and start the device's interval."""
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM jobs WHERE device_id = ? AND enqueued = ?", (job.device, job.enqueued))
            tx.execute("UPDATE jobs SET owner = '', until = 0 WHERE device_id = ?", (job.device,))
            tx.execute("INSERT INTO job_done (device_id, finished) VALUES (?, ?) ON CONFLICT (device_id) "
                       "DO UPDATE SET finished = excluded.finished", (job.device, now))

    def counts(self, now: float | None = None) -> dict[str, int]:
        """Jobs waiting and running (leased and not lapsed)."""
        now = time.time() if now is None else now
        rows = self.db.query("SELECT COUNT(*), COALESCE(SUM(CASE WHEN owner != '' AND until >= ? THEN 1 ELSE 0 END), "
                             "0) FROM jobs", (now,))
        total, running = int(rows[0][0]), int(rows[0][1])
        return {"queued": total - running, "running": running}

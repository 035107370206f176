"""Bundle derivation off the network thread: jobs in the bank (one per device, the newest request wins),
taken by each worker's derivation thread, one at a time per process, rate-limited per device.

The queue is :class:`module_bank.JobQueue`, so with several workers on one bank a job is run by one of
them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), a job whose worker died is taken again when its
lease lapses, and status and metrics see the whole queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from module_bank import Job, JobQueue
from module_bank.db import SqliteDatabase

log = logging.getLogger("eclm.sync.derive")

Publication = tuple[str, bytes]
DeriveJob = Job  # device, profile, importance, reason: re-derive one device's sub-model from the bank
POLL_SECONDS = 0.5  # how often an idle derivation thread looks at the queue


class DeriveQueue:
    """The bank's derivation jobs, run by one thread of this process.

    A device's next derivation starts at least ``min_interval`` seconds after its last one ended.
    ``run`` exports (``torch.onnx.export`` is not re-entrant: every export holds :attr:`export_lock`);
    a job that raises is passed to ``on_failure`` with the reason and the worker goes on. If the
    worker loop itself dies, :meth:`alive` turns False and :attr:`error` says why. Without ``jobs`` the
    queue lives in an in-memory database (one process).
    """

    def __init__(self, run: Callable[[DeriveJob], list[Publication]], publish: Callable[[list[Publication]], None],
                 on_failure: Callable[[DeriveJob, str], None], min_interval: float = 60.0,
                 jobs: JobQueue | None = None, owner: str = "local") -> None:
        self._run_job = run
        self.publish = publish
        self._on_failure = on_failure
        self.jobs = jobs if jobs is not None else JobQueue(SqliteDatabase(Path(":memory:")))
        self.jobs.min_interval = min_interval
        self.owner = owner
        self._cond = threading.Condition()
        self.export_lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def min_interval(self) -> float:
        return self.jobs.min_interval

    def submit(self, job: DeriveJob) -> None:
        self.jobs.submit(job)
        with self._cond:
            self._cond.notify()

    def __len__(self) -> int:
        """Jobs waiting (not being run by a worker)."""
        return self.jobs.counts()["queued"]

    def run_once(self, now: float | None = None) -> bool:
        """Run the next ready job in this thread; False when none is ready."""
        job = self.jobs.take(self.owner, time.time() if now is None else now)
        if job is None:
            return False
        self._execute(job)
        return True

    def _execute(self, job: DeriveJob) -> None:
        try:
            self._run_and_publish(job)
        finally:  # the interval counts from the end of the device's last derivation
            self.jobs.finish(job, time.time())

    def _run_and_publish(self, job: DeriveJob) -> None:
        try:
            with self.export_lock:
                pubs = self._run_job(job)
            self.publish(pubs)
        except Exception as exc:  # one failed derivation is that job's problem, never the worker's
            log.exception("derivation for %s failed", job.device)
            self._on_failure(job, f"{type(exc).__name__}: {str(exc)[:300]}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="eclm-derive", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.run_once():
                    with self._cond:
                        self._cond.wait(timeout=POLL_SECONDS)
        except BaseException as exc:  # noqa: BLE001 - recorded; the daemon sees alive() False and exits
            self.error = exc
            log.critical("the derivation worker died: %s", exc, exc_info=True)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def close(self) -> None:
        self.stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)


def importance_moved(importance: list[list[float]], reference: list[list[float]], threshold: float) -> bool:
    """The drift signal (METHOD.md section 4): the mean per-layer L1 change of a device's measured importance
    from the one its sub-model was derived for is above ``threshold`` (a change of shape counts as moved).
    """
    try:
        shift = sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum())
                    for a, b in zip(importance, reference, strict=True)) / max(1, len(reference))
    except ValueError:
        return True
    return shift > threshold

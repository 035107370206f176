"""Bundle derivation off the network thread: one worker, one job per device (coalesced), rate-limited, serialised."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("eclm.sync.derive")

Publication = tuple[str, bytes]


@dataclass(frozen=True)
class DeriveJob:
    """Re-derive one device's sub-model from the bank for this importance profile."""

    device: str
    profile: str
    importance: list[list[float]]
    reason: str


class DeriveQueue:
    """Jobs by device (a newer job replaces a waiting one), run one at a time by one worker thread.

    A device's next derivation starts at least ``min_interval`` seconds after its last one ended.
    ``run`` exports (``torch.onnx.export`` is not re-entrant: every export holds :attr:`export_lock`);
    a job that raises is passed to ``on_failure`` with the reason and the worker goes on. If the
    worker loop itself dies, :meth:`alive` turns False and :attr:`error` says why.
    """

    def __init__(self, run: Callable[[DeriveJob], list[Publication]], publish: Callable[[list[Publication]], None],
                 on_failure: Callable[[DeriveJob, str], None], min_interval: float = 60.0) -> None:
        self._run_job = run
        self.publish = publish
        self._on_failure = on_failure
        self.min_interval = min_interval
        self._jobs: dict[str, DeriveJob] = {}
        self._last: dict[str, float] = {}
        self._cond = threading.Condition()
        self.export_lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: DeriveJob) -> None:
        with self._cond:
            self._jobs[job.device] = job
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs)

    def _take(self, now: float) -> tuple[DeriveJob | None, float]:
        """The oldest-waiting job whose device may derive again, or None and how long to wait."""
        with self._cond:
            self._last = {d: t for d, t in self._last.items() if now - t < self.min_interval}
            wait = self.min_interval
            for device, job in self._jobs.items():
                ready_at = self._last.get(device, now - self.min_interval) + self.min_interval
                if ready_at <= now:
                    del self._jobs[device]
                    return job, 0.0
                wait = min(wait, ready_at - now)
            return None, wait

    def run_once(self, now: float | None = None) -> bool:
        """Run the next ready job in this thread; False when none is ready."""
        job, _ = self._take(time.time() if now is None else now)
        if job is None:
            return False
        self._execute(job)
        return True

    def _execute(self, job: DeriveJob) -> None:
        try:
            self._run_and_publish(job)
        finally:
            with self._cond:  # the interval counts from the end of the device's last derivation
                self._last[job.device] = time.time()

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
                job, wait = self._take(time.time())
                if job is None:
                    with self._cond:
                        self._cond.wait(timeout=min(max(wait, 0.05), 1.0))
                    continue
                self._execute(job)
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

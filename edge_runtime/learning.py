"""When and how the device trains: runs started by new samples, drift, a schedule or a request, their deltas kept."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from eclm.errors import TrainingUnavailableError
from eclm.parts import has_lines
from eclm.train_step import release_memory
from edge_runtime.config import EdgeConfig
from edge_runtime.generations import CLOSING, Generations, Trial, with_values
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.model import ServingModel
from edge_runtime.outbox import Outbox
from edge_runtime.resources import Pause
from edge_runtime.store import SampleStore
from edge_runtime.trainer import TrainOutcome, TrainSettings, new_delta_id, run_training

log = logging.getLogger("eclm.edge")


@dataclass(frozen=True)
class Refinement:
    """A received update fine-tuned here: the model, its run, and ``keep(served)`` to queue its delta."""

    model: ServingModel
    outcome: TrainOutcome
    keep: Callable[[bool], None]


class Learning:
    """Fine-tuning runs, one at a time, in the background or the caller's thread.

    ``importance`` gives the routing summary a delta carries, ``pause`` whether automatic training waits
    now, and ``after_run`` is called when a run has ended (the service refreshes its gauges).
    """

    def __init__(self, cfg: EdgeConfig, generations: Generations, store: SampleStore, outbox: Outbox,
                 metrics: EdgeMetrics, importance: Callable[[], list[list[float]] | None],
                 pause: Callable[[], Pause | None], after_run: Callable[[], None]) -> None:
        self.cfg, self.generations, self.store, self.outbox, self.metrics = cfg, generations, store, outbox, metrics
        self._importance, self._pause, self._after_run = importance, pause, after_run
        self.last_training: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._scheduler: threading.Thread | None = None

    # -- when
    def new_samples(self) -> int:
        """Samples stored since the last run that used them."""
        return self.store.last_id() - int(self.store.get_meta("trained_upto", "0") or 0)

    def on_samples(self, drifted: bool, pause: Pause | None) -> bool:
        """After samples were stored: start a run on accuracy drift or enough new samples; True if one started."""
        can_train = self.generations.serving.trainable and pause is None
        triggered = False
        if drifted and can_train and len(self.store.training_set()) >= self.cfg.min_train_samples:
            triggered = self.start("drift:accuracy")
        if (not triggered and can_train and self.cfg.train_every_samples > 0
                and self.new_samples() >= self.cfg.train_every_samples):
            triggered = self.start("samples")
        return triggered

    def why_not(self, pause: Pause | None, drifted: bool) -> str:
        """Why storing samples did not start a run, in words."""
        serving = self.generations.serving
        if not serving.trainable:
            return f"this bundle cannot train on the device: {serving.manifest.training.get('reason')}"
        if pause is not None:
            return f"automatic training paused: {pause.reason}"
        if self.training_now:
            return "a run is already going"
        if drifted:
            return (f"drift noticed, but {len(self.store.training_set())} training samples are held; "
                    f"a run needs {self.cfg.min_train_samples}")
        if self.cfg.train_every_samples <= 0:
            return "automatic training by sample count is off (train_every_samples = 0)"
        return f"{self.new_samples()} new samples; a run starts at {self.cfg.train_every_samples}"

    def start_scheduler(self, stop: threading.Event) -> None:
        """Train every ``train_interval_s`` when new samples wait and training is not paused (once per runtime)."""
        if self.cfg.train_interval_s <= 0 or self._scheduler is not None:
            return

        def loop() -> None:
            while not stop.wait(self.cfg.train_interval_s):
                if self.generations.serving.trainable and self.new_samples() > 0 and self._pause() is None:
                    self.start("schedule")

        self._scheduler = threading.Thread(target=loop, name="eclm-schedule", daemon=True)
        self._scheduler.start()

    # -- how
    def settings(self) -> TrainSettings:
        t = self.generations.serving.manifest.training
        return TrainSettings(
            epochs=self.cfg.epochs or int(t.get("epochs", 3)),
            batch_size=self.cfg.batch_size or int(t.get("batch_size", 16)),
            learning_rate=self.cfg.learning_rate or float(t.get("learning_rate", 1e-3)),
            seed=self.cfg.seed,
        )

    @property
    def training_now(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_trainable(self) -> None:
        serving = self.generations.serving
        if not serving.trainable:
            raise TrainingUnavailableError(
                f"this bundle cannot train on the device: {serving.training_reason}",
                hint="it still serves and collects samples; export a bundle with a training step graph to train",
            )

    def start(self, reason: str) -> bool:
        """Start a background run unless one is running; False if one was."""
        self._check_trainable()
        if self.training_now:
            return False
        self._thread = threading.Thread(target=self._job, args=(reason,), name="eclm-train", daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.last_training

    def run_now(self, reason: str = "api") -> dict[str, Any]:
        """Run one fine-tuning run in the calling thread (for scripts and tests)."""
        self._check_trainable()
        self._job(reason)
        assert self.last_training is not None
        return self.last_training

    def _job(self, reason: str) -> None:
        try:
            with self.generations.changing() as open_:  # waits while an update from the cloud is being applied
                result = self._once() if open_ else {"accepted": False, "reason": CLOSING}
        except Exception as exc:  # a failed run is reported, never fatal to serving
            log.exception("training run failed")
            result = {"accepted": False, "reason": f"training failed: {exc}", "trigger": reason}
            self.metrics.training_runs.labels("error").inc()
        finally:
            release_memory()
        self.last_training = {**result, "trigger": reason, "finished": time.time()}
        self._after_run()

    def _once(self) -> dict[str, Any]:
        serving = self.generations.serving
        upto = self.store.last_id()
        train, holdout = self.store.training_set(), self.store.holdout_set()
        if len(train) < self.cfg.min_train_samples:
            self.metrics.training_runs.labels("skipped").inc()
            return {"accepted": False, "reason": f"{len(train)} training samples held; "
                    f"at least {self.cfg.min_train_samples} needed", "samples": len(train)}
        outcome, deltas, trained = run_training(serving, train, holdout, self.settings(), self.generations.closing)
        if not deltas:
            self.metrics.training_runs.labels("failed").inc()
            return outcome.to_dict()
        candidate = with_values(serving, trained)
        outcome.delta_id = new_delta_id()

        def keep(trial: Trial) -> None:  # the delta is kept whether or not the run serves
            outcome.holdout_before, outcome.holdout_after = trial.before, trial.after
            if trial.verdict is None:
                outcome.reason = "no holdout samples to judge the run; not served"
            else:
                outcome.accepted = trial.served
                if not trial.served:
                    outcome.reason = f"{trial.verdict.reason} (delta kept)"
            self._keep_delta(serving, outcome, deltas, upto)

        trial = self.generations.trial(candidate, holdout, record={"delta_id": outcome.delta_id},
                                       unjudged_serves=False, keep=keep)
        if trial.served:
            outcome.generation = candidate.generation
        self.store.set_meta("trained_upto", str(upto))
        self.metrics.training_runs.labels("accepted" if outcome.accepted else "rejected").inc()
        if outcome.loss_last == outcome.loss_last:
            self.metrics.training_loss.set(outcome.loss_last)
        return outcome.to_dict()

    def refine(self, candidate: ServingModel) -> Refinement | None:
        """``candidate`` (a module update loaded into the serving model) fine-tuned on this device's samples,
        or None when there are too few samples or the run fails. Call it holding the generations' lock.

        The refined model's delta is measured from the received versions; :meth:`Refinement.keep` queues it
        once the refined model serves.
        """
        train, holdout = self.store.training_set(), self.store.holdout_set()
        if not candidate.trainable or len(train) < self.cfg.min_train_samples:
            return None
        upto = self.store.last_id()
        outcome, deltas, trained = run_training(candidate, train, holdout, self.settings(), self.generations.closing)
        if not deltas:
            log.warning("refining a module update failed (%s); judging it as it came", outcome.reason)
            return None
        outcome.delta_id = new_delta_id()
        self.metrics.training_runs.labels("refine").inc()

        def keep(served: bool) -> None:
            if served:
                outcome.accepted = True
                self._keep_delta(candidate, outcome, deltas, upto)
                self.store.set_meta("trained_upto", str(upto))

        return Refinement(with_values(candidate, trained), outcome, keep)

    def _keep_delta(self, serving: ServingModel, outcome: TrainOutcome,
                    deltas: dict[str, dict[str, np.ndarray]], upto: int) -> None:
        environment = self.store.get_meta("environment", "") or ""  # where the samples came from
        if environment:  # the cloud merges no head from an environment (it stays here): do not send it
            deltas = {pid: t for pid, t in deltas.items() if has_lines(pid)}
            if not deltas:
                log.info("delta %s holds only the head, which stays on the device in environment %r; "
                         "not sent", outcome.delta_id, environment)
                return
        versions = serving.module_versions
        meta = {
            "schema_version": 1,
            "device_id": self.cfg.device_id,
            "bank_id": serving.manifest.bank_id,
            "bundle": serving.digest,
            "local_generation": serving.generation,
            "parts": {pid: {"base_version": versions[pid], "params": sorted(t)} for pid, t in deltas.items()},
            "environment": environment,
            "base_environment": serving.line,
            "sample_count": outcome.samples,
            "importance": self._importance(),
            "metrics": {k: v for k, v in outcome.to_dict().items()
                        if k in ("loss_first", "loss_last", "holdout_before", "holdout_after", "steps")},
            "accepted_locally": outcome.accepted,
            "trained_upto": upto,
            "created": time.time(),
        }
        flat = {name: arr for part in deltas.values() for name, arr in part.items()}
        assert outcome.delta_id is not None
        self.outbox.put(outcome.delta_id, meta, flat)

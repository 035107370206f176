"""The edge runtime's composition root: wires generations, learning, updates, the variant ladder and the drift
watcher, and answers what the HTTP and MQTT faces ask (predict, samples, status).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import DataError
from eclm.signing import load_verifier
from edge_runtime.config import EdgeConfig
from edge_runtime.drift import DriftMonitor
from edge_runtime.drift_watch import DriftWatcher
from edge_runtime.events import EventSink, Listener
from edge_runtime.generations import Generations
from edge_runtime.learning import Learning
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.model import ServingModel
from edge_runtime.outbox import Outbox
from edge_runtime.resources import Ladder, LatencyWindow, Pause, Readings
from edge_runtime.state import StateDir
from edge_runtime.store import SampleStore
from edge_runtime.trainer import TrainSettings
from edge_runtime.updates import Updates
from edge_runtime.variants import VariantLadder

log = logging.getLogger("eclm.edge")
NO_SYNC = {"broker": None, "connected": False, "mode": "no broker configured: not syncing"}


class EdgeService:
    """One device's runtime. Thread-safe: HTTP handlers, the trainer and the scheduler share it."""

    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.metrics = EdgeMetrics()
        self.verifier = load_verifier(cfg.trust_key) if cfg.trust_key else None
        self.metrics.unsigned_bundles_allowed.set(0 if self.verifier else 1)
        if self.verifier is None:
            log.warning("no --trust-key: bundles are served WITHOUT signature checks (anyone who can hand this "
                        "device a bundle decides what it runs); pass --trust-key with the cloud's signing.pub")
        self.state = StateDir(cfg.state_dir)  # locked: one runtime per state directory
        try:
            self.generations = Generations(cfg, self.state, self.verifier, self.metrics)
            self.store = SampleStore(cfg.state_dir / "samples.sqlite", self.serving.input_shape,
                                     capacity=cfg.max_samples, holdout_every=cfg.holdout_every)
            self.outbox = Outbox(cfg.state_dir / "outbox")
            self.generations.recover(self.store, self.outbox)
        except BaseException:
            if hasattr(self, "store"):
                self.store.close()
            self.state.close()
            raise
        current = self.generations.current  # components read the serving model when they need it
        self.events = EventSink()
        self.listeners: list[Listener] = self.events.listeners
        self.rungs = VariantLadder(cfg, current, self.metrics, self.events)
        self.watcher = DriftWatcher(current, self.events)
        self.learning = Learning(cfg, self.generations, self.store, self.outbox, self.metrics,
                                 importance=self.importance, pause=self.training_pause, after_run=self._refresh_gauges)
        self.updates = Updates(self.generations, self.store, self.metrics, self.events,
                               refine=self.learning.refine if cfg.refine_updates else None)
        if cfg.environment is not None:
            self.store.set_meta("environment", cfg.environment)
        self.started = time.time()
        self._stop = threading.Event()
        self.sync_report: Callable[[], dict[str, Any]] | None = None  # set by the MQTT side when a broker is used
        self._refresh_gauges()

    # -- what the components hold, read through the service
    @property
    def serving(self) -> ServingModel:
        """The main model of the serving generation (a cheaper variant may answer instead: :attr:`active`)."""
        return self.generations.serving

    @property
    def active(self) -> ServingModel:
        """The model that answers predictions now (the main model or a cheaper variant)."""
        return self.rungs.now[0]

    @property
    def drift(self) -> DriftMonitor:
        return self.watcher.monitor

    @property
    def want_bundle(self) -> bool:
        """Whether importance drift asked the cloud for a bundle derived for what this device sees now."""
        return self.watcher.want_bundle

    @property
    def latency(self) -> LatencyWindow:
        return self.rungs.latency

    @property
    def last_readings(self) -> Readings | None:
        return self.rungs.last_readings

    @last_readings.setter
    def last_readings(self, readings: Readings | None) -> None:
        self.rungs.last_readings = readings

    @property
    def paused(self) -> Pause | None:
        return self.rungs.paused

    @property
    def level(self) -> int:
        return self.rungs.level

    @property
    def last_switch(self) -> dict[str, Any] | None:
        return self.rungs.last_switch

    @property
    def last_training(self) -> dict[str, Any] | None:
        return self.learning.last_training

    @property
    def last_update(self) -> dict[str, Any] | None:
        return self.updates.last_update

    # -- bundles and updates
    def install_bundle(self, bundle: Path) -> dict[str, Any]:
        """Verify and swap in a new bundle; a bad one is refused and the current one keeps serving."""
        result = self.generations.install_bundle(bundle)
        self._refresh_gauges()
        return result

    @property
    def environment(self) -> str:
        """Where this device works now ("": the shared line); its deltas merge into this environment's lines."""
        return self.store.get_meta("environment", "") or ""

    def set_environment(self, name: str) -> dict[str, Any]:
        """Record that the device now works in ``name`` (kept across restarts); the cloud is told, and sends
        the modules devices there trained (docs/method.md, "Environment lines").
        """
        from eclm.ids import check_environment

        name = check_environment(name)
        before = self.environment
        if name != before:
            self.store.set_meta("environment", name)
            log.info("environment: %r -> %r", before, name)
            self.events.notify("environment", {"from": before, "to": name})
        return {"environment": name, "changed": name != before, "line": self.serving.line}

    def apply_module_update(self, versions: dict[str, int], tensors: dict[str, np.ndarray],
                            environment: str = "") -> dict[str, Any]:
        """Load new module versions into the serving weights; kept only if the holdout does not get worse."""
        result = self.updates.apply_module_update(versions, tensors, environment)
        self._refresh_gauges()
        return result

    def install_bundle_archive(self, archive: bytes, verifier: Any) -> dict[str, Any]:
        """Unpack a bundle sent by the cloud, check its signature, hashes, device, profile and that it is newer
        than every bundle served here, and swap it in if not worse.
        """
        result = self.updates.install_bundle_archive(archive, verifier)
        self._refresh_gauges()
        return result

    # -- predictions and samples
    def predict(self, x: np.ndarray) -> dict[str, Any]:
        serving, variant = self.rungs.now  # one reference for the whole request, whatever swaps meanwhile
        x = serving.check_input(x)
        t = time.perf_counter()
        probs = serving.predict(x)
        elapsed = time.perf_counter() - t
        self.latency.add(elapsed, len(x))
        self.metrics.predict_latency.observe(elapsed)
        if self.cfg.drift:
            self.watcher.offer(x, t)  # the routing of unlabelled inputs is judged off the request path
        self.metrics.predicted.inc(len(x))
        labels = serving.labels
        return {
            "probabilities": probs.tolist(),
            "predictions": [labels[i] for i in probs.argmax(axis=1).tolist()],
            "labels": serving.labels,
            "generation": serving.generation,
            "bundle": serving.digest,
            "variant": variant,  # the name of the model that answered, even if the ladder moved meanwhile
        }

    def _label_indices(self, labels: list[Any]) -> np.ndarray:
        names = {name: i for i, name in enumerate(self.serving.labels)}
        out = []
        for lab in labels:
            if isinstance(lab, bool):
                raise DataError(f"label {lab!r} is not a class", hint="send class indices or label names")
            if isinstance(lab, int | np.integer) and 0 <= int(lab) < len(names):
                out.append(int(lab))
            elif isinstance(lab, str) and lab in names:
                out.append(names[lab])
            else:
                raise DataError(f"unknown label {lab!r}; known: {self.serving.labels}",
                                hint="send class indices or label names of this bundle")
        return np.asarray(out, dtype=np.int64)

    def add_samples(self, x: np.ndarray, labels: list[Any]) -> dict[str, Any]:
        x = self.serving.check_input(x)
        y = self._label_indices(labels)
        if len(y) != len(x):
            raise DataError(f"{len(x)} inputs but {len(y)} labels", hint="send one label per input")
        drifted = False
        if self.cfg.drift:
            drifted = self.watcher.observe_labels(self.serving, x, y)
        held = self.store.add(x, y)
        self.metrics.samples_held.set(held)
        pause = self.training_pause()
        if drifted:
            self.events.notify("drift", {"kind": "accuracy", **self.drift.report()})
        triggered = self.learning.on_samples(drifted, pause)
        return {"stored": len(y), "held": held, "training_started": triggered, "training_paused": pause is not None,
                "training_reason": None if triggered else self.learning.why_not(pause, drifted), "drift": drifted}

    # -- training
    def training_pause(self) -> Pause | None:
        """Whether automatic training waits now (the ``train_pause`` policy); updates status and metric."""
        return self.rungs.training_pause()

    def latency_budget_ms(self) -> float:
        """The per-sample latency the runtime holds itself to: ``max_latency_ms`` or the profile's target."""
        return self.rungs.latency_budget_ms()

    def settings(self) -> TrainSettings:
        return self.learning.settings()

    @property
    def training_now(self) -> bool:
        return self.learning.training_now

    def start_training(self, reason: str) -> bool:
        """Start a background run unless one is running; False if one was."""
        return self.learning.start(reason)

    def wait_for_training(self, timeout: float | None = None) -> dict[str, Any] | None:
        return self.learning.wait(timeout)

    def train_now(self, reason: str = "api") -> dict[str, Any]:
        """Run one fine-tuning run in the calling thread (for scripts and tests)."""
        return self.learning.run_now(reason)

    def start_scheduler(self) -> None:
        self.learning.start_scheduler(self._stop)

    # -- drift
    def importance(self, max_samples: int = 512) -> list[list[float]] | None:
        """Mean routing weight of every bank module over the newest stored samples (via selector.onnx)."""
        return self.watcher.importance(self.store, max_samples)

    def routing(self, x: np.ndarray) -> list[np.ndarray] | None:
        """The selector's routing weights of ``x`` over every bank module, per layer."""
        return self.watcher.routing(x)

    # -- the variant ladder
    def variants(self) -> list[ServingModel]:
        """Cheaper models of the serving bundle, most expensive first, with the serving generation's weights."""
        return self.rungs.variants()

    def variant_name(self) -> str:
        return self.rungs.variant_name()

    def set_level(self, level: int, reason: str) -> None:
        """Serve rung ``level`` of the ladder (0: the main model); predictions never stop."""
        self.rungs.set_level(level, reason)

    def ladder(self) -> Ladder:
        return self.rungs.ladder()

    # -- monitors
    def measure_holdout(self) -> float | None:
        """Holdout accuracy of the serving model (also sets the gauge); None without holdout samples."""
        holdout = self.store.holdout_set()
        if len(holdout) == 0:
            return None
        value = float(self.serving.accuracy(holdout.x, holdout.y))
        self.metrics.holdout_accuracy.set(value)
        return value

    def start_monitors(self) -> None:
        """Start the drift and resource threads (and the training schedule, if one is set)."""
        def first_holdout() -> None:
            try:
                self.measure_holdout()
            except Exception:  # closed meanwhile, or a bad sample: the gauge stays unknown
                log.debug("could not measure the holdout accuracy at start", exc_info=True)

        threading.Thread(target=first_holdout, name="eclm-holdout", daemon=True).start()
        if self.cfg.drift:
            threading.Thread(target=self.watcher.loop, args=(self._stop,), name="eclm-drift", daemon=True).start()
        if self.cfg.resource_interval_s > 0:
            threading.Thread(target=self.rungs.resource_loop, args=(self._stop,), name="eclm-resources",
                             daemon=True).start()
        self.start_scheduler()

    # -- status
    def _refresh_gauges(self) -> None:
        with self.generations.changing() as open_:  # after a change; the stores may have closed since
            if not open_:
                return
            self.rungs.refresh()
            self.watcher.rebase()
            self.metrics.generation.set(self.serving.generation)
            self.metrics.outbox_entries.set(len(self.outbox))
            self.metrics.samples_held.set(self.store.count())

    def status(self) -> dict[str, Any]:
        s = self.serving
        return {
            "device_id": self.cfg.device_id,
            "environment": self.environment,
            "line": s.line,
            "bundle": {"digest": s.digest, "bank_id": s.manifest.bank_id, "profile": s.manifest.profile["name"],
                       "generation": s.generation, "trainable": s.trainable,
                       "training_reason": s.training_reason},
            "modules": [{"part_id": m["part_id"], "version": m["version"], "trainable": m["trainable"]}
                        for m in s.manifest.modules],
            "samples": {"held": self.store.count(), "holdout_every": self.store.holdout_every,
                        "new_since_training": self.learning.new_samples()},
            "training": {"running": self.training_now, "last": self.last_training, "settings": vars(self.settings()),
                         "paused": self.paused is not None,
                         "paused_reason": self.paused.reason if self.paused else None,
                         "pause_policy": self.cfg.train_pause},
            "outbox": {"entries": len(self.outbox), "bytes": self.outbox.bytes_pending()},
            "module_versions": s.module_versions,
            "last_update": self.last_update,
            "variant": {"level": self.level, "name": self.variant_name(), "last_switch": self.last_switch,
                        "latency_budget_ms": self.latency_budget_ms(),
                        "readings": vars(self.last_readings) if self.last_readings is not None else None},
            "drift": self.drift.report(),
            "trust": self._trust(),
            "sync": self.sync_report() if self.sync_report else NO_SYNC,
            "resources": _resources(),
            "uptime_s": time.time() - self.started,
        }

    def _trust(self) -> dict[str, Any]:
        """Whether only signed bundles serve, with which key, and who the serving bundle was made for."""
        m = self.serving.manifest
        return {"signed_only": self.verifier is not None,
                "key_id": self.verifier.key_id if self.verifier else None,
                "bundle_signed": bool(m.signature), "bundle_key_id": (m.signature or {}).get("key_id"),
                "bundle_device": m.device_id, "bundle_profile": m.profile_name, "bundle_issued_at": m.issued_at}

    def close(self) -> None:
        self._stop.set()
        self.generations.closing.set()  # a run or a refinement in progress ends at its next batch
        self.wait_for_training(timeout=60)

        def close_stores() -> None:
            try:
                self.store.close()
            finally:
                self.state.close()

        self.generations.close(close_stores, timeout=60)  # an update being applied finishes first


def _resources() -> dict[str, Any]:
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0].lower() + "_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    t = os.times()
    out["cpu_seconds"] = t.user + t.system
    try:
        out["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return out

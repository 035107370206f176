"""The edge runtime's core: serve a bundle, keep samples, fine-tune in the background, keep deltas."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import BundleError, DataError, TrainingUnavailableError
from eclm.ort import load_onnxruntime
from eclm.train_step import release_memory
from edge_runtime.config import EdgeConfig
from edge_runtime.drift import DriftMonitor
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.model import ServingModel
from edge_runtime.outbox import Outbox
from edge_runtime.resources import Ladder, ProcReader, Thresholds
from edge_runtime.state import Pointer, StateDir, read_params, write_params
from edge_runtime.store import SampleStore
from edge_runtime.trainer import TrainOutcome, TrainSettings, new_delta_id, open_runner, run_training

log = logging.getLogger("eclm.edge")


class EdgeService:
    """One device's runtime. Thread-safe: HTTP handlers, the trainer and the scheduler share it."""

    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.metrics = EdgeMetrics()
        self.state = StateDir(cfg.state_dir)
        self.serving = self._open_initial(cfg.bundle)
        self.store = SampleStore(cfg.state_dir / "samples.sqlite", self.serving.input_shape,
                                 capacity=cfg.max_samples, holdout_every=cfg.holdout_every)
        self.outbox = Outbox(cfg.state_dir / "outbox")
        self._recover()
        self._train_lock = threading.Lock()
        self._train_thread: threading.Thread | None = None
        self.last_training: dict[str, Any] | None = None
        self.last_update: dict[str, Any] | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.latencies: deque[float] = deque(maxlen=200)
        self._variants: dict[str, list[ServingModel]] = {}
        self.level = 0
        self.last_switch: dict[str, Any] | None = None
        self.active = self.serving
        self.drift = DriftMonitor(self._reference())
        self._routing_inbox: queue.Queue[np.ndarray] = queue.Queue(maxsize=4)
        self._last_routing = 0.0
        self.want_bundle = False
        self._refresh_gauges()

    # -- bundles and generations
    def _recover(self) -> None:
        """After a crash: roll a committed generation whose delta was kept forward, discard the others,
        and never retrain samples a kept delta already used.
        """
        upto = max(int(self.store.get_meta("trained_upto", "0") or 0), self.outbox.max_trained_upto())
        self.store.set_meta("trained_upto", str(upto))
        pointer = self.state.read_pointer()
        if pointer is None:
            return
        kept = self.outbox.known_ids()
        for n in self.state.generations():
            if n <= pointer.generation:
                continue
            try:
                info = self.state.verify_generation(n)
            except BundleError:
                info = {}
            if (info.get("bundle") == pointer.bundle and info.get("parent") == pointer.generation
                    and info.get("delta_id") in kept):
                log.warning("rolling forward to generation %d (its delta was kept before a crash)", n)
                pointer = Pointer(pointer.bundle, n)
                self.state.write_pointer(pointer)
                self.serving = self._open(pointer)
            else:
                log.warning("discarding generation %d, left unfinished by a crash", n)
                self.state.discard_generation(n)

    def _open(self, pointer: Pointer) -> ServingModel:
        bundle_dir = self.state.bundle_dir(pointer.bundle)
        from eclm.manifest import verify_bundle
        from eclm.onnx_weights import read_initializers

        manifest = verify_bundle(bundle_dir)
        base = read_initializers(bundle_dir / "model.onnx")
        gen = pointer.generation
        while gen > 0:
            try:
                info = self.state.verify_generation(gen)
                if info.get("bundle") != pointer.bundle:
                    raise BundleError(f"generation {gen} belongs to another bundle", hint="skipped")
                own = read_params(self.state.gen_dir(gen), base)
                versions = info.get("module_versions")
                return self._checked(ServingModel(
                    manifest, bundle_dir, pointer.bundle, gen, bundle_dir / "model.onnx", {**base, **own},
                    frozenset(own), {k: int(v) for k, v in versions.items()} if versions else None))
            except BundleError as exc:
                log.error("cannot serve generation %d (%s); falling back to its parent", gen, exc.message)
                gen = int(self._parent_of(gen))
        return self._checked(ServingModel(manifest, bundle_dir, pointer.bundle, 0, bundle_dir / "model.onnx", base))

    def _checked(self, serving: ServingModel) -> ServingModel:
        """Whether this runtime can train ``serving``'s bundle: its step graph is loaded once per bundle."""
        if not serving.manifest.training.get("available"):
            return serving
        problems = self.__dict__.setdefault("_training_problems", {})
        if serving.digest not in problems:
            if not serving.manifest.training.get("step"):
                problems[serving.digest] = ("the bundle carries no training step graph (made by an older "
                                            "eclm-export); re-export it to train on this device")
            else:
                try:
                    open_runner(serving)
                    problems[serving.digest] = ""
                except TrainingUnavailableError as exc:
                    problems[serving.digest] = exc.message
                    log.error("this bundle serves but cannot train here: %s", exc.message)
                release_memory()
        serving.training_problem = problems[serving.digest]
        return serving

    def _parent_of(self, gen: int) -> int:
        import json

        try:
            return int(json.loads((self.state.gen_dir(gen) / "generation.json").read_text()).get("parent", 0))
        except (OSError, ValueError):
            return 0

    def _open_initial(self, bundle: Path | None) -> ServingModel:
        pointer = self.state.read_pointer()
        if bundle is not None:
            try:
                digest, _ = self.state.install_bundle(bundle)
            except BundleError as exc:
                self.metrics.bundle_rejections.inc()
                if pointer is None:
                    raise
                log.error("refusing bundle %s: %s; serving the previous one", bundle, exc.message)
            else:
                if pointer is None or pointer.bundle != digest:
                    pointer = Pointer(digest, 0)
                    self.state.write_pointer(pointer)
        if pointer is None:
            raise BundleError(
                f"nothing to serve: no --bundle given and no bundle installed in {self.cfg.state_dir}",
                hint="pass --bundle DIR (a folder made by eclm-export)",
            )
        return self._open(pointer)

    def install_bundle(self, bundle: Path) -> dict[str, Any]:
        """Verify and swap in a new bundle; a bad one is refused and the current one keeps serving."""
        try:
            digest, _ = self.state.install_bundle(bundle)
            new = self._open(Pointer(digest, 0))
        except BundleError:
            self.metrics.bundle_rejections.inc()
            raise
        with self._train_lock:
            self.state.write_pointer(Pointer(digest, 0))
            self.serving = new
        self._refresh_gauges()
        return {"bundle": digest, "generation": 0}

    # -- predictions and samples
    def predict(self, x: np.ndarray) -> dict[str, Any]:
        serving = self.active  # one reference for the whole request, whatever swaps meanwhile
        x = serving.check_input(x)
        t = time.perf_counter()
        probs = serving.predict(x)
        elapsed = time.perf_counter() - t
        self.latencies.append(elapsed * 1e3)
        self.metrics.predict_latency.observe(elapsed)
        if self.cfg.drift and t - self._last_routing > 0.2:
            self._last_routing = t  # the routing of unlabelled inputs is judged off the request path
            with contextlib.suppress(queue.Full):
                self._routing_inbox.put_nowait(x)
        self.metrics.predicted.inc(len(x))
        labels = serving.labels
        return {
            "probabilities": probs.tolist(),
            "predictions": [labels[i] for i in probs.argmax(axis=1).tolist()],
            "labels": serving.labels,
            "generation": serving.generation,
            "bundle": serving.digest,
            "variant": self.variant_name(),
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
            correct = self.serving.logits(x).argmax(axis=1) == y
            drifted = self.drift.observe_labels(correct)
        held = self.store.add(x, y)
        self.metrics.samples_held.set(held)
        triggered = False
        can_train = self.serving.trainable and self.level == 0
        if drifted:
            self._notify("drift", {"kind": "accuracy", **self.drift.report()})
            if can_train and len(self.store.training_set()) >= self.cfg.min_train_samples:
                triggered = self.start_training("drift:accuracy")
        if (not triggered and can_train and self.cfg.train_every_samples > 0
                and self._new_samples() >= self.cfg.train_every_samples):
            triggered = self.start_training("samples")
        return {"stored": len(y), "held": held, "training_started": triggered, "drift": drifted}

    def _new_samples(self) -> int:
        return self.store.last_id() - int(self.store.get_meta("trained_upto", "0") or 0)

    # -- training
    def settings(self) -> TrainSettings:
        t = self.serving.manifest.training
        return TrainSettings(
            epochs=self.cfg.epochs or int(t.get("epochs", 3)),
            batch_size=self.cfg.batch_size or int(t.get("batch_size", 16)),
            learning_rate=self.cfg.learning_rate or float(t.get("learning_rate", 1e-3)),
            seed=self.cfg.seed,
        )

    @property
    def training_now(self) -> bool:
        return self._train_thread is not None and self._train_thread.is_alive()

    def start_training(self, reason: str) -> bool:
        """Start a background run unless one is running; False if one was."""
        if not self.serving.trainable:
            raise TrainingUnavailableError(
                f"this bundle cannot train on the device: {self.serving.training_reason}",
                hint="it still serves and collects samples; export a bundle with a training step graph to train",
            )
        if self.training_now:
            return False
        self._train_thread = threading.Thread(target=self._train_job, args=(reason,), name="eclm-train",
                                              daemon=True)
        self._train_thread.start()
        return True

    def wait_for_training(self, timeout: float | None = None) -> dict[str, Any] | None:
        thread = self._train_thread
        if thread is not None:
            thread.join(timeout)
        return self.last_training

    def train_now(self, reason: str = "api") -> dict[str, Any]:
        """Run one fine-tuning run in the calling thread (for scripts and tests)."""
        if not self.serving.trainable:
            raise TrainingUnavailableError(
                f"this bundle cannot train on the device: {self.serving.training_reason}",
                hint="it still serves and collects samples; export a bundle with a training step graph to train",
            )
        self._train_job(reason)
        assert self.last_training is not None
        return self.last_training

    def _train_job(self, reason: str) -> None:
        self._train_lock.acquire()  # waits while an update from the cloud is being applied
        try:
            result = self._train_once(reason)
        except Exception as exc:  # a failed run is reported, never fatal to serving
            log.exception("training run failed")
            result = {"accepted": False, "reason": f"training failed: {exc}", "trigger": reason}
            self.metrics.training_runs.labels("error").inc()
        finally:
            self._train_lock.release()
            release_memory()
        self.last_training = {**result, "trigger": reason, "finished": time.time()}
        self._refresh_gauges()

    def _train_once(self, reason: str) -> dict[str, Any]:
        serving = self.serving
        upto = self.store.last_id()
        train, holdout = self.store.training_set(), self.store.holdout_set()
        if len(train) < self.cfg.min_train_samples:
            self.metrics.training_runs.labels("skipped").inc()
            return {"accepted": False, "reason": f"{len(train)} training samples held; "
                    f"at least {self.cfg.min_train_samples} needed", "samples": len(train)}
        work = self.state.new_generation_workdir()
        try:
            outcome, deltas, trained = run_training(serving, train, holdout, self.settings())
            if not deltas:
                self.metrics.training_runs.labels("failed").inc()
                return outcome.to_dict()
            candidate = _with_values(serving, trained)
            write_params(work, candidate.trained)  # the generation's files first, then the holdout gate
            outcome.holdout_before = serving.accuracy(holdout.x, holdout.y)
            outcome.holdout_after = candidate.accuracy(holdout.x, holdout.y)
            if len(holdout) == 0:
                outcome.reason = "no holdout samples to judge the run; not served"
            elif not_worse(serving, candidate, holdout):
                outcome.accepted = True
            else:
                outcome.reason = "worse on the holdout than the serving model; not served (delta kept)"
            outcome.delta_id = new_delta_id()
            # Order for kill -9 at any point: the generation is committed, then its delta is kept (it
            # records the samples it used), then the pointer moves. On restart a committed generation
            # whose delta was kept is rolled forward; one without is discarded and its samples retrained.
            if outcome.accepted:
                n = self.state.next_generation()
                self.state.commit_generation(work, n, {
                    "bundle": serving.digest, "parent": serving.generation, "delta_id": outcome.delta_id,
                    "holdout_before": outcome.holdout_before, "holdout_after": outcome.holdout_after,
                    "module_versions": serving.module_versions,
                })
                self._keep_delta(serving, outcome, deltas, upto)
                self.state.write_pointer(Pointer(serving.digest, n))
                candidate.generation = n
                self.serving = candidate  # requests in flight keep the session object they already hold
                outcome.generation = n
            else:
                self._keep_delta(serving, outcome, deltas, upto)
            self.store.set_meta("trained_upto", str(upto))
            self.metrics.training_runs.labels("accepted" if outcome.accepted else "rejected").inc()
            if outcome.loss_last == outcome.loss_last:
                self.metrics.training_loss.set(outcome.loss_last)
            return outcome.to_dict()
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def _keep_delta(self, serving: ServingModel, outcome: TrainOutcome,
                    deltas: dict[str, dict[str, np.ndarray]], upto: int) -> None:
        versions = serving.module_versions
        meta = {
            "schema_version": 1,
            "device_id": self.cfg.device_id,
            "bank_id": serving.manifest.bank_id,
            "bundle": serving.digest,
            "local_generation": serving.generation,
            "parts": {pid: {"base_version": versions[pid], "params": sorted(t)} for pid, t in deltas.items()},
            "sample_count": outcome.samples,
            "importance": self.importance(),
            "metrics": {k: v for k, v in outcome.to_dict().items()
                        if k in ("loss_first", "loss_last", "holdout_before", "holdout_after", "steps")},
            "accepted_locally": outcome.accepted,
            "trained_upto": upto,
            "created": time.time(),
        }
        flat = {name: arr for part in deltas.values() for name, arr in part.items()}
        assert outcome.delta_id is not None
        self.outbox.put(outcome.delta_id, meta, flat)

    # -- importance and updates from the cloud
    def importance(self, max_samples: int = 512) -> list[list[float]] | None:
        """Mean routing weight of every bank module over the newest stored samples (via selector.onnx)."""
        if self.store.count() == 0:
            return None
        gates = self.routing(self.store.recent(max_samples).x)
        return None if gates is None else [[float(v) for v in g.mean(axis=0)] for g in gates]

    def apply_module_update(self, versions: dict[str, int], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Load new module versions into the serving weights; kept only if the holdout does not get worse."""
        with self._train_lock:
            serving = self.serving
            if not serving.trainable:
                raise TrainingUnavailableError(
                    f"module updates need a bundle this device can train: {serving.training_reason}",
                    hint="the cloud sends inference-only devices whole bundles")
            current = serving.module_versions
            fresh = {pid: v for pid, v in versions.items() if v > current.get(pid, 0)}
            if not fresh:
                return {"applied": False, "reason": "already at these versions or newer"}
            wanted = {f"net.{name}": arr for name, arr in tensors.items()}
            unknown = sorted(set(wanted) - set(serving.weights))
            if unknown:
                raise DataError(f"update names parameters this bundle lacks: {unknown[:3]}",
                                hint="the cloud must send modules of this device's sub-model")
            for name, arr in wanted.items():
                if serving.weights[name].shape != arr.shape:
                    raise DataError(f"update for {name} has shape {arr.shape}", hint="refused")
            work = self.state.new_generation_workdir()
            try:
                holdout = self.store.holdout_set()
                candidate = _with_values(serving, {n: np.array(a, dtype=np.float32) for n, a in wanted.items()})
                write_params(work, candidate.trained)
                before = serving.accuracy(holdout.x, holdout.y)
                after = candidate.accuracy(holdout.x, holdout.y)
                new_versions = {**current, **fresh}
                if len(holdout) and not not_worse(serving, candidate, holdout):
                    self.metrics.update_rollbacks.inc()
                    result = {"applied": False, "rolled_back": True, "holdout_before": before,
                              "holdout_after": after, "versions": fresh,
                              "reason": "the update did worse on the holdout than the serving model"}
                    self.last_update = result
                    self._notify("rollback", result)
                    return result
                n = self.state.next_generation()
                self.state.commit_generation(work, n, {
                    "bundle": serving.digest, "parent": serving.generation, "update": fresh,
                    "holdout_before": before, "holdout_after": after, "module_versions": new_versions,
                })
                self.state.write_pointer(Pointer(serving.digest, n))
                candidate.generation, candidate.versions = n, new_versions
                self.serving = candidate
                result = {"applied": True, "generation": n, "versions": fresh, "holdout_before": before,
                          "holdout_after": after}
                self.last_update = result
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)
        self._refresh_gauges()
        return result

    def install_bundle_archive(self, archive: bytes, verifier: Any) -> dict[str, Any]:
        """Unpack a bundle sent by the cloud, check its signature and hashes, and swap it in if not worse."""
        import tempfile

        from eclm.archive import untar_bundle
        from eclm.manifest import verify_bundle

        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.state.root / "bundles"))
        try:
            untar_bundle(archive, tmp / "b")
            verify_bundle(tmp / "b", verifier)
            with self._train_lock:
                serving = self.serving
                digest, _ = self.state.install_bundle(tmp / "b")
                candidate = self._open(Pointer(digest, 0))
                holdout = self.store.holdout_set()
                before = serving.accuracy(holdout.x, holdout.y)
                after = candidate.accuracy(holdout.x, holdout.y)
                if len(holdout) and not not_worse(serving, candidate, holdout):
                    self.metrics.update_rollbacks.inc()
                    result = {"applied": False, "rolled_back": True, "bundle": digest, "holdout_before": before,
                              "holdout_after": after, "reason": "the bundle did worse on the holdout"}
                    self._notify("rollback", result)
                else:
                    self.state.write_pointer(Pointer(digest, 0))
                    self.serving = candidate
                    result = {"applied": True, "bundle": digest, "holdout_before": before, "holdout_after": after}
            self.last_update = result
        except BundleError:
            self.metrics.bundle_rejections.inc()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._refresh_gauges()
        return result

    # -- listeners (the sync client tells the cloud)
    def _notify(self, event: str, detail: dict[str, Any]) -> None:
        log.info("%s: %s", event, detail)
        for listener in list(self.listeners):
            try:
                listener(event, detail)
            except Exception:  # a listener never breaks the runtime
                log.exception("listener failed on %s", event)

    # -- drift
    def _reference(self) -> list[list[float]]:
        return [[float(v) for v in row] for row in self.serving.manifest.importance]

    def routing(self, x: np.ndarray) -> list[np.ndarray] | None:
        """The selector's routing weights of ``x`` over every bank module, per layer."""
        serving = self.serving
        path = serving.bundle_dir / serving.manifest.selector.get("file", "selector.onnx")
        if not path.is_file():
            return None
        if getattr(self, "_selector_path", None) != path:
            ort = load_onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self._selector = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._selector_path = path
        return [np.asarray(g) for g in self._selector.run(None, {self._selector.get_inputs()[0].name: x})]

    def _drift_loop(self) -> None:
        while not self._stop.is_set():
            try:
                x = self._routing_inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                gates = self.routing(x)
                if gates is not None and self.drift.observe_routing(gates):
                    self.want_bundle = True
                    self._notify("drift", {"kind": "importance", **self.drift.report()})
            except Exception:
                log.exception("importance drift check failed")

    # -- resources and the variant ladder
    def variants(self) -> list[ServingModel]:
        """Cheaper models of the serving bundle, most expensive first, carrying the serving generation's
        trained weights for the modules and head they share with it (loaded once per generation).
        """
        s = self.serving
        key = f"{s.digest}/{s.generation}"
        if key not in self._variants:
            trained = s.trained
            found = []
            for v in s.manifest.variants:
                path = s.bundle_dir / v["file"]
                if not path.is_file():
                    continue
                prefixes = ["net.head."] + [f"net.layers.{la}.mods.m{i}." for la, idx in enumerate(v["selection"])
                                            for i in idx]
                shared = {n: a for n, a in trained.items() if n.startswith(tuple(prefixes))}
                found.append(replace(s, model_path=path, weights=shared, changed=frozenset()))
            self._variants = {key: found}
        return self._variants[key]

    def variant_name(self) -> str:
        variants = self.serving.manifest.variants
        if self.level == 0 or self.level > len(variants):
            return "main"
        return str(variants[self.level - 1]["name"])

    def set_level(self, level: int, reason: str) -> None:
        """Serve rung ``level`` of the ladder (0: the main model); predictions never stop."""
        variants = self.variants()
        level = max(0, min(level, len(variants)))
        target = self.serving if level == 0 else variants[level - 1]
        self.active = target  # one reference swap, before the level it is reported under
        self.level = level
        self.metrics.variant_level.set(level)
        self.last_switch = {"level": level, "variant": self.variant_name(), "reason": reason, "at": time.time()}
        self._notify("variant", dict(self.last_switch))

    def _latency_p95(self) -> float:
        values = list(self.latencies)
        return float(np.percentile(values, 95)) if len(values) >= 5 else float("nan")

    def start_monitors(self) -> None:
        """Start the drift and resource threads (and the training schedule, if one is set)."""
        if self.cfg.drift:
            threading.Thread(target=self._drift_loop, name="eclm-drift", daemon=True).start()
        if self.cfg.resource_interval_s > 0:
            threading.Thread(target=self._resource_loop, name="eclm-resources", daemon=True).start()
        self.start_scheduler()

    def ladder(self) -> Ladder:
        cfg = self.cfg
        latency = cfg.max_latency_ms or float(self.serving.manifest.profile.get("latency_target_ms", 100.0))
        return Ladder(len(self.variants()) + 1, Thresholds(
            min_free_memory_mb=cfg.min_free_memory_mb, recover_free_memory_mb=2 * cfg.min_free_memory_mb,
            max_cpu_busy=cfg.max_cpu_busy, recover_cpu_busy=min(cfg.max_cpu_busy, 0.6),
            max_latency_ms=latency, recover_latency_ms=latency / 2, patience=cfg.resource_patience))

    def _resource_loop(self) -> None:
        reader = ProcReader(self._latency_p95)
        ladder = self.ladder()
        digest = self.serving.digest
        while not self._stop.wait(self.cfg.resource_interval_s):
            try:
                if self.serving.digest != digest:  # a new bundle: a new ladder, back to its main model
                    digest, ladder = self.serving.digest, self.ladder()
                    self.set_level(0, "new bundle")
                self.last_readings = reader()
                decision = ladder.decide(self.last_readings)
                if decision is not None:
                    self.set_level(*decision)
            except Exception:
                log.exception("resource check failed")

    # -- schedule
    def start_scheduler(self) -> None:
        if self.cfg.train_interval_s <= 0 or self._scheduler is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.cfg.train_interval_s):
                if self.serving.trainable and self.level == 0 and self._new_samples() > 0:
                    self.start_training("schedule")

        self._scheduler = threading.Thread(target=loop, name="eclm-schedule", daemon=True)
        self._scheduler.start()

    # -- status
    def _refresh_gauges(self) -> None:
        if getattr(self, "level", 0) > 0 and getattr(self, "_ladder_bundle", None) != self.serving.digest:
            self.level = 0  # another bundle serves: its own ladder starts at its main model
        self._ladder_bundle = self.serving.digest
        if getattr(self, "level", 0) == 0:
            self.active = self.serving
        elif hasattr(self, "_variants") and self.variants():  # a new generation: its weights, same rung
            self.active = self.variants()[min(self.level, len(self.variants())) - 1]
        if hasattr(self, "drift") and self.drift.reference != self._reference():
            self.drift.rebase(self._reference())
        self.metrics.generation.set(self.serving.generation)
        if hasattr(self, "outbox"):
            self.metrics.outbox_entries.set(len(self.outbox))
        if hasattr(self, "store"):
            self.metrics.samples_held.set(self.store.count())

    def status(self) -> dict[str, Any]:
        s = self.serving
        return {
            "device_id": self.cfg.device_id,
            "bundle": {"digest": s.digest, "bank_id": s.manifest.bank_id, "profile": s.manifest.profile["name"],
                       "generation": s.generation, "trainable": s.trainable,
                       "training_reason": s.training_reason},
            "modules": [{"part_id": m["part_id"], "version": m["version"], "trainable": m["trainable"]}
                        for m in s.manifest.modules],
            "samples": {"held": self.store.count(), "holdout_every": self.store.holdout_every,
                        "new_since_training": self._new_samples()},
            "training": {"running": self.training_now, "last": self.last_training, "settings": vars(self.settings())},
            "outbox": {"entries": len(self.outbox), "bytes": self.outbox.bytes_pending()},
            "module_versions": s.module_versions,
            "last_update": self.last_update,
            "variant": {"level": self.level, "name": self.variant_name(), "last_switch": self.last_switch,
                        "readings": vars(self.last_readings) if hasattr(self, "last_readings") else None},
            "drift": self.drift.report(),
            "resources": _resources(),
            "uptime_s": time.time() - self.started,
        }

    def close(self) -> None:
        self._stop.set()
        self.wait_for_training(timeout=60)
        self.store.close()


def _with_values(serving: ServingModel, values: dict[str, np.ndarray]) -> ServingModel:
    """A candidate of ``serving`` with ``values`` in place of some parameters; the others stay shared."""
    return replace(serving, weights={**serving.weights, **values}, changed=serving.changed | frozenset(values))


def not_worse(current: ServingModel, candidate: ServingModel, holdout: Any) -> bool:
    """The candidate is at least as accurate on the holdout and, at equal accuracy, not more confidently
    wrong (mean log-loss): on a small holdout accuracy ties often, the loss still tells the two apart.
    """
    before, after = current.accuracy(holdout.x, holdout.y), candidate.accuracy(holdout.x, holdout.y)
    if after != before:
        return after > before
    return candidate.log_loss(holdout.x, holdout.y) <= current.log_loss(holdout.x, holdout.y) + 1e-6


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

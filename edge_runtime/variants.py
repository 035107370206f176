"""The variant ladder: which model answers (the main one or a cheaper variant), moved by the device's resources,
and whether automatic training waits for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from eclm.parts import HEAD, module_id, onnx_prefixes
from edge_runtime.config import EdgeConfig
from edge_runtime.events import EventSink
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.model import ServingModel
from edge_runtime.resources import (
    PAUSE_KINDS,
    Ladder,
    LatencyWindow,
    Pause,
    PauseRule,
    ProcReader,
    Readings,
    Thresholds,
    training_pause,
)

log = logging.getLogger("eclm.edge")


class VariantLadder:
    """Rungs of the serving bundle's ladder (0: the main model), its latency window and resource readings.

    ``current`` gives the serving model (the main model of the ladder); ``now`` is what answers and its
    name, swapped as one reference.
    """

    def __init__(self, cfg: EdgeConfig, current: Callable[[], ServingModel], metrics: EdgeMetrics,
                 events: EventSink) -> None:
        self.cfg, self._current, self.metrics, self.events = cfg, current, metrics, events
        self.latency = LatencyWindow()
        self.last_readings: Readings | None = None
        self.paused: Pause | None = None
        self._variants: dict[str, list[ServingModel]] = {}
        self.level = 0
        self.last_switch: dict[str, Any] | None = None
        self._ladder_bundle = current().digest
        self.now: tuple[ServingModel, str] = (current(), "main")

    def variants(self) -> list[ServingModel]:
        """Cheaper models of the serving bundle, most expensive first, carrying the serving generation's
        trained weights for the modules and head they share with it (loaded once per generation).
        """
        s = self._current()
        key = f"{s.digest}/{s.generation}"
        if key not in self._variants:
            trained = s.trained
            found = []
            for v in s.manifest.variants:
                path = s.bundle_dir / v["file"]
                if not path.is_file():
                    continue
                prefixes = onnx_prefixes(HEAD) + [p for la, idx in enumerate(v["selection"]) for i in idx
                                                  for p in onnx_prefixes(module_id(la, i))]
                shared = {n: a for n, a in trained.items() if n.startswith(tuple(prefixes))}
                found.append(replace(s, model_path=path, weights=shared, changed=frozenset()))
            self._variants = {key: found}
        return self._variants[key]

    def variant_name(self, level: int | None = None) -> str:
        """The name of rung ``level`` (default: the rung serving now)."""
        level = self.level if level is None else level
        variants = self._current().manifest.variants
        if level == 0 or level > len(variants):
            return "main"
        return str(variants[level - 1]["name"])

    def set_level(self, level: int, reason: str) -> None:
        """Serve rung ``level`` of the ladder (0: the main model); predictions never stop."""
        variants = self.variants()
        level = max(0, min(level, len(variants)))
        target = self._current() if level == 0 else variants[level - 1]
        self.now = (target, self.variant_name(level))  # model and name in one swap: answers name their model
        self.level = level
        self.metrics.variant_level.set(level)
        self.last_switch = {"level": level, "variant": self.variant_name(), "reason": reason, "at": time.time()}
        self.events.notify("variant", dict(self.last_switch))

    def refresh(self) -> None:
        """After the serving model changed: another bundle starts at its main model, a new generation of the
        same bundle answers on the same rung with its own weights.
        """
        s = self._current()
        if self.level > 0 and self._ladder_bundle != s.digest:
            self.level = 0
        self._ladder_bundle = s.digest
        if self.level == 0:
            self.now = (s, "main")
        elif self.variants():
            rung = min(self.level, len(self.variants()))
            self.now = (self.variants()[rung - 1], self.variant_name(rung))

    def latency_budget_ms(self) -> float:
        """The per-sample latency the runtime holds itself to: ``max_latency_ms`` or the profile's target."""
        return self.cfg.max_latency_ms or float(self._current().manifest.profile.get("latency_target_ms", 100.0))

    def training_pause(self) -> Pause | None:
        """Whether automatic training waits now (the ``train_pause`` policy); updates status and metric."""
        s = self._current()
        rule = PauseRule(policy=self.cfg.train_pause, max_latency_ms=self.latency_budget_ms(),
                         min_free_memory_mb=self.cfg.min_free_memory_mb,
                         training_mb=float(s.manifest.training.get("estimated_bytes") or 0) / 2**20)
        pause = training_pause(rule, self.last_readings, self.level, self.variant_name())
        if pause != self.paused:
            log.info("automatic training %s", f"paused: {pause.reason}" if pause else "resumed")
        self.paused = pause
        for kind in PAUSE_KINDS:
            self.metrics.training_paused.labels(kind).set(1 if pause is not None and pause.kind == kind else 0)
        return pause

    def ladder(self) -> Ladder:
        cfg = self.cfg
        latency = self.latency_budget_ms()
        return Ladder(len(self.variants()) + 1, Thresholds(
            min_free_memory_mb=cfg.min_free_memory_mb, recover_free_memory_mb=2 * cfg.min_free_memory_mb,
            max_cpu_busy=cfg.max_cpu_busy, recover_cpu_busy=min(cfg.max_cpu_busy, 0.6),
            max_latency_ms=latency, recover_latency_ms=latency / 2, patience=cfg.resource_patience))

    def resource_loop(self, stop: threading.Event) -> None:
        """Read the host every ``resource_interval_s`` and move along the ladder until ``stop``."""
        reader = ProcReader(self.latency.p95)
        ladder = self.ladder()
        digest = self._current().digest
        while not stop.wait(self.cfg.resource_interval_s):
            try:
                if self._current().digest != digest:  # a new bundle: a new ladder, back to its main model
                    digest, ladder = self._current().digest, self.ladder()
                    self.set_level(0, "new bundle")
                self.last_readings = reader()
                decision = ladder.decide(self.last_readings)
                if decision is not None:
                    self.set_level(*decision)
                self.training_pause()
            except Exception:
                log.exception("resource check failed")

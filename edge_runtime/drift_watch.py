"""The drift watcher: labelled samples' accuracy and unlabelled inputs' routing, judged against the bundle's
reference; on importance drift the device wants a new bundle.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eclm.ort import load_onnxruntime
from edge_runtime.drift import DriftMonitor
from edge_runtime.events import EventSink
from edge_runtime.model import ServingModel
from edge_runtime.store import SampleStore

log = logging.getLogger("eclm.edge")
ROUTING_EVERY_S = 0.2  # at most one request's inputs per this many seconds go to the routing check


class DriftWatcher:
    """Watches the model ``current`` gives; the routing of unlabelled inputs is judged off the request path."""

    def __init__(self, current: Callable[[], ServingModel], events: EventSink) -> None:
        self._current, self.events = current, events
        self.monitor = DriftMonitor(self.reference())
        self.want_bundle = False
        self._inbox: queue.Queue[np.ndarray] = queue.Queue(maxsize=4)
        self._last_offer = 0.0
        self._selector: Any = None
        self._selector_path: Path | None = None

    def reference(self) -> list[list[float]]:
        """The importance the serving bundle was derived for."""
        return [[float(v) for v in row] for row in self._current().manifest.importance]

    def rebase(self) -> None:
        """A bundle with another reference serves: judge against it from now on."""
        reference = self.reference()
        if self.monitor.reference != reference:
            self.monitor.rebase(reference)

    def offer(self, x: np.ndarray, t: float) -> None:
        """Inputs of a prediction made at ``t`` (perf_counter) for the routing check; dropped when it is busy."""
        if t - self._last_offer > ROUTING_EVERY_S:
            self._last_offer = t
            with contextlib.suppress(queue.Full):
                self._inbox.put_nowait(x)

    def observe_labels(self, serving: ServingModel, x: np.ndarray, y: np.ndarray) -> bool:
        """Whether ``serving``'s errors on these labelled inputs raise the accuracy alarm."""
        correct = serving.logits(x).argmax(axis=1) == y
        return self.monitor.observe_labels(correct)

    def routing(self, x: np.ndarray) -> list[np.ndarray] | None:
        """The selector's routing weights of ``x`` over every bank module, per layer."""
        serving = self._current()
        path = serving.bundle_dir / serving.manifest.selector.get("file", "selector.onnx")
        if not path.is_file():
            return None
        if self._selector_path != path:
            ort = load_onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self._selector = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._selector_path = path
        return [np.asarray(g) for g in self._selector.run(None, {self._selector.get_inputs()[0].name: x})]

    def importance(self, store: SampleStore, max_samples: int = 512) -> list[list[float]] | None:
        """Mean routing weight of every bank module over the newest stored samples (via selector.onnx)."""
        if store.count() == 0:
            return None
        gates = self.routing(store.recent(max_samples).x)
        return None if gates is None else [[float(v) for v in g.mean(axis=0)] for g in gates]

    def loop(self, stop: threading.Event) -> None:
        """Judge the routing of offered inputs until ``stop``; an alarm asks for a bundle and is told."""
        while not stop.is_set():
            try:
                x = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                gates = self.routing(x)
                if gates is not None and self.monitor.observe_routing(gates):
                    self.want_bundle = True
                    self.events.notify("drift", {"kind": "importance", **self.monitor.report()})
            except Exception:
                log.exception("importance drift check failed")

"""Drift detection on the device: Page-Hinkley tests on the error stream and on importance distance."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PageHinkley:
    """Page-Hinkley test for an increase in a stream's mean (Page 1954; Hinkley 1971).

    ``m_t = sum_i (x_i - mu - delta)``; an alarm when ``m_t - min(m) > threshold``. ``mu`` is the mean
    of the first ``min_samples`` values (the reference), then held: a running mean would catch up
    with a lasting shift and hide it. ``delta`` is the change tolerated as noise.
    """

    delta: float = 0.01
    threshold: float = 1.0
    min_samples: int = 20
    n: int = 0
    mean: float = 0.0
    cumulative: float = 0.0
    minimum: float = 0.0

    def update(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        self.n += 1
        if self.n <= self.min_samples:  # learning the reference level
            self.mean += (x - self.mean) / self.n
            return False
        self.cumulative += x - self.mean - self.delta
        self.minimum = min(self.minimum, self.cumulative)
        return self.cumulative - self.minimum > self.threshold

    @property
    def statistic(self) -> float:
        return self.cumulative - self.minimum

    def reset(self) -> None:
        self.n, self.mean, self.cumulative, self.minimum = 0, 0.0, 0.0, 0.0


def importance_distance(gates: list[np.ndarray], reference: list[list[float]]) -> float:
    """Mean over layers of the total-variation distance between routing and the reference importance."""
    out = []
    for g, ref in zip(gates, reference, strict=True):
        p = np.asarray(g, dtype=np.float64).mean(axis=0)
        q = np.asarray(ref, dtype=np.float64)
        p = p / p.sum() if p.sum() > 0 else p
        q = q / q.sum() if q.sum() > 0 else q
        out.append(0.5 * float(np.abs(p - q).sum()))
    return float(np.mean(out)) if out else 0.0


@dataclass
class DriftMonitor:
    """Watches unlabelled inputs (importance) and labelled ones (errors); says when to act.

    - accuracy drift: Page-Hinkley on the 0/1 error stream of labelled samples, judged by the
      serving model before they are stored -> fine-tune locally (when enough samples are held);
    - importance drift: Page-Hinkley on the distance between the routing of recent inputs and the
      importance the bundle was derived for -> ask the cloud for a re-derived sub-model.
    """

    reference: list[list[float]]
    # Errors: tolerate 10 points of error rate above the reference; a jump from 5% to 50% errors alarms
    # within about 20 samples, a steady stream practically never.
    accuracy_test: PageHinkley = field(default_factory=lambda: PageHinkley(delta=0.10, threshold=6.0,
                                                                             min_samples=30))
    # Routing: the distance moves by a few hundredths between class mixes of this model's selector.
    importance_test: PageHinkley = field(default_factory=lambda: PageHinkley(delta=0.01, threshold=0.3,
                                                                               min_samples=10))
    window: int = 200
    errors: deque[int] = field(default_factory=lambda: deque(maxlen=200))
    distances: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    accuracy_alarms: int = 0
    importance_alarms: int = 0

    def observe_labels(self, correct: np.ndarray) -> bool:
        """Feed correctness of labelled samples; True when the error rate has risen."""
        alarm = False
        for c in np.asarray(correct, dtype=bool):
            self.errors.append(0 if c else 1)
            alarm = self.accuracy_test.update(0.0 if c else 1.0) or alarm
        if alarm:
            self.accuracy_alarms += 1
            self.accuracy_test.reset()
        return alarm

    def observe_routing(self, gates: list[np.ndarray]) -> bool:
        """Feed the selector's routing of a batch of inputs; True when it has moved from the reference."""
        d = importance_distance(gates, self.reference)
        self.distances.append(d)
        alarm = self.importance_test.update(d)
        if alarm:
            self.importance_alarms += 1
            self.importance_test.reset()
        return alarm

    def rebase(self, reference: list[list[float]]) -> None:
        """A new bundle serves: measure drift against what it was derived for."""
        self.reference = reference
        self.importance_test.reset()
        self.accuracy_test.reset()
        self.distances.clear()

    def report(self) -> dict[str, float | int | None]:
        return {
            "rolling_accuracy": 1.0 - float(np.mean(self.errors)) if self.errors else None,
            "importance_distance": float(np.mean(list(self.distances)[-20:])) if self.distances else None,
            "accuracy_statistic": self.accuracy_test.statistic,
            "importance_statistic": self.importance_test.statistic,
            "accuracy_alarms": self.accuracy_alarms,
            "importance_alarms": self.importance_alarms,
        }

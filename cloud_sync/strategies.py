"""Merge strategies: pure functions from module deltas to one merged delta (no I/O, no broker).

Each takes the contributions to one module (tensors keyed by parameter name, plus a weight) and
returns the merged delta and a few metrics. METHOD.md section 4: the method's strategy is the
importance-weighted mean (we weight by importance x sample count, normalised); trimmed mean and
coordinate-wise median are robust alternatives against outlying or poisoned devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Contribution:
    """One device's delta for one module."""

    delta_id: str
    tensors: dict[str, np.ndarray]
    weight: float


@dataclass(frozen=True)
class Merged:
    """The merged delta of one module and what went into it."""

    tensors: dict[str, np.ndarray]
    contributors: int
    total_weight: float
    delta_norm: float


def _stack(contribs: Sequence[Contribution], name: str) -> np.ndarray:
    return np.stack([c.tensors[name].astype(np.float64) for c in contribs])


def _names(contribs: Sequence[Contribution]) -> list[str]:
    names = sorted(contribs[0].tensors)
    for c in contribs[1:]:
        if sorted(c.tensors) != names:
            raise ValueError(f"delta {c.delta_id} has parameters {sorted(c.tensors)}, expected {names}")
    return names


def _finish(out: dict[str, np.ndarray], contribs: Sequence[Contribution]) -> Merged:
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values())))
    return Merged({k: v.astype(np.float32) for k, v in out.items()}, len(contribs),
                  float(sum(c.weight for c in contribs)), norm)


def weighted_mean(contribs: Sequence[Contribution]) -> Merged:
    """The weighted average of the deltas, weights normalised to 1 (equal weights if all are 0)."""
    if not contribs:
        raise ValueError("nothing to merge")
    w = np.array([max(0.0, c.weight) for c in contribs], dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(contribs), 1.0 / len(contribs))
    out = {}
    for name in _names(contribs):
        s = _stack(contribs, name)
        out[name] = np.tensordot(w, s, axes=1)
    return _finish(out, contribs)


def trimmed_mean(contribs: Sequence[Contribution], trim: float = 0.2) -> Merged:
    """Coordinate-wise mean after dropping the ``trim`` share of lowest and of highest values."""
    if not contribs:
        raise ValueError("nothing to merge")
    k = int(np.floor(trim * len(contribs)))
    out = {}
    for name in _names(contribs):
        s = np.sort(_stack(contribs, name), axis=0)
        out[name] = s[k : len(contribs) - k].mean(axis=0) if len(contribs) - 2 * k > 0 else np.median(s, axis=0)
    return _finish(out, contribs)


def coordinate_median(contribs: Sequence[Contribution]) -> Merged:
    """Coordinate-wise median of the deltas."""
    if not contribs:
        raise ValueError("nothing to merge")
    return _finish({name: np.median(_stack(contribs, name), axis=0) for name in _names(contribs)}, contribs)


STRATEGIES: dict[str, Callable[[Sequence[Contribution]], Merged]] = {
    "weighted": weighted_mean,
    "trimmed": trimmed_mean,
    "median": coordinate_median,
}

"""Merge strategies: pure functions from module deltas to one merged delta (no I/O, no broker).

Each takes the contributions to one module (tensors keyed by parameter name, plus a weight) and
returns the merged delta and a few metrics. METHOD.md section 4: the method's strategy is the
importance-weighted mean (we weight by importance x sample count, normalised); trimmed mean and
coordinate-wise median are robust alternatives against outlying or poisoned devices. ``robust`` (the
daemon's default) is the weighted mean after two cheap guards (docs/sync.md, "Merging defaults"): each
delta's norm is clipped to the median norm of the other devices' deltas, and a delta pointing against
the others (cosine below ``-DISAGREE_COSINE`` with their weighted mean) is dropped. ``weighted`` is the
plain FedAvg-style weighted mean. :func:`cap_shares` bounds any device's share of a module's weight.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Contribution:
    """One device's delta for one module."""

    delta_id: str
    tensors: dict[str, np.ndarray]
    weight: float
    device: str = ""  # the topic-bound device id; empty: the delta counts as its own device


@dataclass(frozen=True)
class Merged:
    """The merged delta of one module and what went into it."""

    tensors: dict[str, np.ndarray]
    contributors: int
    total_weight: float
    delta_norm: float
    dropped: tuple[str, ...] = ()  # delta ids left out because they point against the others
    clipped: tuple[str, ...] = ()  # delta ids whose norm was clipped


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


# A delta whose cosine with the others' mean is below minus this is dropped. Real honest deltas of five
# devices with different class mixes and corruptions (bench/sync_bench.py's devices, pi4 bundles) had
# pairwise cosines from -0.24 to 0.56 per module (docs/sync.md); a sign flip of a delta like the others'
# sits near -1.
DISAGREE_COSINE = 0.5
ZERO_NORM = 1e-12


def _flat(c: Contribution, names: list[str]) -> np.ndarray:
    return np.concatenate([c.tensors[n].astype(np.float64).ravel() for n in names])


def _device(c: Contribution) -> str:
    return c.device or f"delta:{c.delta_id}"


def robust_mean(contribs: Sequence[Contribution]) -> Merged:
    """The weighted mean after norm clipping and dropping deltas that point against the others.

    With deltas of at least two devices: (1) each delta is scaled down to the median L2 norm of the
    *other* devices' deltas when it is longer (so with two devices neither can outweigh the other by
    size); (2) repeatedly, the delta with the lowest cosine against the weighted mean of the other
    devices' remaining deltas is dropped while that cosine is below ``-DISAGREE_COSINE`` (two devices
    that point against each other are both dropped: nobody can tell which one is honest). One device
    alone gets the plain weighted mean.
    """
    if not contribs:
        raise ValueError("nothing to merge")
    names = _names(contribs)
    devices = {_device(c) for c in contribs}
    if len(devices) < 2:
        return weighted_mean(contribs)
    vecs = {c.delta_id: _flat(c, names) for c in contribs}
    norms = {k: float(np.linalg.norm(v)) for k, v in vecs.items()}
    scaled: list[Contribution] = []
    clipped: list[str] = []
    for c in contribs:
        # A delta of (near) zero length says nothing about scale: it never clips the others.
        lengths = [norms[o.delta_id] for o in contribs if _device(o) != _device(c) and norms[o.delta_id] > ZERO_NORM]
        bound = float(np.median(lengths)) if lengths else math.inf
        if norms[c.delta_id] > bound * (1 + 1e-9):
            f = bound / norms[c.delta_id]
            vecs[c.delta_id] = vecs[c.delta_id] * f
            c = Contribution(c.delta_id, {n: (t.astype(np.float64) * f) for n, t in c.tensors.items()}, c.weight,
                             c.device)
            clipped.append(c.delta_id)
        scaled.append(c)
    kept = list(scaled)
    dropped: list[str] = []
    while len({_device(c) for c in kept}) >= 2:
        # The others' weighted mean for every delta at once: all devices' sum minus its own device's.
        sums: dict[str, np.ndarray] = {}
        weights: dict[str, float] = defaultdict(float)
        for c in kept:
            w = max(c.weight, 0.0) + 1e-12
            sums[_device(c)] = sums.get(_device(c), 0.0) + w * vecs[c.delta_id]
            weights[_device(c)] += w
        total, total_w = sum(sums.values()), sum(weights.values())
        worst, worst_cos = None, 0.0
        for c in kept:
            mean = (total - sums[_device(c)]) / (total_w - weights[_device(c)])
            denom = float(np.linalg.norm(vecs[c.delta_id]) * np.linalg.norm(mean))
            cos = float(vecs[c.delta_id] @ mean) / denom if denom > 0 else 0.0
            if worst is None or cos < worst_cos:
                worst, worst_cos = c, cos
        if worst is None or worst_cos >= -DISAGREE_COSINE:
            break
        if len({_device(c) for c in kept}) == 2:  # two sides, no majority: neither is merged
            dropped += [c.delta_id for c in kept]
            kept = []
            break
        kept = [c for c in kept if _device(c) != _device(worst)]
        dropped += [c.delta_id for c in scaled if _device(c) == _device(worst)]
    if not kept:
        zero = {n: np.zeros_like(contribs[0].tensors[n], dtype=np.float64) for n in names}
        out = _finish(zero, contribs)
    else:
        out = weighted_mean(kept)
    return Merged(out.tensors, len(kept), out.total_weight, out.delta_norm, tuple(sorted(set(dropped))),
                  tuple(clipped))


def cap_shares(weights: dict[str, float], max_share: float) -> dict[str, float]:
    """Device weights with none above ``max_share`` of the total (the largest are lowered, never raised).

    ``weights`` maps a device to its total weight for one module in one round. With fewer than
    ``1 / max_share`` devices the cap cannot hold: every device then gets the same weight.
    """
    if max_share >= 1.0 or len(weights) <= 1:
        return dict(weights)
    order = sorted(weights, key=lambda d: weights[d], reverse=True)
    w = [max(0.0, weights[d]) for d in order]
    n = len(w)
    if w[0] <= max_share * sum(w):
        return dict(weights)
    for k in range(1, n):  # the k largest are lowered to a common cap c
        if 1 - k * max_share <= 0:
            break
        c = max_share * sum(w[k:]) / (1 - k * max_share)
        if w[k] <= c <= w[k - 1]:
            return {d: min(weights[d], c) for d in order}
    floor = min(w)
    return {d: floor for d in order}


STRATEGIES: dict[str, Callable[[Sequence[Contribution]], Merged]] = {
    "robust": robust_mean,
    "weighted": weighted_mean,
    "trimmed": trimmed_mean,
    "median": coordinate_median,
}

"""``signals``: a reproducible synthetic 1-D data set of 10 classes, generated from a fixed seed (no download).

Each sample is a 64-step window of a waveform in sensor units: the class fixes the waveform family
(sine, square, sawtooth, triangle, rising chirp) and the frequency band (low: 2-3 cycles per window,
high: 5-6.5); the phase, the exact frequency, the amplitude (0.8-1.2) and a small offset vary per
sample, and Gaussian noise (standard deviation 0.25) is added. Shape (N, 1, 1, 64), the layout of
a 1-D data set in this project (docs/data.md). Same numbers on every machine: NumPy's PCG64 with
seed 0 and elementwise arithmetic only.
"""

from __future__ import annotations

import numpy as np

NAME = "signals"
LENGTH = 64
PER_CLASS = 180
FAMILIES = ("sine", "square", "sawtooth", "triangle", "chirp")
BANDS = {"low": (2.0, 3.0), "high": (5.0, 6.5)}
NOISE_STD = 0.25
SEED = 0


def labels() -> tuple[str, ...]:
    """Class names in index order: ``<family>-<band>``, low band first."""
    return tuple(f"{fam}-{band}" for band in BANDS for fam in FAMILIES)


def _wave(family: str, cycles: np.ndarray, phase: np.ndarray, t: np.ndarray) -> np.ndarray:
    """One row per sample: ``family`` at ``cycles`` per window from ``phase`` (in cycles), unit amplitude."""
    if family == "chirp":  # the frequency rises linearly from 0.5x to 1.5x over the window
        u = phase[:, None] + cycles[:, None] * (0.5 * t + 0.5 * t**2)
    else:
        u = phase[:, None] + cycles[:, None] * t
    frac = u - np.floor(u)
    if family in ("sine", "chirp"):
        return np.sin(2 * np.pi * u)
    if family == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if family == "sawtooth":
        return 2.0 * frac - 1.0
    return 1.0 - 4.0 * np.abs(frac - 0.5)  # triangle


def generate(per_class: int = PER_CLASS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """X (N, 1, 1, 64) float32, y (N,) int64 in class order, and the class names."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH, dtype=np.float64) / LENGTH
    xs, ys = [], []
    for k, (band, family) in enumerate((b, f) for b in BANDS for f in FAMILIES):
        lo, hi = BANDS[band]
        cycles = rng.uniform(lo, hi, per_class)
        phase = rng.uniform(0.0, 1.0, per_class)
        amp = rng.uniform(0.8, 1.2, per_class)
        offset = rng.normal(0.0, 0.1, per_class)
        wave = amp[:, None] * _wave(family, cycles, phase, t) + offset[:, None]
        xs.append(wave + rng.normal(0.0, NOISE_STD, wave.shape))
        ys.append(np.full(per_class, k, dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32).reshape(-1, 1, 1, LENGTH)
    return x, np.concatenate(ys), labels()

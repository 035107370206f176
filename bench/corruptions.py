"""Per-device environment shifts that fit the data's shape (seeded, raw units).

Images (``(N, C, H, W)`` with H and W above 1): rotation, noise, contrast, blur. 1-D signals and
tabular rows (``(N, C, 1, F)`` or ``(N, C, F, 1)``, the layout ``(N, F)`` data gets): a circular
time shift, amplitude scaling, additive noise, feature dropout and a time warp. An image
operation on 1-D data is refused: rotating a ``1 x F`` row about its centre turns every sample
into a near-constant vector, which measures nothing. Each data set's set is declared from its
input shape by :func:`kinds_for` (docs/data.md lists both).
"""

from __future__ import annotations

import numpy as np

from eclm.errors import ConfigError

IMAGE_KINDS = ("none", "rotation", "noise", "contrast", "blur")
SIGNAL_KINDS = ("none", "time-shift", "scale", "noise", "dropout", "time-warp")
KINDS = IMAGE_KINDS  # the image set, kept under its old name for callers on digits
# The adapt suite's two corruption shifts per family: a geometric one and noise.
ADAPT_SHIFTS = {"image": ("rotation", "noise"), "signal": ("time-shift", "noise")}


def family(input_shape: tuple[int, ...]) -> str:
    """``signal`` for a 1-D layout (one of H, W is 1), else ``image``; ``input_shape`` is (C, H, W)."""
    _, h, w = input_shape[-3:]
    return "signal" if h == 1 or w == 1 else "image"


def kinds_for(input_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The corruptions declared for data of ``input_shape`` (C, H, W)."""
    return SIGNAL_KINDS if family(input_shape) == "signal" else IMAGE_KINDS


def corrupt(x: np.ndarray, kind: str, severity: float = 1.0, seed: int = 0,
            value_range: tuple[float, float] = (0.0, 16.0)) -> np.ndarray:
    """A corrupted copy of ``x`` (N, C, H, W); ``severity`` 1.0 is a clearly visible shift.

    ``kind`` must be one of ``kinds_for(x.shape[1:])``; anything else is a ConfigError.
    """
    allowed = kinds_for(x.shape[1:])
    if kind not in allowed:
        raise ConfigError(f"corruption {kind!r} does not apply to data of shape {tuple(x.shape[1:])} "
                          f"({family(x.shape[1:])}s); known for it: {', '.join(allowed)}",
                          hint="pick the corruptions from bench.corruptions.kinds_for(input_shape)")
    out = x.astype(np.float32).copy()
    if kind == "none":
        return out
    if family(x.shape[1:]) == "signal":
        return _signal(out, kind, severity, np.random.default_rng(seed), value_range)
    return _image(out, kind, severity, np.random.default_rng(seed), value_range)


def _image(out: np.ndarray, kind: str, severity: float, rng: np.random.Generator,
           value_range: tuple[float, float]) -> np.ndarray:
    from scipy import ndimage

    lo, hi = value_range
    if kind == "rotation":
        out = ndimage.rotate(out, 25.0 * severity, axes=(2, 3), reshape=False, order=1, mode="constant", cval=lo)
    elif kind == "noise":
        out = out + rng.normal(0.0, 0.15 * (hi - lo) * severity, size=out.shape).astype(np.float32)
    elif kind == "contrast":
        mid = (hi + lo) / 2
        out = mid + (out - mid) * max(0.05, 1.0 - 0.6 * severity)
    elif kind == "blur":
        out = ndimage.gaussian_filter(out, sigma=(0, 0, 0.8 * severity, 0.8 * severity))
    return np.clip(out, lo, hi).astype(np.float32)


def _signal(out: np.ndarray, kind: str, severity: float, rng: np.random.Generator,
            value_range: tuple[float, float]) -> np.ndarray:
    """The 1-D corruptions along the sample's long axis (the last one for ``(N, C, 1, F)``)."""
    lo, hi = value_range
    axis = 3 if out.shape[2] == 1 else 2
    length = out.shape[axis]
    if kind == "time-shift":  # the sensor's window starts a quarter of a window late
        out = np.roll(out, int(round(0.25 * length * severity)), axis=axis)
    elif kind == "scale":  # a sensor with 1.5x the gain (about the range's middle), saturating at the range
        mid = (hi + lo) / 2
        out = mid + (out - mid) * (1.0 + 0.5 * severity)
    elif kind == "noise":
        out = out + rng.normal(0.0, 0.15 * (hi - lo) * severity, size=out.shape).astype(np.float32)
    elif kind == "dropout":  # a fifth of the readings of each sample lost (the range's middle instead)
        drop = rng.random(out.shape) < min(0.9, 0.2 * severity)
        out = np.where(drop, np.float32((hi + lo) / 2), out)
    elif kind == "time-warp":  # a smooth, monotone warp per sample: the signal runs faster, then slower
        t = np.arange(length, dtype=np.float64)
        amp = rng.uniform(0.5, 1.0, size=out.shape[0]) * 0.25 * length * severity / np.pi
        warped = t[None, :] + amp[:, None] * np.sin(2 * np.pi * t[None, :] / length)
        moved = np.moveaxis(out, axis, -1)
        flat = moved.reshape(out.shape[0], -1, length)
        res = np.stack([np.stack([np.interp(warped[i], t, row) for row in flat[i]]) for i in range(len(flat))])
        out = np.moveaxis(res.reshape(moved.shape), -1, axis)
    return np.clip(out, lo, hi).astype(np.float32)

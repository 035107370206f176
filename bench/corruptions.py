"""Per-device environment shifts on image samples: rotation, noise, contrast, blur (seeded, raw units)."""

from __future__ import annotations

import numpy as np

KINDS = ("none", "rotation", "noise", "contrast", "blur")


def corrupt(x: np.ndarray, kind: str, severity: float = 1.0, seed: int = 0,
            value_range: tuple[float, float] = (0.0, 16.0)) -> np.ndarray:
    """A corrupted copy of ``x`` (N, C, H, W); ``severity`` 1.0 is a clearly visible shift."""
    from scipy import ndimage

    lo, hi = value_range
    rng = np.random.default_rng(seed)
    out = x.astype(np.float32).copy()
    if kind == "none":
        return out
    if kind == "rotation":
        angle = 25.0 * severity
        out = ndimage.rotate(out, angle, axes=(2, 3), reshape=False, order=1, mode="constant", cval=lo)
    elif kind == "noise":
        out = out + rng.normal(0.0, 0.15 * (hi - lo) * severity, size=out.shape).astype(np.float32)
    elif kind == "contrast":
        mid = (hi + lo) / 2
        out = mid + (out - mid) * max(0.05, 1.0 - 0.6 * severity)
    elif kind == "blur":
        out = ndimage.gaussian_filter(out, sigma=(0, 0, 0.8 * severity, 0.8 * severity))
    else:
        raise ValueError(f"unknown corruption {kind!r}; known: {KINDS}")
    return np.clip(out, lo, hi).astype(np.float32)

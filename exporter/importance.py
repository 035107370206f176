"""Module importance for a device: mean gate output per module over the device's data (METHOD.md §3)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from eclm.errors import DataError
from exporter.enhance import gate_matrix
from exporter.modular import ModularNet

IMPORTANCE_SCHEMA_VERSION = 1


def importance_from_samples(model: ModularNet, x_normalised: torch.Tensor) -> list[np.ndarray]:
    """Per layer, the mean routing weight of each module over the given (normalised) samples."""
    if len(x_normalised) == 0:
        raise DataError("no samples to compute importance from", hint="give at least one sample")
    return [g.mean(axis=0) for g in gate_matrix(model, x_normalised)]


def importance_from_classes(
    model: ModularNet, x_normalised: torch.Tensor, y: np.ndarray, classes: Sequence[int]
) -> list[np.ndarray]:
    """Importance over the proxy samples of ``classes`` (a device that declares its class list)."""
    known = set(int(c) for c in np.unique(y))
    unknown = sorted(set(classes) - known)
    if unknown or not classes:
        raise DataError(
            f"classes {unknown or list(classes)} are not in the bank's data (known: {sorted(known)})",
            hint="pass class indices the bank was trained on, e.g. --classes 1,4,7",
        )
    mask = np.isin(y, list(classes))
    return importance_from_samples(model, x_normalised[torch.from_numpy(mask)])


def read_importance_file(path: str | Path, layer_sizes: Sequence[int]) -> list[np.ndarray]:
    """An importance profile a device reported: JSON ``{"schema_version": 1, "layers": [[...], ...]}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read importance file {path}: {exc}", hint="pass a JSON file") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != IMPORTANCE_SCHEMA_VERSION:
        raise DataError(
            f"importance file {path} has schema_version {version!r}",
            hint=f"write schema_version {IMPORTANCE_SCHEMA_VERSION} with a 'layers' list",
        )
    layers = data.get("layers")
    if not isinstance(layers, list) or [len(row) if isinstance(row, list) else -1 for row in layers] != list(
        layer_sizes
    ):
        raise DataError(
            f"importance file {path}: layers must be lists of sizes {list(layer_sizes)}",
            hint="report one value per module of every layer, in module order",
        )
    out = []
    for row in layers:
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in row):
            raise DataError(f"importance file {path}: values must be finite and >= 0", hint="fix the values")
        out.append(np.asarray(row, dtype=np.float64))
    return out


def write_importance_file(path: str | Path, importance: Sequence[np.ndarray], samples: int) -> None:
    """Store an importance profile in the format :func:`read_importance_file` reads."""
    payload = {
        "schema_version": IMPORTANCE_SCHEMA_VERSION,
        "samples": int(samples),
        "layers": [[float(v) for v in row] for row in importance],
    }
    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

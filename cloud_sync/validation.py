"""Checks on every incoming delta before it is stored: schema, ids, shapes, values, norm, staleness."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eclm.wire import DeltaMessage


@dataclass(frozen=True)
class Limits:
    """What a delta may be."""

    max_staleness: int = 10  # versions a delta's base may lag behind the bank's current version
    max_relative_norm: float = 1.0  # ||delta|| <= this x (||parameter|| + 1) per parameter
    max_tensors: int = 10_000


@dataclass(frozen=True)
class Verdict:
    """Accepted (``reason`` empty) or rejected with a reason code and a message."""

    ok: bool
    reason: str = ""
    detail: str = ""


def check_delta(msg: DeltaMessage, bank_id: str, versions: dict[str, int],
                params: dict[str, dict[str, np.ndarray]], limits: Limits) -> Verdict:
    """Validate ``msg`` against the bank (current ``versions`` and parameter arrays by part)."""
    if msg.bank_id != bank_id:
        return Verdict(False, "unknown_bank", f"delta for bank {msg.bank_id}, this bank is {bank_id}")
    if not msg.parts or any(not names for names in msg.parts.values()) or len(msg.tensors) > limits.max_tensors:
        return Verdict(False, "empty_or_oversized", "a delta must name 1..max_tensors parameters")
    listed = {n for names in msg.parts.values() for n in names}
    if listed != set(msg.tensors):
        return Verdict(False, "inconsistent", "parts do not list exactly the tensors sent")
    for part_id, names in msg.parts.items():
        if part_id not in versions:
            return Verdict(False, "unknown_module", f"module {part_id!r} is not in the bank")
        base = msg.base_versions.get(part_id)
        if not isinstance(base, int) or base < 1 or base > versions[part_id]:
            return Verdict(False, "bad_base_version", f"{part_id}: base version {base!r}, bank has "
                           f"{versions[part_id]}")
        if versions[part_id] - base > limits.max_staleness:
            return Verdict(False, "stale", f"{part_id}: base version {base} is {versions[part_id] - base} behind "
                           f"(limit {limits.max_staleness})")
        current = params[part_id]
        for name in names:
            if name not in current:
                return Verdict(False, "unknown_parameter", f"{part_id} has no parameter {name!r}")
            d, p = msg.tensors[name], current[name]
            if d.shape != p.shape:
                return Verdict(False, "bad_shape", f"{name}: shape {d.shape}, expected {p.shape}")
            if d.dtype.kind != "f":
                return Verdict(False, "bad_dtype", f"{name}: dtype {d.dtype}, expected float")
            if not np.isfinite(d).all():
                return Verdict(False, "non_finite", f"{name} holds NaN or infinite values")
            bound = limits.max_relative_norm * (float(np.linalg.norm(p.astype(np.float64))) + 1.0)
            if float(np.linalg.norm(d.astype(np.float64))) > bound:
                return Verdict(False, "norm_bound", f"{name}: delta norm exceeds {bound:.3g}")
    if msg.sample_count < 1:
        return Verdict(False, "no_samples", "sample_count must be >= 1")
    return Verdict(True)

"""Checks on every incoming message at the daemon's edge: ids, numeric ranges, names, shapes, values, norm."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from eclm import topics
from eclm.wire import DeltaMessage, ProfileMessage

MAX_SAMPLES = 10**9  # a sample count above this is not a device's (and would overflow the merge weights)
MAX_IMPORTANCE = 1e6  # importance values are routing weights near [0, 1]; far above is forged


@dataclass(frozen=True)
class Limits:
    """What a delta may be."""

    max_staleness: int = 10  # versions a delta's base may lag behind the bank's current version
    max_relative_norm: float = 1.0  # ||delta|| <= this x (||parameter|| + 1) per parameter
    max_tensors: int = 10_000
    max_samples: int = MAX_SAMPLES


@dataclass(frozen=True)
class Verdict:
    """Accepted (``reason`` empty) or rejected with a reason code and a message."""

    ok: bool
    reason: str = ""
    detail: str = ""


def _count(value: Any, limits: Limits) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value <= limits.max_samples


def check_importance(importance: Any, layer_sizes: list[int]) -> str:
    """Empty when ``importance`` is one row of finite values in [0, MAX_IMPORTANCE] per layer of the bank."""
    if not isinstance(importance, list) or len(importance) != len(layer_sizes):
        return f"importance must have one row per module layer ({len(layer_sizes)})"
    for i, (row, n) in enumerate(zip(importance, layer_sizes, strict=True)):
        if not isinstance(row, list) or len(row) != n:
            return f"importance row {i} must have {n} values"
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or not 0 <= v <= MAX_IMPORTANCE:
                return f"importance row {i} holds {v!r}: values must be finite, in [0, {MAX_IMPORTANCE:g}]"
    return ""


def check_profile(msg: ProfileMessage, device: str, bank_id: str, versions: dict[str, int], layer_sizes: list[int],
                  profile_known: Any, limits: Limits) -> Verdict:
    """Validate a profile: this bank, a registered profile name, module names of the bank, sane figures.

    ``profile_known(name) -> bool`` asks the device-profile registry.
    """
    if msg.device_id != device:
        return Verdict(False, "device_mismatch", f"profile names device {msg.device_id!r} on {device}'s topic")
    if msg.bank_id != bank_id:
        return Verdict(False, "unknown_bank", f"profile for bank {msg.bank_id}, this bank is {bank_id}")
    if msg.profile_name and not profile_known(msg.profile_name):
        return Verdict(False, "unknown_profile", f"profile {msg.profile_name[:64]!r} is not in the registry")
    if not isinstance(msg.modules, dict) or len(msg.modules) > len(versions):
        return Verdict(False, "unknown_module", "modules must name parts of the bank")
    for pid, v in msg.modules.items():
        if pid not in versions:
            return Verdict(False, "unknown_module", f"module {pid[:64]!r} is not in the bank")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= versions[pid]:
            return Verdict(False, "bad_base_version", f"{pid}: version {v!r}, bank has {versions[pid]}")
    if not isinstance(msg.sample_count, int) or isinstance(msg.sample_count, bool) \
            or not 0 <= msg.sample_count <= limits.max_samples:
        return Verdict(False, "bad_number", f"sample_count must be in 0..{limits.max_samples}")
    for name, imp in (("importance", msg.importance), ("derived_for", msg.derived_for)):
        if imp is None and name == "derived_for":
            continue
        problem = check_importance(imp, layer_sizes)
        if problem:
            return Verdict(False, "bad_importance", f"{name}: {problem}")
    return Verdict(True)


def check_delta(msg: DeltaMessage, bank_id: str, versions: dict[str, int],
                params: dict[str, dict[str, np.ndarray]], limits: Limits, layer_sizes: list[int] | None = None
                ) -> Verdict:
    """Validate ``msg`` against the bank (current ``versions`` and parameter arrays by part)."""
    if not topics.is_device_id(msg.device_id):
        return Verdict(False, "bad_device_id", "device ids are 1..128 characters without / + # or NUL")
    if msg.bank_id != bank_id:
        return Verdict(False, "unknown_bank", f"delta for bank {msg.bank_id}, this bank is {bank_id}")
    if not _count(msg.sample_count, limits):
        return Verdict(False, "bad_number", f"sample_count must be an integer <= {limits.max_samples}")
    if not isinstance(msg.created, int | float) or not math.isfinite(msg.created):
        return Verdict(False, "bad_number", "created must be a finite time")
    if msg.importance is not None and layer_sizes is not None:
        problem = check_importance(msg.importance, layer_sizes)
        if problem:
            return Verdict(False, "bad_importance", problem)
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


@lru_cache(maxsize=64)
def _registered(name: str) -> bool:
    from device_profiles import available_profiles

    return name in available_profiles()


def profile_known(name: str) -> bool:
    """Whether ``name`` is a profile of the registry (only well-formed names reach the cache)."""
    return isinstance(name, str) and 0 < len(name) <= 64 and name.replace("-", "").replace("_", "").isalnum() \
        and _registered(name)

"""Merge weights: importance the cloud holds for a device x sample count / (1 + staleness), then capped shares.

Nothing a delta's header says about its own importance counts: the importance comes from what the cloud
holds for the device (the profile it registered, or the one its bundle was derived for), normalised per
layer, and no device holds more than ``1 / min_devices`` of a module's weight in a round
(:func:`cloud_sync.strategies.cap_shares`). docs/sync.md, "Merging defaults", says why.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cloud_sync.validation import MAX_SAMPLES
from eclm import wire
from eclm.errors import DataError
from eclm.parts import LINE_SEPARATOR, is_module_id, parse_module_id

WEIGHTINGS = ("importance", "samples", "equal")  # what a merge weight counts besides staleness


def held_importance(device: dict[str, Any] | None) -> list[list[float]] | None:
    """The importance the cloud holds for a device: what its bundle was derived for, else its profile's."""
    if not device:
        return None
    try:
        derived = json.loads(device["last_derived"]) if device.get("last_derived") else None
    except (TypeError, ValueError):
        derived = None
    found = derived if derived else device.get("importance")
    return found if isinstance(found, list) and found else None


def relative_importance(importance: list[list[float]] | None, part_id: str) -> float:
    """A module's share of its layer's importance times the layer's module count (1.0 when all are equal).

    Bounded by the layer's module count whatever the raw values are; 1.0 for fixed parts, for a device the
    cloud holds no importance for, and for a layer whose importance is all zero.
    """
    part_id = part_id.partition(LINE_SEPARATOR)[0]  # an environment line weighs as its part
    if not importance or not is_module_id(part_id):
        return 1.0
    layer, index = parse_module_id(part_id)
    if layer >= len(importance) or index >= len(importance[layer]):
        return 1.0
    row = [float(v) if isinstance(v, int | float) and math.isfinite(v) and v > 0 else 0.0
           for v in importance[layer]]
    total = sum(row)
    return row[index] / total * len(row) if total > 0 else 1.0


def module_weight(msg: wire.DeltaMessage, part_id: str, current_version: int | None = None,
                  importance: list[list[float]] | None = None, weighting: str = "importance") -> float:
    """Importance of the module for the sending device x its sample count (METHOD.md section 4),
    divided by 1 + staleness (versions its base lags behind), as asynchronous federated learning does.

    ``importance`` is what the cloud holds for the device (:func:`held_importance`), never the delta's
    header. ``weighting`` ``samples`` drops the importance, ``equal`` the sample count too (ablations).
    Raises :class:`DataError` for a weight that is not a finite positive number (a forged header).
    """
    rel = relative_importance(importance, part_id)
    staleness = max(0, (current_version or 0) - msg.base_versions.get(part_id, current_version or 0))
    if not isinstance(msg.sample_count, int) or not 0 <= msg.sample_count <= MAX_SAMPLES:
        raise DataError(f"sample count {str(msg.sample_count)[:20]} is out of range", hint=f"at most {MAX_SAMPLES}")
    samples = max(1, msg.sample_count) if weighting != "equal" else 1
    rel = rel if weighting == "importance" else 1.0
    weight = max(rel, 1e-6) * samples / (1 + staleness)
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"merge weight of {part_id} is {weight!r}", hint="importance values must be finite")
    return weight

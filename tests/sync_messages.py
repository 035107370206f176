"""Hand-built sync messages for a bank: honest deltas and profiles, and the forged ones a test sends."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np

from eclm import wire
from module_bank import open_store


def layer_sizes(bank: Path | str) -> list[int]:
    return [len(layer["widths"]) for layer in open_store(bank).info().config["layers"]]


def make_delta(bank: Path | str, device: str, part_ids: tuple[str, ...] = ("head",), *, seed: int = 0,
               scale: float = 1e-3, random_importance: bool = False, **overrides: Any) -> wire.DeltaMessage:
    """A valid delta against the bank's current versions: small seeded perturbations of every float parameter.

    ``random_importance`` draws the importance from the same seeded generator (else 0.5 everywhere).
    """
    b = open_store(bank)
    info = b.info()
    rng = np.random.default_rng(seed)
    names: dict[str, list[str]] = {}
    tensors: dict[str, np.ndarray] = {}
    for pid in part_ids:
        current = b.read_part(pid)
        names[pid] = sorted(n for n, a in current.items() if a.dtype.kind == "f")
        for n in names[pid]:
            tensors[n] = (scale * rng.normal(size=current[n].shape)).astype(np.float32)
    sizes = layer_sizes(bank)
    importance = ([[float(v) for v in rng.uniform(0.05, 1.0, n)] for n in sizes] if random_importance
                  else [[0.5] * n for n in sizes])
    fields: dict[str, Any] = dict(
        delta_id=uuid.uuid4().hex, device_id=device, bank_id=info.bank_id, bundle="b0",
        base_versions={pid: info.parts[pid].version for pid in part_ids}, parts=names, tensors=tensors,
        sample_count=32, importance=importance, metrics={"loss": 0.25})
    fields.update(overrides)
    return wire.DeltaMessage(**fields)


def make_profile(bank: Path | str, device: str, **overrides: Any) -> wire.ProfileMessage:
    """A valid profile of a trainable device for this bank."""
    info = open_store(bank).info()
    fields: dict[str, Any] = dict(device_id=device, bank_id=info.bank_id, bundle="b0",
                                  importance=[[1.0 / n] * n for n in layer_sizes(bank)], sample_count=40,
                                  profile_name="pi4", modules={"head": info.parts["head"].version})
    fields.update(overrides)
    return wire.ProfileMessage(**fields)


def make_profile_in(bank: Path | str, device: str, environment: str, modules: dict[str, int],
                    line: str = "") -> wire.ProfileMessage:
    """A trainable device's profile: it works in ``environment`` and holds ``modules`` of ``line``'s counting."""
    return make_profile(bank, device, profile_name="", measured=False, modules=modules, environment=environment,
                        line=line)

"""The attack suite's fleet: a bank, devices with their own classes, and their real deltas (edge runtime training).

Everything here is made once per run and shared by every cell of the matrix (:mod:`bench.attack`):
the digits bank, one pi4 bundle (exported once, as in the soak: every export costs tens of seconds
here), each device's honest delta from one fine-tuning run of the real edge runtime (ONNX Runtime
training step graph) on its own samples, and, for the devices that may be malicious, a backdoor delta
from the same runtime trained on their samples plus copies stamped with a trigger and labelled with
the target class.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Say = Callable[[str], None]
TRIGGER_VALUE = 16.0  # the digits' brightest pixel value: a bright 2x2 square in the bottom-right corner


def stamp(x: np.ndarray) -> np.ndarray:
    """The backdoor trigger: the bottom-right 2x2 pixels of each image set to the brightest value."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[..., -2:, -2:] = TRIGGER_VALUE
    return out


@dataclass(frozen=True)
class FleetSpec:
    """The fleet's shape: devices, classes and samples per device, the backdoor's target class."""

    devices: int = 10
    classes_per_device: int = 3
    samples_per_device: int = 120
    test_per_device: int = 90
    target: int = 0  # the backdoor's target class
    poison_share: float = 0.5  # triggered copies, as a share of the malicious device's samples
    max_attackers: int = 2
    attacker_epochs: int = 10  # the attacker trains longer and faster than the bundle's 3 epochs at 1e-3
    attacker_learning_rate: float = 3e-3
    bank_epochs: int | None = None  # None: the configuration's full cloud training
    bank_enhance_epochs: int | None = None
    seed: int = 0
    bank: Path | None = None  # an existing digits bank to use (read only) instead of training one
    bundle: Path | None = None  # an existing pi4 bundle of that bank instead of exporting one


@dataclass
class FleetDevice:
    """One device: its classes, bundle, held-out test samples, and the deltas it sends (wire messages)."""

    name: str
    classes: tuple[int, ...]
    bundle: Path
    test_x: np.ndarray
    test_y: np.ndarray
    honest: Any = None  # wire.DeltaMessage from the edge runtime's training on clean samples
    backdoor: Any = None  # the same device trained on clean + triggered samples (only for possible attackers)


@dataclass
class Fleet:
    """What every cell shares."""

    spec: FleetSpec
    bank: Path
    devices: list[FleetDevice]
    test_x: np.ndarray  # the cloud's test set: pool samples no device trained on
    test_y: np.ndarray
    importance: list[list[float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _train_delta(bundle: Path, state: Path, name: str, x: np.ndarray, y: np.ndarray, **overrides: Any) -> Any:
    """One fine-tuning run of the real edge runtime on ``x, y``; the delta message it would send.

    ``overrides`` are runtime settings (an attacker may train longer or faster than the bundle says).
    """
    from edge_runtime.config import load_config
    from edge_runtime.service import EdgeService
    from edge_runtime.sync import delta_message

    svc = EdgeService(load_config(overrides={
        "bundle": bundle, "state_dir": state, "device_id": name, "train_every_samples": 0,
        "max_samples": max(len(y) * 2, 64), "min_train_samples": 8, "drift": False, "resource_interval_s": 0,
        **overrides},
        environ={}))
    try:
        svc.add_samples(x, [int(v) for v in y])
        svc.train_now("attack-bench")
        pending = svc.outbox.pending()
        if not pending:
            raise RuntimeError(f"{name}: a training run produced no delta (the outbox is empty)")
        return delta_message(svc, pending[0])
    finally:
        svc.close()


def build_fleet(spec: FleetSpec, work: Path, say: Say) -> Fleet:
    """Train (or reuse) the bank, export bundles, and train every device once (honest and backdoor deltas)."""
    import time

    from exporter.cloud import TrainOptions, train_bank
    from exporter.data import load_dataset, split
    from exporter.export import ExportRequest, export_bundle

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    bank = spec.bank or work / "bank"
    if not (bank / "bank.json").exists():
        say("training the digits bank" + (f" ({spec.bank_epochs} epochs)" if spec.bank_epochs else ""))
        train_bank(TrainOptions(dataset="digits", bank_dir=bank, seed=spec.seed, epochs=spec.bank_epochs,
                                enhance_epochs=spec.bank_enhance_epochs))
    seconds["bank"] = time.perf_counter() - t
    from module_bank import DirectoryBank

    pool = split(load_dataset("digits"), DirectoryBank(bank).info().seed).pool
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(pool.y))
    half = len(order) // 2
    train_idx, test_idx = np.sort(order[:half]), np.sort(order[half:])  # devices train on one half only
    tx, ty = pool.x[train_idx], pool.y[train_idx]
    ex, ey = pool.x[test_idx], pool.y[test_idx]
    num_classes = int(pool.y.max()) + 1
    t = time.perf_counter()
    bundle = spec.bundle or work / "bundle"
    if not (bundle / "manifest.json").exists():
        say("exporting one pi4 bundle for every device (the exports dominate set-up on a small machine)")
        export_bundle(ExportRequest(bank, profile="pi4", out_dir=bundle, measure=False))
    devices: list[FleetDevice] = []
    for i in range(spec.devices):
        classes = tuple(sorted(int(c) for c in rng.choice(num_classes, spec.classes_per_device, replace=False)))
        test_mask = np.flatnonzero(np.isin(ey, classes))
        pick = rng.choice(test_mask, size=min(spec.test_per_device, len(test_mask)), replace=False)
        devices.append(FleetDevice(f"dev-{i:02d}", classes, bundle, ex[pick], ey[pick]))
    seconds["export"] = time.perf_counter() - t
    t = time.perf_counter()
    for i, d in enumerate(devices):
        mask = np.flatnonzero(np.isin(ty, d.classes))
        pick = rng.choice(mask, size=min(spec.samples_per_device, len(mask)), replace=False)
        x, y = tx[pick], ty[pick]
        say(f"{d.name}: training on {len(y)} samples of classes {d.classes} (edge runtime)")
        d.honest = _train_delta(d.bundle, work / "states" / f"{d.name}-honest", d.name, x, y)
        if i < spec.max_attackers:
            others = np.flatnonzero(y != spec.target)
            poison = rng.choice(others, size=int(round(spec.poison_share * len(y))), replace=True)
            px = np.concatenate([x, stamp(x[poison])])
            py = np.concatenate([y, np.full(len(poison), spec.target, dtype=y.dtype)])
            say(f"{d.name}: training on {len(py)} samples, {len(poison)} of them triggered -> {spec.target}")
            d.backdoor = _train_delta(d.bundle, work / "states" / f"{d.name}-backdoor", d.name, px, py,
                                      epochs=spec.attacker_epochs, learning_rate=spec.attacker_learning_rate)
        shutil.rmtree(work / "states", ignore_errors=True)
    seconds["device_training"] = time.perf_counter() - t
    from eclm.manifest import read_manifest

    importance = [[float(v) for v in row] for row in read_manifest(devices[0].bundle).importance]
    return Fleet(spec, bank, devices, ex, ey, importance, seconds)

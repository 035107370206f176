"""`eclm demo` today: train the digits bank, export a pi4 bundle for a class subset, report accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.evaluate import bundle_accuracy


@dataclass(frozen=True)
class DemoResult:
    """What the demo made and measured."""

    bank_dir: Path
    bundle_dir: Path
    bank_test_accuracy: float
    full_model_accuracy_on_classes: float
    bundle_accuracy_on_classes: float
    classes: list[int]
    samples: int


def run_demo(
    workdir: Path,
    profile: str = "pi4",
    classes: Sequence[int] = (1, 4, 7),
    seed: int = 0,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
    step: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train, export, and measure the bundle on the device pool's samples of ``classes``."""
    import torch

    from exporter.bank import DirectoryBank
    from exporter.cloud import TrainOptions, train_bank
    from exporter.data import load_dataset, split
    from exporter.export import ExportRequest, export_bundle
    from exporter.torchio import model_from_bank
    from exporter.train import to_tensors

    bank_dir = workdir / "bank"
    bundle_dir = workdir / "bundles" / profile
    info = train_bank(TrainOptions(dataset="digits", bank_dir=bank_dir, seed=seed), progress)
    export_bundle(ExportRequest(bank_dir=bank_dir, profile=profile, out_dir=bundle_dir, classes=list(classes)), step)
    pool = split(load_dataset("digits"), seed).pool
    mask = np.isin(pool.y, list(classes))
    model = model_from_bank(DirectoryBank(bank_dir))
    xt, yt = to_tensors(pool, info.normalisation["mean"], info.normalisation["std"])
    with torch.no_grad():
        full_acc = float((model(xt[torch.from_numpy(mask)]).argmax(1) == yt[torch.from_numpy(mask)]).float().mean())
    return DemoResult(
        bank_dir=bank_dir,
        bundle_dir=bundle_dir,
        bank_test_accuracy=float(info.metrics["test_accuracy"]),
        full_model_accuracy_on_classes=full_acc,
        bundle_accuracy_on_classes=bundle_accuracy(bundle_dir, pool.x[mask], pool.y[mask]),
        classes=list(classes),
        samples=int(mask.sum()),
    )

"""Session fixtures: one real digits module bank and one real bundle per registered device profile.

Everything here is real: the bank is trained with torch on scikit-learn's digits, the bundles are
exported to ONNX with their training step graphs and measured by the torch-free probe.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from _eclm_testutil import DEVICE_CLASSES, SEED

from device_profiles import available_profiles
from eclm.manifest import BundleManifest
from exporter.cloud import TrainOptions, train_bank
from exporter.data import Splits, load_dataset, split
from exporter.export import ExportRequest, export_bundle
from module_bank import BankInfo

# One intra-op thread: the models are tiny, and on a shared 2-core machine torch's default two
# OpenMP threads spin against other processes (training measured 15x slower under load). It also
# makes the trained tensors independent of the machine's core count (the reduction order changes
# with the thread count). Override with ECLM_TEST_TORCH_THREADS.
torch.set_num_threads(int(os.environ.get("ECLM_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def digits_bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BankInfo]:
    """The digits bank trained once with the default (full) epochs and seed 0."""
    bank_dir = tmp_path_factory.mktemp("digits-bank") / "bank"
    info = train_bank(TrainOptions(dataset="digits", bank_dir=bank_dir, seed=SEED))
    return bank_dir, info


class LazyBundles(Mapping[str, tuple[Path, BundleManifest]]):
    """A bundle per registered profile, each exported when a test first asks for it: a worker of the suite
    exports only the profiles its tests use (every export is a real one, with its step graph).
    """

    def __init__(self, bank_dir: Path, root: Path) -> None:
        self.bank_dir, self.root = bank_dir, root
        self.names = available_profiles()
        self.made: dict[str, tuple[Path, BundleManifest]] = {}

    def __getitem__(self, name: str) -> tuple[Path, BundleManifest]:
        if name not in self.names:
            raise KeyError(name)
        if name not in self.made:
            out_dir = self.root / name
            manifest = export_bundle(ExportRequest(self.bank_dir, profile=name, out_dir=out_dir,
                                                   classes=DEVICE_CLASSES))
            self.made[name] = (out_dir, manifest)
        return self.made[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@pytest.fixture(scope="session")
def digits_bundles(
    digits_bank: tuple[Path, BankInfo], tmp_path_factory: pytest.TempPathFactory
) -> Mapping[str, tuple[Path, BundleManifest]]:
    """A bundle for every registered profile, derived for a device that sees classes 1, 4 and 7."""
    bank_dir, _ = digits_bank
    return LazyBundles(bank_dir, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def digits_splits() -> Splits:
    """The seeded split the bank was trained with; ``pool`` is the devices' (held-out) data."""
    return split(load_dataset("digits"), SEED)


@pytest.fixture(scope="session")
def device_batch(digits_splits: Splits) -> tuple[np.ndarray, np.ndarray]:
    """Raw pool samples of the device's classes: what a board would feed its sub-model."""
    pool = digits_splits.pool
    mask = np.isin(pool.y, DEVICE_CLASSES)
    return pool.x[mask].astype(np.float32), pool.y[mask].astype(np.int64)


@pytest.fixture(scope="session")
def pi4(digits_bundles: Mapping[str, tuple[Path, BundleManifest]]) -> Path:
    """The pi4 bundle: on-device training and a ladder of cheaper variants."""
    path, manifest = digits_bundles["pi4"]
    assert manifest.training["available"] and len(manifest.variants) >= 1
    return path


@pytest.fixture(scope="session")
def zero(digits_bundles: Mapping[str, tuple[Path, BundleManifest]]) -> Path:
    """A bundle without on-device training (the profile does not train on the device)."""
    path, manifest = digits_bundles["pi-zero-2w"]
    assert manifest.training["available"] is False
    return path


@pytest.fixture(scope="session")
def xy(device_batch: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The device batch, checked to be raw 8x8 digits of the device's classes."""
    x, y = device_batch
    assert x.shape[1:] == (1, 8, 8) and len(x) > 300
    return x, y

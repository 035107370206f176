"""Benchmarks say what failed and go on: a device whose bundle cannot be made is reported, a missing data
file is named as missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import bench.cli
import cloud_sync.cli
from bench.arms_edge import LocalArm
from bench.fleet import Device, FleetConfig, Pool, run
from bench.suites import _failed_md
from eclm.errors import DataError
from exporter.data import Splits
from module_bank import BankInfo


def test_a_device_whose_bundle_fails_is_reported_and_the_run_goes_on(
    digits_bank: tuple[Path, BankInfo], digits_splits: Splits, tmp_path: Path
) -> None:
    bank, _ = digits_bank
    pool = Pool(digits_splits.pool.x, digits_splits.pool.y, 0)
    devices = [Device(0, "dev-000", (1, 4), "none", 1.0, 60), Device(1, "dev-001", (1, 42), "none", 1.0, 60)]
    arm = LocalArm(bank, tmp_path, devices)  # class 42 is not in the bank: its export fails
    try:
        assert list(arm.failed) == [1] and "classes [42]" in arm.failed[1]
        result = run([arm], FleetConfig(devices=2, per_round=2, steps=2, test_samples=30), pool, devices)
    finally:
        arm.close()
    assert result["failed_devices"] == {"local": [arm.failed[1]]}
    assert all(np.isfinite(result["accuracy_per_step"]["local"]))  # the healthy device's accuracy
    assert all(list(row["local"]) == [0] for row in result["history"])
    text = _failed_md({"m=2, seed 0": result["failed_devices"]})
    assert "Devices left out" in text and "dev-001 (classes 1,42)" in text and "classes [42]" in text
    json.dumps(result["failed_devices"], allow_nan=False)


def test_a_missing_data_file_is_file_not_found(tmp_path: Path) -> None:
    missing = str(tmp_path / "nosuch.npz")
    for app, args in ((bench.cli.app, ["bench", "--suite", "paper", "--quick", "--out", str(tmp_path / "out")]),
                      (cloud_sync.cli.app, ["train", "--bank", str(tmp_path / "bank")])):
        result = CliRunner().invoke(app, [*args, "--dataset", missing])
        assert result.exit_code == DataError.exit_code, result.output
        assert f"file not found: {missing}" in result.output
        assert "unknown data set" not in result.output


def test_cloud_status_is_a_table_and_strict_json(digits_bank: tuple[Path, BankInfo], tmp_path: Path) -> None:
    import shutil

    from cloud_sync.daemon import LEDGER
    from module_bank import Ledger

    bank = tmp_path / "bank"
    shutil.copytree(digits_bank[0], bank)
    ledger = Ledger(bank / LEDGER)
    try:
        ledger.store_delta("d1", "line-1", b"x" * 1234)
        ledger.store_delta("d2", "line-2", b"y" * 10)
        ledger.reject("stale", "base version 1 < 4", delta_id="d3", device_id="line-2", size=99)
        ledger.commit_round(1, {"head": (2, ["d1"])}, ["d1"], [], "", {"val_before": 0.9541234567,
                                                                       "val_after": 0.9442222, "loss": float("nan")})
        ledger.touch_device("line-1", online=1, profile="pi4", bundle="ab" * 32)
    finally:
        ledger.close()
    result = CliRunner().invoke(cloud_sync.cli.app, ["status", "--bank", str(bank)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "{" not in text and "}" not in text  # no Python dicts
    assert "deltas: merged 1, held 0, rejected 1, pending 1, expired 0; uplink 1,343 bytes" in text
    lines = text.splitlines()
    assert any(line.split() == ["1", "merged", "0.954", "0.944"] for line in lines), text
    assert any(line.split() == ["stale", "1"] for line in lines), text
    device = next(line for line in lines if line.startswith("line-1"))
    assert device.split()[:2] == ["line-1", "yes"] and device.split()[-2:] == ["pi4", "ab" * 6]
    as_json = CliRunner().invoke(cloud_sync.cli.app, ["status", "--bank", str(bank), "--json"])
    report = json.loads(as_json.output, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert report["recent_rounds"][0]["loss"] is None and report["deltas"]["merged"] == 1

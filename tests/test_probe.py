"""The torch-free measurement probe, run the way the exporter runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from _eclm_testutil import ROOT, subprocess_env


def _probe(bundle, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "exporter.probe", str(bundle), mode],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_infer_pi4(digits_bundles) -> None:
    bundle, _ = digits_bundles["pi4"]
    result = _probe(bundle, "infer")
    print(f"\nprobe infer pi4: {result}")
    assert result["torch_imported"] is False
    assert result["inference_memory_bytes"] > 0
    assert result["process_peak_bytes"] >= result["baseline_bytes"] > 0
    # The probe reads the peak twice; the second reading may only be higher.
    assert result["inference_memory_bytes"] <= result["process_peak_bytes"] - result["baseline_bytes"]
    assert 0 < result["latency_ms_p50_host"] < 1000


def test_probe_train_pi4(digits_bundles) -> None:
    bundle, manifest = digits_bundles["pi4"]
    if not manifest.training["available"]:
        pytest.skip("the bundle does not train on the device")
    result = _probe(bundle, "train")
    assert result["torch_imported"] is False
    assert result["training_memory_bytes"] > 0
    assert math.isfinite(result["loss_first"]) and math.isfinite(result["loss_second"])
    assert result["train_step_ms_host"] > 0

"""The board's side of the contract loads without torch, even where torch is installed."""

from __future__ import annotations

import json
import subprocess
import sys

from _eclm_testutil import ROOT, subprocess_env

EDGE_CODE = r"""
import json, sys
from eclm.ort import load_onnxruntime
ort = load_onnxruntime()
import importlib.util
import eclm.train_step, eclm.onnx_weights
import eclm.manifest, eclm.tensors, eclm.hashing, eclm.errors
import edge_runtime.trainer, edge_runtime.service
import exporter.probe
torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({
    "torch_modules": torch_modules,
    "torch_in_sys_modules": "torch" in sys.modules,
    "onnxruntime": ort.__version__,
    "training_build": importlib.util.find_spec("onnxruntime.training") is not None,
    "training_modules": sorted(m for m in sys.modules if m.startswith("onnxruntime.training")),
    "providers": ort.get_available_providers(),
}))
"""


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
        timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_edge_modules_do_not_import_torch() -> None:
    result = _run(EDGE_CODE)
    print(f"\nfresh interpreter after the edge imports: torch in sys.modules = {result['torch_in_sys_modules']}"
          f" (onnxruntime {result['onnxruntime']})")
    assert result["torch_in_sys_modules"] is False, result["torch_modules"][:10]
    assert result["torch_modules"] == []
    assert "CPUExecutionProvider" in result["providers"]


def test_the_runtime_trains_with_plain_onnxruntime() -> None:
    """No training build of ONNX Runtime is installed, and the training path loads none of its modules."""
    result = _run(EDGE_CODE)
    assert result["training_build"] is False
    assert result["training_modules"] == []


def test_the_product_never_reaches_for_the_training_build() -> None:
    """One training path: no source of the product names ONNX Runtime's training build or its private binding."""
    banned = ("_pybind_state", "onnxruntime.training", "generate_artifacts", "onnxruntime-training")
    found = [
        f"{path.relative_to(ROOT)}: {word}"
        for package in ("eclm", "edge_runtime", "exporter", "cloud_sync")
        for path in sorted((ROOT / package).rglob("*.py"))
        for word in banned
        if word in path.read_text()
    ]
    assert found == []

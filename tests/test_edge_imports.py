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
import eclm.ort_train
available = eclm.ort_train.training_available()
import eclm.manifest, eclm.tensors, eclm.hashing, eclm.errors
import exporter.probe
torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({
    "torch_modules": torch_modules,
    "torch_in_sys_modules": "torch" in sys.modules,
    "onnxruntime": ort.__version__,
    "training_available": available,
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
          f" (onnxruntime {result['onnxruntime']}, training API {result['training_available']})")
    assert result["torch_in_sys_modules"] is False, result["torch_modules"][:10]
    assert result["torch_modules"] == []
    assert "CPUExecutionProvider" in result["providers"]


def test_training_api_probe_agrees_with_this_process() -> None:
    """The torch-free check finds the training API exactly when this (torch-importing) process does."""
    from eclm.ort_train import training_available

    assert _run(EDGE_CODE)["training_available"] is training_available()

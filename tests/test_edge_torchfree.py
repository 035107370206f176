"""The board's runtime stays torch-free through its whole code path: serve, predict, fine-tune, keep a delta.

Checked in fresh interpreters (this test process has torch loaded by the fixtures) and in a running
`eclm-edge serve` process through its memory map.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _eclm_testutil import ROOT
from test_edge_support import EdgeServer, child_env, edge_command, free_port

from eclm.manifest import BundleManifest

Bundles = dict[str, tuple[Path, BundleManifest]]

EDGE_PATH = r"""
import json, sys
from pathlib import Path
import numpy as np
from edge_runtime.cli import app, main
from edge_runtime.config import load_config
from edge_runtime.service import EdgeService
from edge_runtime.http_api import make_handler, serve, wait_ready
from edge_runtime.outbox import Outbox

bundle, state, data = map(Path, sys.argv[1:4])
arrays = np.load(data)
svc = EdgeService(load_config(overrides={"bundle": bundle, "state_dir": state, "train_every_samples": 0}, environ={}))
pred = svc.predict(arrays["x"][:4])
svc.add_samples(arrays["x"], arrays["y"].tolist())
result = svc.train_now()
entry = Outbox.read(svc.outbox.pending()[0])
status = svc.status()
svc.close()
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "exporter", "cloud_sync")),
    "torch": "torch" in sys.modules,
    "predictions": pred["predictions"],
    "result": {k: result.get(k) for k in ("accepted", "steps", "delta_id", "reason", "generation")},
    "delta_tensors": len(entry.tensors),
    "generation": status["bundle"]["generation"],
}))
"""


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout,
                          check=False)


def test_serve_predict_and_train_in_a_fresh_interpreter_import_no_torch(
    digits_bundles: Bundles, device_batch: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = device_batch
    data = tmp_path / "samples.npz"
    np.savez(data, x=x, y=y)
    out = _run([sys.executable, "-c", EDGE_PATH, str(digits_bundles["pi4"][0]), str(tmp_path / "state"), str(data)])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    assert result["modules"] == [], result["modules"][:10]
    assert len(result["predictions"]) == 4
    run = result["result"]
    assert run["delta_id"] and run["steps"] > 0, run  # the step graph ran on plain onnxruntime
    assert result["delta_tensors"] > 0
    assert result["generation"] == (run["generation"] if run["accepted"] else 0)


def test_serve_process_has_no_torch_mapped(digits_bundles: Bundles, device_batch, tmp_path: Path) -> None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/<pid>/maps (Linux)")
    x, y = device_batch
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi4"][0]).start()
    try:
        rows = x.reshape(len(x), -1).tolist()
        assert srv.request("POST", "/v1/samples", {"inputs": rows, "labels": y.tolist()}).status == 200
        assert srv.request("POST", "/v1/predict", {"inputs": rows[:2]}).status == 200
        assert srv.request("POST", "/v1/train").status == 202
        last = srv.wait_training()["training"]["last"]
        assert last.get("delta_id"), last
        assert srv.proc is not None
        mapped = Path(f"/proc/{srv.proc.pid}/maps").read_text()
        libs = {line.split()[-1] for line in mapped.splitlines() if "/" in line}
        assert not [lib for lib in libs if "/torch/" in lib or "libtorch" in lib], sorted(libs)[:20]
        assert any("onnxruntime" in lib for lib in libs)  # the check looks at the right process
    finally:
        srv.stop()


def test_eclm_edge_help_and_verify(digits_bundles: Bundles, tmp_path: Path) -> None:
    for args in (["--help"], ["serve", "--help"], ["verify", "--help"]):
        out = _run([*edge_command(), *args], timeout=60)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        assert "Usage" in out.stdout
    assert "serve" in _run([*edge_command(), "--help"]).stdout

    bundle = digits_bundles["pi4"][0]
    ok = _run([*edge_command(), "verify", "--bundle", str(bundle)], timeout=60)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr[-2000:]

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    refused = _run([*edge_command(), "verify", "--bundle", str(bad)], timeout=60)
    assert refused.returncode == 14, (refused.returncode, refused.stdout, refused.stderr[-2000:])
    assert "model.onnx" in refused.stdout + refused.stderr


def test_serve_refuses_a_tampered_bundle_with_exit_14(digits_bundles: Bundles, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(digits_bundles["pi4"][0], bad)
    (bad / "selector.onnx").unlink()
    out = _run([*edge_command(), "serve", "--bundle", str(bad), "--state-dir", str(tmp_path / "state"),
                "--port", str(free_port())], timeout=60)
    assert out.returncode == 14, (out.returncode, out.stderr[-2000:])
    assert not (tmp_path / "state" / "current.json").exists()

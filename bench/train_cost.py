"""Edge training cost against full-model training: peak memory and time per batch, each in a fresh process.

Run as ``python -m bench.train_cost BANK WORK``; prints JSON. The edge side is the bundle's own
measurement (a torch-free ONNX Runtime subprocess: one training step at the bundle's batch size);
the baseline trains the whole modular model with PyTorch (AdamW, batch 16), as FedAvg asks a device to.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def full_model_child(bank: Path) -> dict[str, Any]:
    """In a fresh process: PyTorch training steps of the whole modular model at batch 16."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from exporter.torchio import model_from_bank
    from module_bank import DirectoryBank

    torch.set_num_threads(1)
    base = _status("VmRSS:")
    model = model_from_bank(DirectoryBank(bank))
    for layer in model.layers:
        setattr(layer, "sparse", False)  # noqa: B010  (dense, as an exported graph runs: every module)
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(16, *model.cfg.input_shape)).astype(np.float32))
    y = torch.arange(16) % model.cfg.num_classes
    times = []
    for _ in range(8):
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"training_memory_bytes": _status("VmHWM:") - base, "step_ms": float(np.median(times[2:]) * 1e3)}


def measure(bank: Path, work: Path) -> dict[str, Any]:
    from exporter.export import ExportRequest, export_bundle

    manifest = export_bundle(ExportRequest(bank, profile="pi4", out_dir=work / "cost-bundle", classes=[0, 1]))
    edge = manifest.costs["measured"]
    out = subprocess.run([sys.executable, "-m", "bench.train_cost", "--child", str(bank)], capture_output=True,
                         text=True, check=True)
    full = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "edge_training_memory_bytes": edge.get("training_memory_bytes"),
        "edge_step_ms": edge.get("train_step_ms_host"),
        "edge_trainable_parts": manifest.training["trainable_parts"],
        "full_training_memory_bytes": full["training_memory_bytes"],
        "full_step_ms": full["step_ms"],
        "memory_ratio": full["training_memory_bytes"] / max(1, edge.get("training_memory_bytes") or 1),
        "latency_ratio": full["step_ms"] / max(1e-9, edge.get("train_step_ms_host") or 1e-9),
    }


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(json.dumps(full_model_child(Path(sys.argv[2]))))
    else:
        print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]))))

"""Baseline only: a training step with ONNX Runtime's (deprecated) training artifacts on a bundle's model.

Run by ``bench.edge_bench --ort-training-venv DIR`` as a plain script with that venv's python
(``onnxruntime-training-cpu==1.19.2``, ``onnx==1.16.2``, torch for its artifact generator): it imports
nothing of the project. It generates the artifacts of the bundle's ``model.onnx`` for the bundle's
trainable parameters (cross-entropy loss, AdamW at the bundle's learning rate) and times steps on one
batch, 1 intra-op thread, as the runtime trains. Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(spec_path: str) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    spec = json.loads(Path(spec_path).read_text())
    bundle = Path(spec["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    trainable = list(manifest["training"]["trainable_params"])
    model = onnx.load(str(bundle / "model.onnx"))
    model.ir_version = min(model.ir_version, 9)  # what onnx 1.16 and ORT 1.19 read
    frozen = [i.name for i in model.graph.initializer if i.name not in set(trainable)]
    onnxruntime.set_default_logger_severity(3)
    out = Path(tempfile.mkdtemp(prefix="eclm-ort-artifacts-"))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen,
                                     loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.AdamW,
                                     artifact_directory=str(out))
    generate_s = time.perf_counter() - t0
    onnxruntime.set_default_logger_severity(3)
    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    module = Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu",
                    session_options=options)
    optimizer = Optimizer(str(out / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(float(spec["learning_rate"]))
    module.train()
    data = np.load(spec["data"])
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)

    def step() -> float:
        t = time.perf_counter()
        module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
        return (time.perf_counter() - t) * 1e3

    for _ in range(2):  # warm-up
        step()
    times = [step() for _ in range(int(spec["steps"]))]
    return {"p50_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "steps": len(times),
            "generate_artifacts_s": generate_s, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "trainable_tensors": len(trainable)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))

"""Measures a bundle the way a board runs it: peak memory and latency with ONNX Runtime, no torch.

Run as ``python -m exporter.probe BUNDLE {infer|train}``; prints one JSON object. Importing only
numpy and ONNX Runtime keeps the figures those of the edge runtime, not of the exporter.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _input_batch(manifest: dict, batch: int) -> np.ndarray:
    shape = [batch, *manifest["input"]["shape"][1:]]
    rng = np.random.default_rng(0)
    lo, hi = manifest["input"]["range"]
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def probe_infer(bundle: Path, manifest: dict, repeats: int = 30) -> dict[str, float]:
    from eclm.onnx_weights import read_initializers
    from eclm.ort import load_onnxruntime
    from eclm.train_step import open_session

    load_onnxruntime()
    base = _rss_bytes()
    # As the edge runtime serves: its own arrays, read in place by the session.
    sess, kept = open_session(bundle / "model.onnx", read_initializers(bundle / "model.onnx"))
    x = _input_batch(manifest, 1)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    del kept
    return {
        "inference_memory_bytes": max(0, _peak_bytes() - base),
        "latency_ms_p50_host": float(np.median(times) * 1e3),
        "process_peak_bytes": _peak_bytes(),
        "baseline_bytes": base,
    }


def probe_train(bundle: Path, manifest: dict) -> dict[str, float]:
    """Peak memory of serving and training the way the runtime does: one set of parameter arrays shared
    by the serving session and the step graph, two steps on a batch of the bundle's size.
    """
    from eclm.onnx_weights import read_initializers
    from eclm.ort import load_onnxruntime
    from eclm.train_step import StepRunner, open_session

    load_onnxruntime()
    base = _rss_bytes()
    weights = read_initializers(bundle / "model.onnx")
    serving, kept = open_session(bundle / "model.onnx", weights)
    batch = int(manifest["training"]["batch_size"])
    x = _input_batch(manifest, batch)
    serving.run(None, {serving.get_inputs()[0].name: x[:1]})
    runner = StepRunner(bundle / manifest["training"]["step"], weights, manifest["training"]["trainable_params"])
    y = np.arange(batch, dtype=np.int64) % len(manifest["labels"])
    lr = float(manifest["training"]["learning_rate"])
    t = time.perf_counter()
    loss = runner.step(x, y, lr)
    first = time.perf_counter() - t
    t = time.perf_counter()
    loss2 = runner.step(x, y, lr)
    second = time.perf_counter() - t
    del kept
    return {
        "training_memory_bytes": max(0, _peak_bytes() - base),
        "train_step_ms_host": second * 1e3,
        "first_step_ms_host": first * 1e3,
        "loss_first": loss,
        "loss_second": loss2,
        "baseline_bytes": base,
    }


def main(argv: list[str]) -> int:
    bundle = Path(argv[1])
    mode = argv[2]
    manifest = json.loads((bundle / "manifest.json").read_text())
    result = probe_infer(bundle, manifest) if mode == "infer" else probe_train(bundle, manifest)
    result["torch_imported"] = "torch" in sys.modules
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

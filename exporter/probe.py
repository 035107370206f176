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
    from eclm.ort import load_onnxruntime

    ort = load_onnxruntime()
    base = _rss_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # as the edge runtime serves
    sess = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    x = _input_batch(manifest, 1)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return {
        "inference_memory_bytes": max(0, _peak_bytes() - base),
        "latency_ms_p50_host": float(np.median(times) * 1e3),
        "process_peak_bytes": _peak_bytes(),
        "baseline_bytes": base,
    }


def probe_train(bundle: Path, manifest: dict) -> dict[str, float]:
    from eclm.ort import load_onnxruntime
    from eclm.ort_train import OrtTrainer, training_available

    load_onnxruntime()
    training_available()  # loads the C binding before the baseline is taken
    base = _rss_bytes()
    trainer = OrtTrainer(bundle / manifest["training"]["folder"])
    batch = int(manifest["training"]["batch_size"])
    x = _input_batch(manifest, batch)
    y = np.arange(batch, dtype=np.int64) % len(manifest["labels"])
    t = time.perf_counter()
    loss = trainer.train_step(x, y)
    first = time.perf_counter() - t
    t = time.perf_counter()
    loss2 = trainer.train_step(x, y)
    second = time.perf_counter() - t
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

"""Accuracy of a bundle's model.onnx on raw samples, with ONNX Runtime (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eclm.ort import load_onnxruntime


def bundle_accuracy(bundle: Path, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of ``bundle``'s inference graph on raw inputs ``x``."""
    ort = load_onnxruntime()
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(y), batch):
        logits = sess.run(None, {name: x[i : i + batch].astype(np.float32)})[0]
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct / max(1, len(y))

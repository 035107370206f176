"""The exporter checks its own output: ONNX Runtime against PyTorch, and one training step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eclm.errors import ExportValidationError

TOLERANCE = 1e-4


def compare_outputs(
    names: Sequence[str], reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], tol: float = TOLERANCE
) -> dict[str, float]:
    """Max abs difference per output; raises listing every output beyond ``tol`` and by how much."""
    diffs: dict[str, float] = {}
    failing = []
    for name, ref, cand in zip(names, reference, candidate, strict=True):
        if ref.shape != cand.shape:
            failing.append(f"{name}: shape {cand.shape} != reference {ref.shape}")
            diffs[name] = float("inf")
            continue
        d = float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64)))) if ref.size else 0.0
        if not np.isfinite(d):
            d = float("inf")
        diffs[name] = d
        if d > tol:
            failing.append(f"{name}: max abs difference {d:.3g} > {tol:g}")
    if failing:
        raise ExportValidationError(
            "ONNX Runtime disagrees with PyTorch on " + "; ".join(failing),
            hint="report this with the bundle; an unsupported operator or an export-mode mismatch is likely",
        )
    return diffs


def check_against_torch(
    onnx_path: Path, module: nn.Module, inputs: np.ndarray, output_names: Sequence[str]
) -> dict[str, float]:
    """Run the ONNX graph in ONNX Runtime and ``module`` in PyTorch on the same inputs; compare."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(list(output_names), {sess.get_inputs()[0].name: inputs.astype(np.float32)})
    module.eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(inputs.astype(np.float32)))
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    return compare_outputs(output_names, [r.numpy() for r in refs], got)


def check_training(folder: Path, x: np.ndarray, y: np.ndarray, reference_logits: np.ndarray) -> dict[str, float]:
    """The artifacts load, their eval graph matches the inference graph, and one step runs and is finite."""
    from eclm.ort_train import OrtTrainer

    try:
        trainer = OrtTrainer(folder)
        _, logits = trainer.eval_step(x, y)
        diffs = compare_outputs(["eval_model.logits"], [reference_logits], [logits])
        loss = trainer.train_step(x, y)
    except ExportValidationError:
        raise
    except Exception as exc:
        raise ExportValidationError(f"training artifacts in {folder} do not run: {exc}", hint="re-export") from exc
    if not np.isfinite(loss):
        raise ExportValidationError(f"training step in {folder} gave loss {loss}", hint="re-export")
    return {**diffs, "first_step_loss": loss}

"""The exporter checks its own output: ONNX Runtime against PyTorch, and one training step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eclm.errors import ExportValidationError

# A difference is allowed up to ATOL times the output's scale (its largest magnitude, at least 1) plus
# RTOL times the element's own magnitude, as numpy's allclose and Optimum's validate_model_outputs
# (which uses a per-architecture atol): float32 rounding grows with the magnitudes summed into an
# output, so a fixed absolute bound refuses correct exports on data whose logits are larger than
# those it was tuned on (1.1e-4 against 1e-4 on an unseen data set).
ATOL = 1e-4
RTOL = 1e-3
TOLERANCE = ATOL  # the bound at scale 1 for a value near 0


def allowed(reference: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> np.ndarray:
    """Per element, the largest difference accepted from ``reference``."""
    ref = np.abs(reference.astype(np.float64))
    scale = max(1.0, float(ref.max())) if ref.size else 1.0
    return atol * scale + rtol * ref


def within_tolerance(reference: np.ndarray, candidate: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> bool:
    """Whether every element of ``candidate`` is within :func:`allowed` of ``reference`` (shapes equal)."""
    if reference.shape != candidate.shape:
        return False
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return bool(np.all(diff <= allowed(reference, atol, rtol)))


def compare_outputs(
    names: Sequence[str], reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
    atol: float = ATOL, rtol: float = RTOL,
) -> dict[str, float]:
    """Max abs difference per output; raises listing every output beyond its tolerance and by how much."""
    diffs: dict[str, float] = {}
    failing = []
    for name, ref, cand in zip(names, reference, candidate, strict=True):
        if ref.shape != cand.shape:
            failing.append(f"{name}: shape {cand.shape} != reference {ref.shape}")
            diffs[name] = float("inf")
            continue
        if not ref.size:
            diffs[name] = 0.0
            continue
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        diff = np.where(np.isfinite(diff), diff, np.inf)
        d = float(diff.max())
        diffs[name] = d
        bound = allowed(ref, atol, rtol)
        over = diff - bound
        if np.any(over > 0):
            worst = int(np.argmax(over))
            scale = max(1.0, float(np.abs(ref).max()))
            failing.append(f"{name}: max abs difference {d:.3g} (at one element {float(diff.flat[worst]):.3g} > "
                           f"{float(bound.flat[worst]):.3g} allowed there: {atol:g} x output scale {scale:.3g} + "
                           f"{rtol:g} x |reference| {abs(float(ref.flat[worst])):.3g})")
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

"""The exporter checks its own output: ONNX Runtime against PyTorch, and the training step against autograd."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eclm.errors import ExportValidationError
from exporter.step_graph import OptimizerSpec

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


STEP_RTOL = 1e-5  # relative tolerance of the step graph against PyTorch autograd
STEP_ATOL = 1e-6  # absolute floor for gradients and parameters (float32 sums in another order)
OUTPUT_ATOL = 1e-5  # absolute floor for the loss and logits


def _close(name: str, got: np.ndarray, ref: np.ndarray, atol: float, failing: list[str]) -> float:
    """Max ``|got - ref|``; notes a failure where it exceeds ``atol + STEP_RTOL * |ref|``."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        failing.append(f"{name}: shape {got.shape} != {ref.shape}")
        return float("inf")
    if not got.size:
        return 0.0
    diff = np.abs(got - ref)
    if not np.isfinite(diff).all() or bool(np.any(diff > atol + STEP_RTOL * np.abs(ref))):
        failing.append(f"{name}: max abs difference {float(np.max(diff)):.3g}")
    return float(np.max(diff))


def check_step(step_path: Path, module: nn.Module, trainable: Sequence[str], optimizer: OptimizerSpec,
               batches: Sequence[tuple[np.ndarray, np.ndarray]], learning_rate: float) -> dict[str, float]:
    """Run the step graph in ONNX Runtime over ``batches`` and check every step against PyTorch autograd
    and ``torch.optim`` started from the same parameters and optimizer state: the loss, the logits, the
    new parameters, and (first step) the gradients read back from the optimizer state the graph wrote.
    Tolerance ``STEP_RTOL`` relative plus an absolute floor. Raises :class:`ExportValidationError` listing
    what differs.
    """
    import copy

    from eclm.errors import TrainingUnavailableError
    from eclm.train_step import StepRunner, state_input

    ref = copy.deepcopy(module).eval()
    params = dict(ref.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    chosen = [params[n] for n in trainable]
    opt = optimizer.torch_optimizer(chosen, learning_rate)
    weights = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    try:
        runner = StepRunner(step_path, weights, trainable)
    except TrainingUnavailableError as exc:
        raise ExportValidationError(f"the training step graph does not run: {exc.message}", hint="report this") from exc
    failing: list[str] = []
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    floor = STEP_ATOL + optimizer.parameter_floor(learning_rate, 1)
    for i, (x, y) in enumerate(batches):
        # PyTorch starts each step where the graph stands, so each step is compared on its own.
        _sync(runner, params, trainable, opt, optimizer, i)
        loss, logits = runner.step_with_logits(x, y, learning_rate)
        opt.zero_grad()
        out = ref(torch.from_numpy(x))
        ref_loss = F.cross_entropy(out, torch.from_numpy(y))
        ref_loss.backward()
        tag = f"step {i + 1}"
        note("loss", _close(f"{tag} loss", np.asarray(loss), ref_loss.detach().numpy(), OUTPUT_ATOL, failing))
        note("logits", _close(f"{tag} logits", logits, out.detach().numpy(), OUTPUT_ATOL, failing))
        if i == 0:
            state = runner.state()
            for n in trainable:
                slots = [state[state_input(slot, n)] for slot in optimizer.slots]
                grad = optimizer.gradient_from_state(slots, weights[n])
                note("gradients", _close(f"{tag} gradient of {n}", grad, _grad(params[n]), STEP_ATOL, failing))
        opt.step()
        got = runner.parameters()
        for n in trainable:
            note("parameters", _close(f"{tag} {n}", got[n], params[n].detach().numpy(), floor, failing))
        if failing:
            break
    if failing:
        raise ExportValidationError(
            "the training step graph disagrees with PyTorch autograd on " + "; ".join(failing[:6]),
            hint="report this with the bundle; a wrong gradient translation is likely",
        )
    worst["steps"] = float(len(batches))
    return worst


def _sync(runner: Any, params: dict[str, nn.Parameter], trainable: Sequence[str], opt: torch.optim.Optimizer,
          optimizer: OptimizerSpec, steps_done: int) -> None:
    """Set PyTorch's parameters and optimizer state to the graph's current ones."""
    from eclm.train_step import state_input

    got, state = runner.parameters(), runner.state()
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(torch.from_numpy(got[n]))
    if steps_done == 0:
        return
    for n in trainable:
        slots = {slot: torch.from_numpy(state[state_input(slot, n)].copy()) for slot in optimizer.slots}
        if optimizer.name == "sgd":
            opt.state[params[n]] = {"momentum_buffer": slots["momentum"]}
        else:
            opt.state[params[n]] = {"step": torch.tensor(float(steps_done)), **slots}


def _grad(p: nn.Parameter) -> np.ndarray:
    return np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.detach().numpy()

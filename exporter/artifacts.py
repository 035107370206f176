"""ORT on-device training artifacts, and the choice of which parts train within the memory budget."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from exporter.costs import SESSION_OVERHEAD_BYTES, PartCost

TRAIN_FOLDER = "training"
BACKWARD_FACTOR = 3.0  # activations kept for backward plus their gradients, per trainable part
OPTIMIZER_COPIES = 3  # gradient plus AdamW's two moments, per trainable parameter


@dataclass(frozen=True)
class TrainingPlan:
    """Which parts train on the device and the estimated memory of doing so."""

    trainable_parts: list[str]
    estimated_bytes: int
    budget_bytes: float


def estimate_training_bytes(
    costs: Mapping[str, PartCost], all_parts: Sequence[str], trainable: Sequence[str], batch_size: int
) -> int:
    """Weights of the whole sub-model, optimizer state of the trainable parts, and the activations
    the backward pass keeps from the first trainable part on, at ``batch_size``.
    """
    weights = sum(costs[p].param_bytes for p in all_parts)
    optimizer = OPTIMIZER_COPIES * sum(costs[p].param_bytes for p in trainable)
    acts = BACKWARD_FACTOR * batch_size * sum(costs[p].activation_bytes for p in trainable)
    return int(2 * weights + optimizer + acts + 2 * SESSION_OVERHEAD_BYTES)


def plan_training(
    costs: Mapping[str, PartCost],
    layers_top_down: Sequence[Sequence[str]],
    all_parts: Sequence[str],
    budget_bytes: float,
    batch_size: int,
    max_layers: int | None = None,
) -> TrainingPlan:
    """Train the head, then whole module layers from the last one down, while the estimate fits.

    The stem, the selector's embedding and its gates stay frozen: the routing the sub-model was
    derived for stays valid and the device's importance reports stay comparable over time.
    """
    chosen = ["head"]
    if estimate_training_bytes(costs, all_parts, chosen, batch_size) > budget_bytes:
        return TrainingPlan([], 0, budget_bytes)
    for count, layer_parts in enumerate(layers_top_down):
        if max_layers is not None and count >= max_layers:
            break
        trial = [*chosen, *layer_parts]
        if estimate_training_bytes(costs, all_parts, trial, batch_size) > budget_bytes:
            break
        chosen = trial
    return TrainingPlan(chosen, estimate_training_bytes(costs, all_parts, chosen, batch_size), budget_bytes)


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Hold the gradient builder's verbose native log (file descriptor 2); show it only if it fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            tail = log.read()[-4000:].decode(errors="replace")
            sys.stderr.write(tail)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate(model_path: Path, out_dir: Path, trainable: Sequence[str], frozen: Sequence[str]) -> None:
    """Training, eval and optimizer graphs plus checkpoint (CrossEntropy loss, AdamW) in ``out_dir``."""
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)  # the gradient builder's warnings are not the user's concern

    out_dir.mkdir(parents=True, exist_ok=True)  # generate_artifacts does not create it
    model = onnx.load(str(model_path))
    quiet = io.StringIO()
    logging.getLogger("root").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(quiet), _native_stderr_to_log():
        artifacts.generate_artifacts(
            model,
            requires_grad=list(trainable),
            frozen_params=list(frozen),
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
            additional_output_names=["logits"],
        )
    onnxruntime.set_default_logger_severity(3)  # generate_artifacts turns verbose logging back on

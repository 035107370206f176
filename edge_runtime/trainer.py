"""On-device fine-tuning of a serving generation with ONNX Runtime's training API, and its delta."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eclm.ort_train import OrtTrainer
from edge_runtime.model import ServingModel
from edge_runtime.store import Batch


@dataclass(frozen=True)
class TrainSettings:
    """Epochs, batch size and learning rate of one run (the bundle's, unless overridden)."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 0


@dataclass
class TrainOutcome:
    """What a run did: losses, holdout accuracy before and after, and whether it now serves."""

    started: float
    seconds: float = 0.0
    steps: int = 0
    samples: int = 0
    holdout_samples: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    holdout_before: float = float("nan")
    holdout_after: float = float("nan")
    accepted: bool = False
    reason: str = ""
    delta_id: str | None = None
    generation: int | None = None
    step_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("step_seconds")
        d["step_ms_median"] = float(np.median(self.step_seconds) * 1e3) if self.step_seconds else None
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def part_params(serving: ServingModel) -> dict[str, list[str]]:
    """ONNX parameter names of every bundle part."""
    out: dict[str, list[str]] = {}
    for part in [*serving.manifest.modules, *serving.manifest.fixed_parts]:
        out[part["part_id"]] = list(part["params"])
    return out


def bank_name(onnx_name: str) -> str:
    """The bank's name of an exported parameter (the export wraps the sub-model as ``net``)."""
    return onnx_name.removeprefix("net.")


def run_training(serving: ServingModel, train: Batch, holdout: Batch, settings: TrainSettings,
                 workdir: Path) -> tuple[TrainOutcome, dict[str, dict[str, np.ndarray]]]:
    """Fine-tune from ``serving``'s checkpoint; write model.onnx and checkpoint into ``workdir``.

    Returns the outcome and the per-part deltas (trained minus starting values of every trainable
    parameter, keyed by bank parameter name).
    """
    outcome = TrainOutcome(started=time.time(), samples=len(train), holdout_samples=len(holdout))
    t0 = time.perf_counter()
    folder = serving.bundle_dir / serving.manifest.training["folder"]
    trainer = OrtTrainer(folder, checkpoint=serving.checkpoint_path)
    trainer.set_learning_rate(settings.learning_rate)
    trainable = set(trainer.trainable_names())
    start = {n: trainer.parameter(n) for n in trainable}
    # Seeded by the run's position (generation, samples): the same state and samples give the same delta.
    last_id = int(train.ids[-1]) if len(train) else 0
    rng = np.random.default_rng([settings.seed, serving.generation, len(train), last_id])
    losses: list[float] = []
    for _ in range(settings.epochs):
        order = rng.permutation(len(train))
        for i in range(0, len(order), settings.batch_size):
            idx = order[i : i + settings.batch_size]
            ts = time.perf_counter()
            loss = trainer.train_step(train.x[idx], train.y[idx])
            outcome.step_seconds.append(time.perf_counter() - ts)
            if not math.isfinite(loss):
                outcome.reason = f"training diverged (loss {loss}); the serving model is unchanged"
                outcome.seconds = time.perf_counter() - t0
                return outcome, {}
            losses.append(loss)
    outcome.steps = len(losses)
    if losses:
        outcome.loss_first, outcome.loss_last = losses[0], losses[-1]
    trainer.export_inference(workdir / "model.onnx", [serving.manifest.output["name"]])
    trainer.save(workdir / "checkpoint")

    deltas: dict[str, dict[str, np.ndarray]] = {}
    for part_id, names in part_params(serving).items():
        part = {bank_name(n): (trainer.parameter(n) - start[n]).astype(np.float32) for n in names if n in trainable}
        if part:
            deltas[part_id] = part
    if any(not np.isfinite(v).all() for p in deltas.values() for v in p.values()):
        outcome.reason = "non-finite parameters after training; the serving model is unchanged"
        return outcome, {}
    outcome.seconds = time.perf_counter() - t0
    return outcome, deltas


def new_delta_id() -> str:
    return uuid.uuid4().hex

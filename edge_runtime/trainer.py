"""On-device fine-tuning of a serving generation with the bundle's step graph (plain ONNX Runtime), and its delta."""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from eclm.parts import bank_name
from eclm.train_step import StepRunner
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


def open_runner(serving: ServingModel) -> StepRunner:
    """The step graph of ``serving``'s bundle over its parameter arrays (trainable ones are only read)."""
    training = serving.manifest.training
    return StepRunner(serving.bundle_dir / training["step"], serving.weights, training["trainable_params"],
                      threads=serving.threads)


def run_training(serving: ServingModel, train: Batch, holdout: Batch, settings: TrainSettings,
                 stop: threading.Event | None = None
                 ) -> tuple[TrainOutcome, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Fine-tune ``serving``'s parameters on ``train``.

    Returns the outcome, the per-part deltas (trained minus starting values of every trainable
    parameter, keyed by bank parameter name) and the trained parameters (ONNX names); the serving
    arrays are left as they were. ``stop`` set (the runtime is closing) ends the run between batches with
    no deltas.
    """
    outcome = TrainOutcome(started=time.time(), samples=len(train), holdout_samples=len(holdout))
    t0 = time.perf_counter()
    runner = open_runner(serving)
    start = runner.parameters()
    # Seeded by the run's position (generation, samples): the same state and samples give the same delta.
    last_id = int(train.ids[-1]) if len(train) else 0
    rng = np.random.default_rng([settings.seed, serving.generation, len(train), last_id])
    losses: list[float] = []
    for _ in range(settings.epochs):
        order = rng.permutation(len(train))
        for i in range(0, len(order), settings.batch_size):
            if stop is not None and stop.is_set():
                outcome.reason = "stopped: the runtime is closing; the serving model is unchanged"
                outcome.seconds = time.perf_counter() - t0
                return outcome, {}, {}
            idx = order[i : i + settings.batch_size]
            ts = time.perf_counter()
            loss = runner.step(train.x[idx], train.y[idx], settings.learning_rate)
            outcome.step_seconds.append(time.perf_counter() - ts)
            if not math.isfinite(loss):
                outcome.reason = f"training diverged (loss {loss}); the serving model is unchanged"
                outcome.seconds = time.perf_counter() - t0
                return outcome, {}, {}
            losses.append(loss)
    outcome.steps = len(losses)
    if losses:
        outcome.loss_first, outcome.loss_last = losses[0], losses[-1]
    trained = runner.parameters()
    del runner  # its spare buffers and session go now; the trained arrays stay

    deltas: dict[str, dict[str, np.ndarray]] = {}
    for part_id, names in part_params(serving).items():
        part = {bank_name(n): (trained[n] - start[n]).astype(np.float32) for n in names if n in trained}
        if part:
            deltas[part_id] = part
    if any(not np.isfinite(v).all() for p in deltas.values() for v in p.values()):
        outcome.reason = "non-finite parameters after training; the serving model is unchanged"
        return outcome, {}, {}
    outcome.seconds = time.perf_counter() - t0
    return outcome, deltas, trained


def new_delta_id() -> str:
    return uuid.uuid4().hex

"""Which parts train on the device within the profile's training memory budget, and the estimate behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from exporter.costs import SESSION_OVERHEAD_BYTES, PartCost

TRAIN_FOLDER = "training"
BACKWARD_FACTOR = 3.0  # activations kept for backward plus their gradients, per trainable part
# Copies of each trainable parameter while the step graph runs (exporter/step_graph.py, eclm/train_step.py):
# two parameter buffers (the step reads one and writes the other), two per optimizer state slot, the gradient.
TRAINABLE_COPIES = {"adamw": 2 + 2 * 2 + 1, "sgd": 2 + 2 * 1 + 1}
# The runtime's one set of weights, plus what the step graph's session holds while it loads (its own
# copy of the frozen parameters, read from the file, is let go once the shared arrays replace it).
WEIGHT_COPIES = 2


@dataclass(frozen=True)
class TrainingPlan:
    """Which parts train on the device and the estimated memory of doing so."""

    trainable_parts: list[str]
    estimated_bytes: int
    budget_bytes: float


def estimate_training_bytes(
    costs: Mapping[str, PartCost], all_parts: Sequence[str], trainable: Sequence[str], batch_size: int,
    optimizer: str = "adamw",
) -> int:
    """Weights of the whole sub-model, the step's buffers and optimizer state of the trainable parts, and
    the activations the backward pass keeps from the first trainable part on, at ``batch_size``.
    """
    weights = sum(costs[p].param_bytes for p in all_parts)
    step = TRAINABLE_COPIES[optimizer] * sum(costs[p].param_bytes for p in trainable)
    acts = BACKWARD_FACTOR * batch_size * sum(costs[p].activation_bytes for p in trainable)
    return int(WEIGHT_COPIES * weights + step + acts + 2 * SESSION_OVERHEAD_BYTES)


def plan_training(
    costs: Mapping[str, PartCost],
    layers_top_down: Sequence[Sequence[str]],
    all_parts: Sequence[str],
    budget_bytes: float,
    batch_size: int,
    max_layers: int | None = None,
    optimizer: str = "adamw",
) -> TrainingPlan:
    """Train the head, then whole module layers from the last one down, while the estimate fits.

    The stem, the selector's embedding and its gates stay frozen: the routing the sub-model was
    derived for stays valid and the device's importance reports stay comparable over time.
    """
    chosen = ["head"]
    if estimate_training_bytes(costs, all_parts, chosen, batch_size, optimizer) > budget_bytes:
        return TrainingPlan([], 0, budget_bytes)
    for count, layer_parts in enumerate(layers_top_down):
        if max_layers is not None and count >= max_layers:
            break
        trial = [*chosen, *layer_parts]
        if estimate_training_bytes(costs, all_parts, trial, batch_size, optimizer) > budget_bytes:
            break
        chosen = trial
    return TrainingPlan(chosen, estimate_training_bytes(costs, all_parts, chosen, batch_size, optimizer), budget_bytes)

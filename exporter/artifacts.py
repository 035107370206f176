"""Which parts train on the device within the profile's training memory budget, and the estimate behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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

"""Sub-model derivation: a multi-dimensional knapsack over module importance and the device's budgets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from eclm.errors import InfeasibleBudgetError
from eclm.parts import module_id
from exporter.costs import (
    SESSION_OVERHEAD_BYTES,
    PartCost,
    SubModelCost,
    fixed_part_ids,
    module_dims,
    submodel_cost,
)

DIMENSIONS = ("memory_bytes", "flops", "transfer_bytes")
MIN_SHARE = 0.01  # modules the device's data routes less than 1% of a layer's weight to are left out


@dataclass(frozen=True)
class Derivation:
    """The chosen modules per layer, what they are worth and what they cost."""

    selection: list[list[int]]
    importance: list[list[float]]
    total_importance: float
    cost: SubModelCost
    budgets: dict[str, float]


def _fixed_dims(costs: Mapping[str, PartCost], num_layers: int) -> dict[str, float]:
    fixed = {d: 0.0 for d in DIMENSIONS}
    for pid in fixed_part_ids(num_layers):
        for d, v in module_dims(costs[pid]).items():
            fixed[d] += v
    fixed["memory_bytes"] += SESSION_OVERHEAD_BYTES
    return fixed


def _fmt(dims: Mapping[str, float]) -> str:
    return ", ".join(
        f"{d}={v / 2**20:.1f} MiB" if d.endswith("bytes") else f"{d}={v / 1e6:.1f} M" for d, v in dims.items()
    )


def derive(
    costs: Mapping[str, PartCost],
    importance: Sequence[np.ndarray],
    budgets: Mapping[str, float],
    min_share: float = MIN_SHARE,
) -> Derivation:
    """Maximise total importance within every budget; the most important module of each layer is forced in."""
    num_layers = len(importance)
    fixed = _fixed_dims(costs, num_layers)
    candidates: list[tuple[int, int]] = []
    forced: list[tuple[int, int]] = []
    for layer, row in enumerate(importance):
        row = np.asarray(row, dtype=np.float64)
        share = row / row.sum() if row.sum() > 0 else np.full(len(row), 1.0 / len(row))
        top = int(np.argmax(share))
        forced.append((layer, top))
        candidates.extend((layer, i) for i in range(len(row)) if i == top or share[i] >= min_share)

    forced_dims = dict(fixed)
    for layer, i in forced:
        for d, v in module_dims(costs[module_id(layer, i)]).items():
            forced_dims[d] += v
    over = [d for d in DIMENSIONS if forced_dims[d] > budgets[d]]
    if over:
        raise InfeasibleBudgetError(
            "no sub-model fits: the smallest one (fixed parts plus the most important module of each layer) "
            f"costs {_fmt({d: forced_dims[d] for d in over})}, the budget is {_fmt({d: budgets[d] for d in over})}",
            hint="choose a profile with larger budgets, or a smaller model configuration",
        )

    n = len(candidates)
    dims = np.array([[module_dims(costs[module_id(la, i)])[d] for (la, i) in candidates] for d in DIMENSIONS])
    limits = np.array([budgets[d] - fixed[d] for d in DIMENSIONS])
    shares = np.array([float(importance[la][i]) for (la, i) in candidates])
    # A tiny preference for cheaper modules breaks ties deterministically and never outweighs importance.
    scale = np.maximum(dims.max(axis=1, keepdims=True), 1.0)
    objective = -(shares + 1e-6) + 1e-9 * (dims / scale).sum(axis=0)
    lower = np.array([1.0 if c in forced else 0.0 for c in candidates])
    res = milp(
        c=objective,
        constraints=[LinearConstraint(dims / scale, -np.inf, limits / scale[:, 0])],
        integrality=np.ones(n),
        bounds=Bounds(lower, np.ones(n)),
    )
    if not res.success:
        raise InfeasibleBudgetError(f"sub-model knapsack failed: {res.message}", hint="check the budgets")
    chosen = [candidates[j] for j in range(n) if res.x[j] > 0.5]
    selection = [sorted(i for (la, i) in chosen if la == layer) for layer in range(num_layers)]
    cost = submodel_cost(costs, selection)
    return Derivation(
        selection=selection,
        importance=[[float(v) for v in row] for row in importance],
        total_importance=float(sum(importance[la][i] for (la, i) in chosen)),
        cost=cost,
        budgets=dict(budgets),
    )

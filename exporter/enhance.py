"""Cloud training, stage 2: module ability enhancing (sub-tasks, load matrix, 0/1 mask LP, KL fine-tune)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor

from exporter.modular import ModularNet
from exporter.train import Progress, StageResult, accuracy


@torch.no_grad()
def gate_matrix(model: ModularNet, x: Tensor, batch: int = 512) -> list[np.ndarray]:
    """Per layer, the (samples x modules) top-k routing weights of the selector in eval mode."""
    model.eval()
    per_layer: list[list[np.ndarray]] = [[] for _ in model.cfg.layers]
    for i in range(0, len(x), batch):
        gates = model.selector(x[i : i + batch])
        for layer, p in enumerate(gates.probs):
            per_layer[layer].append(p.numpy())
    return [np.concatenate(chunks) for chunks in per_layer]


def group_classes(class_routing: np.ndarray, num_groups: int) -> list[list[int]]:
    """Sub-tasks: classes routed alike are grouped (average-linkage clustering of their gate vectors).

    ECLM groups classes that tend to occur together on one device. With no device statistics in the
    cloud we use routing similarity as the proxy for that: classes the selector already sends to the
    same modules form one sub-task, so that one device's few classes map to few modules.
    """
    from sklearn.cluster import AgglomerativeClustering

    n = class_routing.shape[0]
    k = max(1, min(num_groups, n))
    if k == n:
        return [[c] for c in range(n)]
    labels = AgglomerativeClustering(n_clusters=k, linkage="average").fit_predict(class_routing)
    groups = [sorted(int(c) for c in np.flatnonzero(labels == g)) for g in range(k)]
    return sorted((g for g in groups if g), key=lambda g: g[0])


def load_matrix(gates: np.ndarray, y: np.ndarray, subtasks: list[list[int]]) -> np.ndarray:
    """H[s, i]: mean routing weight of module i over the samples of sub-task s."""
    rows = []
    for classes in subtasks:
        mask = np.isin(y, classes)
        rows.append(gates[mask].mean(axis=0) if mask.any() else np.zeros(gates.shape[1]))
    return np.stack(rows)


def solve_mask(h: np.ndarray, per_subtask: int, min_per_subtask: int) -> np.ndarray:
    """The 0/1 mask M maximising <H, M> with at most ``per_subtask`` modules per sub-task and a cap
    on each module's load (the number of sub-tasks it serves), solved with ``scipy.optimize.milp``.
    """
    s, n = h.shape
    per_subtask = min(per_subtask, n)
    min_per_subtask = min(min_per_subtask, per_subtask)
    cap = max(1, math.ceil(s * per_subtask / n))
    rows_s = np.zeros((s, s * n))
    for a in range(s):
        rows_s[a, a * n : (a + 1) * n] = 1
    rows_m = np.zeros((n, s * n))
    for i in range(n):
        rows_m[i, i::n] = 1
    constraints = [
        LinearConstraint(rows_s, min_per_subtask, per_subtask),
        LinearConstraint(rows_m, 0, cap),
    ]
    res = milp(
        c=-h.reshape(-1) - 1e-9,  # the tiny bonus prefers using a slot over leaving it empty
        constraints=constraints,
        integrality=np.ones(s * n),
        bounds=Bounds(0, 1),
    )
    if not res.success:
        raise RuntimeError(f"module ability LP failed: {res.message}")
    return np.round(res.x).reshape(s, n).astype(np.int8)


@dataclass(frozen=True)
class EnhanceResult:
    """The stage's sub-tasks, masks, and the routing concentration before and after."""

    subtasks: list[list[int]]
    masks: list[list[list[int]]]
    modules_per_subtask_before: float
    modules_per_subtask_after: float
    stage: StageResult


def modules_used(gates: list[np.ndarray], y: np.ndarray, subtasks: list[list[int]], share: float) -> float:
    """Mean over sub-tasks and layers of how many modules carry ``share`` of the sub-task's routing."""
    counts = []
    for g in gates:
        h = load_matrix(g, y, subtasks)
        for row in h:
            ordered = np.sort(row)[::-1] / max(row.sum(), 1e-12)
            counts.append(int(np.searchsorted(np.cumsum(ordered), share) + 1))
    return float(np.mean(counts))


def enhance(
    model: ModularNet,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    generator: torch.Generator,
    progress: Progress | None = None,
) -> EnhanceResult:
    """Group classes into sub-tasks, solve each layer's mask, then fine-tune with CE + KL to the mask."""
    tc = model.cfg.train
    x, y = train
    y_np = y.numpy()
    gates = gate_matrix(model, x)
    num_classes = model.cfg.num_classes
    class_routing = np.stack(
        [
            np.concatenate([g[y_np == c].mean(0) if (y_np == c).any() else np.zeros(g.shape[1]) for g in gates])
            for c in range(num_classes)
        ]
    )
    subtasks = group_classes(class_routing, tc.num_subtasks)
    masks = [solve_mask(load_matrix(g, y_np, subtasks), tc.modules_per_subtask, model.cfg.top_k) for g in gates]
    before = modules_used(gates, y_np, subtasks, 0.9)

    class_to_task = np.zeros(num_classes, dtype=np.int64)
    for t, classes in enumerate(subtasks):
        class_to_task[classes] = t
    mask_t = [torch.from_numpy(m.astype(np.float32)) for m in masks]
    task_of = torch.from_numpy(class_to_task)

    opt = torch.optim.AdamW(model.parameters(), lr=tc.enhance_learning_rate, weight_decay=tc.weight_decay)
    loss_value = float("nan")
    for epoch in range(tc.enhance_epochs):
        model.train()
        model.selector.noise_scale = 0.0
        order = torch.randperm(len(y), generator=generator)
        total, n = 0.0, 0
        for i in range(0, len(y), tc.batch_size):
            idx = order[i : i + tc.batch_size]
            logits, g = model.forward_with_gates(x[idx])
            tasks = task_of[y[idx]]
            kl = logits.new_zeros(())
            for layer, p_clean in enumerate(g.clean):
                allowed = mask_t[layer][tasks]
                target = (p_clean.detach() + 1e-6) * allowed
                target = target / target.sum(1, keepdim=True)
                kl = kl + F.kl_div(torch.log(p_clean + 1e-9), target, reduction="batchmean")
            loss = F.cross_entropy(logits, y[idx]) + tc.lb_weight * g.balance_loss + tc.kl_weight * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        loss_value = total / max(1, n)
        if progress is not None:
            progress("enhance", epoch + 1, tc.enhance_epochs, {"loss": loss_value, "val_acc": accuracy(model, *val)})
    model.eval()
    after = modules_used(gate_matrix(model, x), y_np, subtasks, 0.9)
    stage = StageResult(tc.enhance_epochs, loss_value, accuracy(model, *train), accuracy(model, *val))
    return EnhanceResult(
        subtasks=subtasks,
        masks=[m.tolist() for m in masks],
        modules_per_subtask_before=before,
        modules_per_subtask_after=after,
        stage=stage,
    )

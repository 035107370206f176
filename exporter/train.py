"""Cloud training, stage 1: the modular model end to end on the proxy split (CE + load balancing)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from exporter.data import Dataset
from exporter.modular import ModularNet

Progress = Callable[[str, int, int, dict[str, float]], None]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; returns a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # One thread: results then do not depend on how many cores the machine has (the reduction order
    # of a multi-threaded kernel does), so the same seed gives the same bank; the models are small.
    torch.set_num_threads(1)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def to_tensors(ds: Dataset, mean: list[float], std: list[float]) -> tuple[Tensor, Tensor]:
    """Normalised inputs and labels as tensors."""
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (torch.from_numpy(ds.x) - m) / s, torch.from_numpy(ds.y)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / max(1, len(y))


def noise_schedule(epoch: int, epochs: int, explore_share: float = 0.6) -> float:
    """Gate noise scale: full at the start, linearly to 0 at ``explore_share`` of the epochs, then 0."""
    end = max(1.0, explore_share * epochs)
    return max(0.0, 1.0 - epoch / end)


@dataclass(frozen=True)
class StageResult:
    """What a training stage reached."""

    epochs: int
    final_loss: float
    train_accuracy: float
    val_accuracy: float


def train_end_to_end(
    model: ModularNet,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    generator: torch.Generator,
    progress: Progress | None = None,
) -> StageResult:
    """Stage 1: cross-entropy plus lambda x the selector's load-balancing loss, AdamW, cosine schedule."""
    tc = model.cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    x, y = train
    loss_value = float("nan")
    for epoch in range(tc.epochs):
        model.train()
        model.selector.noise_scale = noise_schedule(epoch, tc.epochs)
        order = torch.randperm(len(y), generator=generator)
        total, n = 0.0, 0
        for i in range(0, len(y), tc.batch_size):
            idx = order[i : i + tc.batch_size]
            logits, gates = model.forward_with_gates(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + tc.lb_weight * gates.balance_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        sched.step()
        loss_value = total / max(1, n)
        if progress is not None:
            progress("train", epoch + 1, tc.epochs, {"loss": loss_value, "val_acc": accuracy(model, *val)})
    model.eval()
    return StageResult(tc.epochs, loss_value, accuracy(model, *train), accuracy(model, *val))

"""Moving weights between the PyTorch model and the bank's per-part numpy tensors."""

from __future__ import annotations

import numpy as np
import torch

from exporter.config import ModelConfig
from exporter.modular import ModularNet, part_prefixes
from module_bank import BankStore


def model_to_parts(model: ModularNet) -> dict[str, dict[str, np.ndarray]]:
    """Split the model's state dict into bank parts, keyed by full state-dict name."""
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    parts: dict[str, dict[str, np.ndarray]] = {}
    claimed: set[str] = set()
    for part_id, prefixes in part_prefixes(model.cfg).items():
        named = {k: v for k, v in state.items() if any(k.startswith(p) for p in prefixes)}
        parts[part_id] = named
        claimed.update(named)
    orphans = sorted(set(state) - claimed)
    if orphans:
        raise RuntimeError(f"state-dict entries belong to no bank part: {orphans[:5]}")
    return parts


def model_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> ModularNet:
    """A ModularNet in eval mode holding ``tensors`` (full state-dict names)."""
    model = ModularNet(cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def model_from_bank(bank: BankStore) -> ModularNet:
    """The cloud model at the bank's current module versions."""
    info = bank.info()
    return model_from_tensors(ModelConfig.from_dict(info.config), bank.read_all())

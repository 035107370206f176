"""The PyTorch arms of the fleet simulator: the cloud model never adapted, FedAvg and HeteroFL (bench/fleet.py)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet import LOCAL_BATCH, LOCAL_EPOCHS, LOCAL_LR, Device


def _torch_train(model: Any, x: np.ndarray, y: np.ndarray, mean: list[float], std: list[float],
                 rng: np.random.Generator) -> list[float]:
    """Local training as on a device: 3 epochs, batch 16, AdamW 1e-3; BatchNorm statistics frozen."""
    import torch
    import torch.nn.functional as F

    xt = (torch.from_numpy(x) - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)
    yt = torch.from_numpy(y)
    model.eval()  # BatchNorm uses its running statistics, as the exported graphs do
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LOCAL_LR)
    step_s = []
    for _ in range(LOCAL_EPOCHS):
        order = rng.permutation(len(y))
        for i in range(0, len(y), LOCAL_BATCH):
            idx = torch.from_numpy(order[i : i + LOCAL_BATCH])
            t = time.perf_counter()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_s.append(time.perf_counter() - t)
    return step_s


def _torch_accuracy(model: Any, x: np.ndarray, y: np.ndarray, mean: list[float], std: list[float]) -> float:
    import torch

    xt = (torch.from_numpy(x) - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        return float((model(xt).argmax(1).numpy() == y).mean())


def _nbytes(state: dict[str, Any]) -> int:
    return int(sum(v.numel() * 4 for k, v in state.items() if v.dtype.is_floating_point))


class CloudArm:
    """``none``: the cloud model as trained, never adapted."""

    name = "none"

    def __init__(self, bank: Path) -> None:
        from exporter.torchio import model_from_bank
        from module_bank import DirectoryBank

        self.model = model_from_bank(DirectoryBank(bank))
        info = DirectoryBank(bank).info()
        self.mean, self.std = info.normalisation["mean"], info.normalisation["std"]

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        return {"uplink": 0.0, "downlink": 0.0}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return _torch_accuracy(self.model, x, y, self.mean, self.std)

    def close(self) -> None:
        pass


class FedAvgArm(CloudArm):
    """``fedavg``: the full model trained on each participating device, averaged by sample count."""

    name = "fedavg"

    def __init__(self, bank: Path, seed: int) -> None:
        super().__init__(bank)
        self.rng = np.random.default_rng(seed)
        self.step_seconds: list[float] = []

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:

        states, weights = [], []
        for d in devices:
            local = copy.deepcopy(self.model)
            self.step_seconds += _torch_train(local, d.x, d.y, self.mean, self.std, self.rng)
            states.append(local.state_dict())
            weights.append(len(d.y))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        merged = {k: (sum(float(wi) * s[k].double() for wi, s in zip(w, states, strict=True)).to(v.dtype)
                      if v.dtype.is_floating_point else v)
                  for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(merged)
        full = float(_nbytes(self.model.state_dict()))
        return {"uplink": full, "downlink": full}


class HeteroFLArm(CloudArm):
    """``heterofl``: nested sub-models by capacity (first modules of each layer), aggregated per module."""

    name = "heterofl"

    def __init__(self, bank: Path, seed: int) -> None:
        super().__init__(bank)
        self.rng = np.random.default_rng(seed)
        self.sizes = [ls.num_modules for ls in self.model.cfg.layers]

    def selection(self, capacity: float) -> list[list[int]]:
        return [list(range(max(1, int(round(n * capacity))))) for n in self.sizes]

    def submodel(self, capacity: float) -> Any:
        from exporter.modular import SubModel

        return SubModel(self.model, self.selection(capacity))

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        sums: dict[str, Any] = {}
        counts: dict[str, float] = {}
        up = 0.0
        full_state = self.model.state_dict()
        for d in devices:
            sub = self.submodel(d.capacity)
            _torch_train(sub, d.x, d.y, self.mean, self.std, self.rng)
            state = sub.state_dict()
            up += _nbytes(state)
            for k, v in state.items():
                key = k if k in full_state else None
                if key is None or not v.dtype.is_floating_point or v.shape != full_state[key].shape:
                    continue  # gates restricted to the sub-model's modules keep the cloud's values
                sums[key] = sums.get(key, 0) + v.double() * len(d.y)
                counts[key] = counts.get(key, 0.0) + len(d.y)
        merged = {k: ((sums[k] / counts[k]).to(v.dtype) if k in sums else v) for k, v in full_state.items()}
        self.model.load_state_dict(merged)
        return {"uplink": up / max(1, len(devices)), "downlink": up / max(1, len(devices))}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return _torch_accuracy(self.submodel(device.capacity), x, y, self.mean, self.std)

"""Cost figures of every bank part (parameters, bytes, FLOPs, activations) and of a sub-model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from eclm.parts import fixed_part_ids, gate_id, module_id
from exporter.modular import ModularNet, param_bytes

# Measured on this project's reference machine: resident memory ONNX Runtime adds for a small
# session on top of the bare weights and activations (allocator arenas, graph, kernels). Used in
# estimates only; every bundle also carries measured figures.
SESSION_OVERHEAD_BYTES = 6 * 2**20
Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]
ACTIVATION_FACTOR = 2.0  # live activations at the peak of a forward pass, in units of the largest output
# Measured on this project's reference machine (docs/benchmarks/export.md): an ONNX Runtime session
# holds about 2.5x the weight bytes at its peak (the graph's copy, packed kernels, the run's buffers).
WEIGHT_COPIES = 2.5


@dataclass(frozen=True)
class PartCost:
    """What one part of the model costs at batch 1."""

    params: int
    param_bytes: int
    flops: int
    activation_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _flops_hook(store: dict[str, int], key: str) -> Hook:
    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = output.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            macs = output.numel() * mod.in_features
        else:
            return
        store[key] = store.get(key, 0) + 2 * int(macs)

    return hook


def _act_hook(store: dict[str, int], key: str) -> Hook:
    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor):
            store[key] = max(store.get(key, 0), output.numel() * output.element_size())

    return hook


def part_costs(model: ModularNet) -> dict[str, PartCost]:
    """Cost of every part of ``model`` (stem, selector pieces, each module, head) at batch 1."""
    cfg = model.cfg
    parts: dict[str, nn.Module] = {"stem": model.stem, "selector.embed": model.selector.embed}
    for layer, gate in enumerate(model.selector.gates):
        parts[gate_id(layer)] = gate
    for layer, ls in enumerate(cfg.layers):
        for i in range(ls.num_modules):
            parts[module_id(layer, i)] = model.module(layer, i)
    parts["head"] = model.head
    flops: dict[str, int] = {}
    acts: dict[str, int] = {}
    handles = []
    for key, mod in parts.items():
        for sub in mod.modules():
            handles.append(sub.register_forward_hook(_flops_hook(flops, key)))
            handles.append(sub.register_forward_hook(_act_hook(acts, key)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((1, *cfg.input_shape))
            gates = model.selector(x)
            h = model.stem(x)
            for layer, spec in enumerate(cfg.layers):
                # every module runs once for its figures
                outs = [model.module(layer, i)(h) for i in range(spec.num_modules)]
                h = outs[int(gates.probs[layer][0].argmax())]
            model.head(h)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return {
        key: PartCost(
            params=int(sum(p.numel() for p in mod.parameters())),
            param_bytes=param_bytes(mod),
            flops=flops.get(key, 0),
            activation_bytes=acts.get(key, 0),
        )
        for key, mod in parts.items()
    }


@dataclass(frozen=True)
class SubModelCost:
    """Estimated cost of a sub-model in the knapsack's dimensions."""

    params: int
    param_bytes: int
    flops: int
    memory_bytes: int
    transfer_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def dims(self) -> dict[str, float]:
        return {"memory_bytes": self.memory_bytes, "flops": self.flops, "transfer_bytes": self.transfer_bytes}


def module_dims(cost: PartCost) -> dict[str, float]:
    """A module's additive contribution to each knapsack dimension."""
    return {
        "memory_bytes": WEIGHT_COPIES * cost.param_bytes + ACTIVATION_FACTOR * cost.activation_bytes,
        "flops": float(cost.flops),
        "transfer_bytes": float(cost.param_bytes),
    }


def submodel_cost(costs: Mapping[str, PartCost], selection: Sequence[Sequence[int]]) -> SubModelCost:
    """Estimated cost of the sub-model with ``selection`` (module indices per layer)."""
    ids = fixed_part_ids(len(selection)) + [
        module_id(layer, i) for layer, idx in enumerate(selection) for i in idx
    ]
    chosen = [costs[i] for i in ids]
    pbytes = sum(c.param_bytes for c in chosen)
    act = sum(c.activation_bytes for c in chosen)
    return SubModelCost(
        params=sum(c.params for c in chosen),
        param_bytes=pbytes,
        flops=sum(c.flops for c in chosen),
        memory_bytes=int(WEIGHT_COPIES * pbytes + ACTIVATION_FACTOR * act + SESSION_OVERHEAD_BYTES),
        transfer_bytes=pbytes,
    )

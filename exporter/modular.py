"""The modular network: stem, module layers of interchangeable modules, a unified selector, a head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eclm.parts import HEAD, SELECTOR_EMBED, STEM, gate_id, module_id, prefixes
from exporter.config import LayerSpec, ModelConfig

NEG_LARGE = -1e9  # stands in for -inf in masked logits; keeps softmax and its gradient finite


class ConvBN(nn.Module):
    """Convolution then batch normalisation (exported with frozen running statistics)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class Shortcut(nn.Module):
    """The block's bypass: identity, or a 1x1 projection where shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.proj = ConvBN(cin, cout, 1, stride) if (cin != cout or stride != 1) else None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.proj is None else self.proj(x)


class ShrunkBlock(nn.Module):
    """A ResNet basic block with fewer inner channels; same input and output shapes as the full block."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, mid, 3, stride)
        self.conv2 = ConvBN(mid, cout, 3, 1)
        self.shortcut = Shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResidualModule(nn.Module):
    """A residual module: the shortcut alone, i.e. "skip this layer"."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.shortcut = Shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x))


def make_module(spec: LayerSpec, width: float) -> nn.Module:
    """One module of a layer: shrunk block of ``width`` x out channels, or residual when width is 0."""
    if width <= 0.0:
        return ResidualModule(spec.in_channels, spec.out_channels, spec.stride)
    mid = max(1, int(round(spec.out_channels * width)))
    return ShrunkBlock(spec.in_channels, spec.out_channels, mid, spec.stride)


class Stem(nn.Module):
    """The fixed input block before the first module layer."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = ConvBN(cin, cout, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x))


class Head(nn.Module):
    """Global pooling and the classifier."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Embedding(nn.Module):
    """The selector's small embedding network: input -> feature vector."""

    def __init__(self, cin: int, channels: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, channels, 3, padding=1)
        self.fc = nn.Linear(channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        return F.relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)))


def topk_softmax(logits: Tensor, k: int) -> Tensor:
    """Softmax over the k largest logits of each row; the others get probability 0."""
    n = logits.shape[-1]
    if k >= n:
        return torch.softmax(logits, dim=-1)
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:].detach()
    masked = torch.where(logits >= threshold, logits, torch.full_like(logits, NEG_LARGE))
    return torch.softmax(masked, dim=-1)


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation, the load-balancing penalty of sparsely gated mixtures."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


@dataclass
class GateOutput:
    """What the selector says about one batch, per module layer."""

    probs: list[Tensor]  # (B, N_l) top-k sparse routing weights
    clean: list[Tensor]  # (B, N_l) dense softmax of the clean logits (for the KL stage)
    balance_loss: Tensor


class Selector(nn.Module):
    """The unified module selector: one embedding, one noisy top-k gate per module layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.noise_epsilon = cfg.noise_epsilon
        # Training anneals this to 0 so that the routing seen at the end of training is the one
        # used at inference; a learned noise scale otherwise grows to please the load loss.
        self.noise_scale = 1.0
        self.embed = Embedding(cfg.input_shape[0], cfg.selector_channels, cfg.embed_dim)
        self.gates = nn.ModuleList(nn.Linear(cfg.embed_dim, ls.num_modules) for ls in cfg.layers)
        noise = [nn.Linear(cfg.embed_dim, ls.num_modules) for ls in cfg.layers]
        for lin in noise:
            nn.init.zeros_(lin.weight)
            nn.init.constant_(lin.bias, -3.0)  # softplus(-3) ~ 0.05: exploration noise starts small
        self.noise = nn.ModuleList(noise)

    def forward(self, x: Tensor) -> GateOutput:
        e = self.embed(x)
        probs: list[Tensor] = []
        clean_probs: list[Tensor] = []
        balance = x.new_zeros(())
        for gate, noise in zip(self.gates, self.noise, strict=True):
            clean = gate(e)
            clean_probs.append(torch.softmax(clean, dim=-1))
            k = min(self.top_k, clean.shape[-1])
            if self.training and self.noise_scale > 0:
                std = (F.softplus(noise(e)) + self.noise_epsilon) * self.noise_scale
                noisy = clean + torch.randn_like(clean) * std
                p = topk_softmax(noisy, k)
                load = _prob_in_top_k(clean, noisy, std, k)
                balance = balance + cv_squared(p.sum(0)) + cv_squared(load)
            else:
                p = topk_softmax(clean, k)
                if self.training:
                    balance = balance + cv_squared(p.sum(0))
            probs.append(p)
        return GateOutput(probs=probs, clean=clean_probs, balance_loss=balance)


def _prob_in_top_k(clean: Tensor, noisy: Tensor, std: Tensor, k: int) -> Tensor:
    """Smooth per-module load: the probability each module stays in the top-k under fresh noise."""
    n = noisy.shape[-1]
    if k >= n:
        return torch.ones(n, device=noisy.device) * noisy.shape[0]
    top = torch.topk(noisy, k + 1, dim=-1).values
    threshold_in = top[:, k : k + 1]
    threshold_out = top[:, k - 1 : k]
    is_in = noisy > threshold_in
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_if_in = normal.cdf((clean - threshold_in) / std)
    prob_if_out = normal.cdf((clean - threshold_out) / std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


class ModuleLayer(nn.Module):
    """A layer of interchangeable modules whose outputs are summed, weighted by the gate.

    With ``sparse`` (the cloud model) a module that no sample of the batch is routed to is not run,
    as in sparsely gated mixtures; exported sub-models run densely (a graph has no data-dependent
    branches) over their few modules.
    """

    def __init__(self, modules: Mapping[str, nn.Module], sparse: bool = False) -> None:
        super().__init__()
        self.mods = nn.ModuleDict(modules)
        self.sparse = sparse

    def forward(self, h: Tensor, weights: Tensor) -> Tensor:
        out = h.new_zeros(())
        used = (weights != 0).any(dim=0).tolist() if self.sparse else None
        for j, mod in enumerate(self.mods.values()):
            if used is not None and not used[j]:
                continue
            out = out + weights[:, j].reshape(-1, 1, 1, 1) * mod(h)
        return out


class ModularNet(nn.Module):
    """The cloud model: stem, L module layers of N modules, unified selector, head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = Stem(cfg.input_shape[0], cfg.stem_channels)
        self.selector = Selector(cfg)
        self.layers = nn.ModuleList(
            ModuleLayer({f"m{i}": make_module(ls, w) for i, w in enumerate(ls.widths)}, sparse=True)
            for ls in cfg.layers
        )
        self.head = Head(cfg.layers[-1].out_channels, cfg.num_classes)

    def forward_with_gates(self, x: Tensor) -> tuple[Tensor, GateOutput]:
        gates = self.selector(x)
        h = self.stem(x)
        for layer, w in zip(self.layers, gates.probs, strict=True):
            h = layer(h, w)
        return self.head(h), gates

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_gates(x)[0]

    def module(self, layer: int, index: int) -> nn.Module:
        mods = self.layers[layer].mods
        assert isinstance(mods, nn.ModuleDict)
        return mods[f"m{index}"]


class SubSelector(nn.Module):
    """The selector of a sub-model: the shared embedding and gates restricted to the chosen modules."""

    def __init__(self, embed: nn.Module, gates: list[nn.Linear]) -> None:
        super().__init__()
        self.embed = embed
        self.gates = nn.ModuleList(gates)


class SubModel(nn.Module):
    """A device's sub-model: the selected modules of every layer, with the gate restricted to them."""

    def __init__(self, full: ModularNet, selection: Sequence[Sequence[int]]) -> None:
        super().__init__()
        cfg = full.cfg
        if len(selection) != len(cfg.layers) or any(len(s) == 0 for s in selection):
            raise ValueError("a sub-model needs at least one module in every layer")
        self.top_k = cfg.top_k
        self.selection = [sorted(int(i) for i in s) for s in selection]
        self.stem = _clone(full.stem)
        gates: list[nn.Linear] = []
        for layer, idx in enumerate(self.selection):
            src: nn.Linear = full.selector.gates[layer]  # type: ignore[assignment]
            g = nn.Linear(src.in_features, len(idx))
            with torch.no_grad():
                g.weight.copy_(src.weight[idx])
                g.bias.copy_(src.bias[idx])
            gates.append(g)
        self.selector = SubSelector(_clone(full.selector.embed), gates)
        self.layers = nn.ModuleList(
            ModuleLayer({f"m{i}": _clone(full.module(layer, i)) for i in idx})
            for layer, idx in enumerate(self.selection)
        )
        self.head = _clone(full.head)

    def forward(self, x: Tensor) -> Tensor:
        e = self.selector.embed(x)
        h = self.stem(x)
        for gate, layer in zip(self.selector.gates, self.layers, strict=True):
            logits = gate(e)
            w = topk_softmax(logits, min(self.top_k, logits.shape[-1]))
            h = layer(h, w)
        return self.head(h)


class SelectorGraph(nn.Module):
    """The full selector as a stand-alone graph: input -> routing weights over every module."""

    def __init__(self, full: ModularNet) -> None:
        super().__init__()
        self.top_k = full.cfg.top_k
        self.embed = _clone(full.selector.embed)
        self.gates = nn.ModuleList(_clone(g) for g in full.selector.gates)
        self.sizes = [ls.num_modules for ls in full.cfg.layers]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        e = self.embed(x)
        return tuple(topk_softmax(g(e), min(self.top_k, n)) for g, n in zip(self.gates, self.sizes, strict=True))


def _clone(mod: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(mod)


def part_prefixes(cfg: ModelConfig) -> dict[str, list[str]]:
    """Every bank part id and the state-dict prefixes that belong to it."""
    ids = [STEM, SELECTOR_EMBED]
    for layer, ls in enumerate(cfg.layers):
        ids += [gate_id(layer), *(module_id(layer, i) for i in range(ls.num_modules))]
    return {pid: prefixes(pid) for pid in [*ids, HEAD]}


def count_params(mod: nn.Module) -> int:
    return int(sum(p.numel() for p in mod.parameters()))


def param_bytes(mod: nn.Module) -> int:
    """Bytes of parameters and buffers (running statistics), as stored at fp32."""
    return int(sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())))

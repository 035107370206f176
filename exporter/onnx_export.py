"""ONNX export of sub-models and the selector, with normalisation baked into the graph.

We use the TorchScript exporter (``dynamo=False``) at opset 17 for the serving graphs: it keeps every
parameter as a graph initializer named after its state-dict key, which is what the device needs to
hand its own (trained) arrays to the session by name and to map its deltas back to bank modules,
and the training step graph (``exporter/step_graph.py``) uses the same names. Batch normalisation
is exported as its eval-mode arithmetic (see :class:`FrozenBatchNorm2d`) and constant folding is off,
so its scale and shift stay separate, replaceable initializers rather than being folded into one
constant.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

OPSET = 17
INPUT_NAME = "input"


class FrozenBatchNorm2d(nn.Module):
    """Batch normalisation with frozen running statistics, written as a per-channel scale and shift.

    Fine-tuning on a device sees small, skewed batches: batch statistics would be noisy and would
    rewrite the running statistics. The eval-mode arithmetic keeps training and inference the same
    function and the statistics fixed, while ``weight`` and ``bias`` stay trainable. State-dict names
    match ``nn.BatchNorm2d`` (without ``num_batches_tracked``).
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
            raise ValueError("only affine BatchNorm with running statistics can be frozen")
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = float(bn.eps)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` below ``module`` (in place) by :class:`FrozenBatchNorm2d`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child))
        else:
            freeze_batchnorm(child)
    return module


class Normalised(nn.Module):
    """Wraps a network so that it takes raw inputs: (x - mean) / std per channel, then the network."""

    norm_mean: Tensor
    norm_std: Tensor

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = freeze_batchnorm(net)
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.norm_mean) / self.norm_std)


def export_onnx(module: nn.Module, path: Path, input_shape: tuple[int, ...], output_names: list[str]) -> None:
    """Export ``module`` (eval mode) to ``path`` with a dynamic batch axis."""
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32)
    axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            export_params=True,
            # Initializers as inputs turns off the exporter's value-based de-duplication, which
            # would merge equal tensors (e.g. freshly initialised BatchNorm scales) under one
            # name and break per-parameter training; they are turned back into plain
            # initializers just below.
            keep_initializers_as_inputs=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(path))
    onnx.checker.check_model(model)


def initializer_names(path: Path) -> list[str]:
    """Names of the graph's initializers (its parameters and buffers)."""
    return [t.name for t in onnx.load(str(path)).graph.initializer]

"""The training step as one plain ONNX graph: forward, cross-entropy, autograd's backward, the optimizer.

``make_fx`` traces a function built on ``torch.func.grad_and_value`` into ATen operations (the batch
size stays symbolic), and the dynamo exporter turns that trace into default-domain ONNX at opset 18.
The step takes a batch, its labels, the learning rate, the trainable parameters and the optimizer
state, and returns the loss, the logits, the new parameters and the new optimizer state (names in
:mod:`eclm.train_step`). Frozen parameters are initializers named as in ``model.onnx``, so the
runtime can hand the serving session's arrays to both graphs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from eclm.train_step import INPUT, LABELS, LEARNING_RATE, LOGITS, LOSS, NEW, param_input, state_input
from exporter import step_cache
from exporter.conv_grad import convolution_backward

STEP_OPSET = 18


@dataclass(frozen=True)
class OptimizerSpec:
    """The update rule baked into the step graph (PyTorch's semantics; the learning rate is an input)."""

    name: str = "adamw"  # "adamw" or "sgd" (with momentum)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6  # ONNX Runtime's AdamW default, as bundles had before; steadier than 1e-8 on tiny gradients
    weight_decay: float = 0.0  # fine-tuning a few epochs on a device: no decay towards zero
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.name!r}; known: adamw, sgd")

    @property
    def slots(self) -> tuple[str, ...]:
        """Per-parameter state tensors, each of its parameter's shape."""
        return ("exp_avg", "exp_avg_sq") if self.name == "adamw" else ("momentum",)

    @property
    def scalars(self) -> tuple[str, ...]:
        """Scalar state tensors (the step count of AdamW's bias correction)."""
        return ("step",) if self.name == "adamw" else ()

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> OptimizerSpec:
        """The spec a manifest's ``training.optimizer`` describes."""
        d = dict(data)
        if "betas" in d:
            d["betas"] = (float(d["betas"][0]), float(d["betas"][1]))
        return OptimizerSpec(**d)

    def to_dict(self) -> dict[str, Any]:
        if self.name == "sgd":
            return {"name": self.name, "momentum": self.momentum, "weight_decay": self.weight_decay}
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def prepare(self, scalars: list[Tensor], lr: Tensor) -> dict[str, Tensor]:
        """Per-step values every parameter's update shares (computed once in the graph)."""
        if self.name == "sgd":
            return {"lr": lr}
        b1, b2 = self.betas
        t = scalars[0] + 1.0
        return {
            "decay": 1.0 - lr * self.weight_decay,
            "step_size": lr / (1.0 - torch.pow(b1, t)),
            "bc2_sqrt": torch.sqrt(1.0 - torch.pow(b2, t)),
        }

    def update(self, p: Tensor, g: Tensor, slots: list[Tensor],
               shared: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One parameter's new value and new slots, written as ``torch.optim`` computes them."""
        if self.name == "sgd":
            if self.weight_decay:
                g = g + self.weight_decay * p
            buf = self.momentum * slots[0] + g
            return p - shared["lr"] * buf, [buf]
        b1, b2 = self.betas
        p = p * shared["decay"]
        m = slots[0] + (1.0 - b1) * (g - slots[0])
        v = slots[1] * b2 + (1.0 - b2) * g * g
        denom = torch.sqrt(v) / shared["bc2_sqrt"] + self.eps
        return p - shared["step_size"] * m / denom, [m, v]

    def gradient_from_state(self, slots: list[np.ndarray], before: np.ndarray) -> np.ndarray:
        """The gradient of the first step, recovered from the state that step wrote (linear in it)."""
        if self.name == "sgd":
            return slots[0] - self.weight_decay * before
        return slots[0] / (1.0 - self.betas[0])

    def parameter_floor(self, learning_rate: float, steps: int) -> float:
        """Extra absolute tolerance on parameters after ``steps`` steps. AdamW moves each parameter by
        about ``lr * g / (|g| + eps)``, which float noise in a gradient near ``eps`` flips; the gradients
        themselves are checked tightly (see ``gradient_from_state``).
        """
        return 0.05 * learning_rate * steps if self.name == "adamw" else 0.0

    def torch_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The same rule as a ``torch.optim`` optimizer: the reference the export is checked against."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   foreach=False)
        return torch.optim.AdamW(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                 foreach=False)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy from log-softmax and a gather (``nll_loss``'s ONNX gradient is not exact)."""
    logp = torch.log_softmax(logits, dim=1)
    return -torch.gather(logp, 1, labels.unsqueeze(1)).squeeze(1).mean()


def _step_function(module: nn.Module, trainable: Sequence[str], frozen: Sequence[str],
                   opt: OptimizerSpec) -> Callable[..., tuple[Tensor, ...]]:
    from torch.func import functional_call, grad_and_value

    n_t, n_s, n_c = len(trainable), len(opt.slots), len(opt.scalars)

    def loss_fn(tp: dict[str, Tensor], fp: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(module, {**tp, **fp}, (x,))
        return cross_entropy(logits, y), logits

    def step(x: Tensor, y: Tensor, lr: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        params = dict(zip(trainable, flat[:n_t], strict=True))
        slots = flat[n_t : n_t + n_s * n_t]
        scalars = list(flat[n_t + n_s * n_t : n_t + n_s * n_t + n_c])
        fixed = dict(zip(frozen, flat[n_t + n_s * n_t + n_c :], strict=True))
        grads, (loss, logits) = grad_and_value(loss_fn, has_aux=True)(params, fixed, x, y)
        new_params: list[Tensor] = []
        new_slots: list[list[Tensor]] = [[] for _ in opt.slots]
        shared = opt.prepare(scalars, lr)
        for i, name in enumerate(trainable):
            p, s = opt.update(params[name], grads[name], [slots[k * n_t + i] for k in range(n_s)], shared)
            new_params.append(p)
            for k in range(n_s):
                new_slots[k].append(s[k])
        new_scalars = [c + 1.0 for c in scalars]
        return (loss, logits, *new_params, *[t for ks in new_slots for t in ks], *new_scalars)

    return step


class _Step(nn.Module):
    """The traced step with its frozen tensors as buffers: the exporter makes those initializers."""

    def __init__(self, graph: nn.Module, frozen: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.count = len(frozen)
        for i, value in enumerate(frozen.values()):
            self.register_buffer(step_cache.frozen_name(i), value.detach().clone())

    def forward(self, x: Tensor, y: Tensor, lr: Tensor, flat: list[Tensor]) -> tuple[Tensor, ...]:
        return self.graph(x, y, lr, *flat, *[getattr(self, step_cache.frozen_name(i)) for i in range(self.count)])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress prints and warnings are not the user's concern (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def step_io_names(trainable: Sequence[str], opt: OptimizerSpec) -> tuple[list[str], list[str]]:
    """Input and output names of the step graph, in the order of the traced function."""
    state = [state_input(slot, n) for slot in opt.slots for n in trainable] + [state_input(c) for c in opt.scalars]
    inputs = [INPUT, LABELS, LEARNING_RATE, *[param_input(n) for n in trainable], *state]
    outputs = [LOSS, LOGITS, *[NEW + param_input(n) for n in trainable], *[NEW + s for s in state]]
    return inputs, outputs


def export_step(module: nn.Module, trainable: Sequence[str], opt: OptimizerSpec, path: Path,
                input_shape: tuple[int, ...], num_classes: int, batch: int = 4) -> None:
    """Trace and export the training step of ``module`` (eval mode) with ``trainable`` parameters to ``path``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    module.eval()
    state = {k: v.detach() for k, v in module.state_dict().items()}
    missing = [n for n in trainable if n not in state]
    if missing:
        raise ValueError(f"trainable parameters not in the model: {missing[:3]}")
    frozen = [n for n in state if n not in set(trainable)]
    x = torch.zeros((batch, *input_shape), dtype=torch.float32)
    y = torch.arange(batch, dtype=torch.int64) % num_classes
    lr = torch.tensor(1e-3, dtype=torch.float32)
    tp = [state[n].clone() for n in trainable]
    flat = [*tp, *[torch.zeros_like(p) for _ in opt.slots for p in tp], *[torch.zeros(()) for _ in opt.scalars]]
    digest = step_cache.key(module, state, trainable, frozen, [opt, input_shape, num_classes, batch, STEP_OPSET])
    model = step_cache.recall(digest, [state[n] for n in frozen])
    if model is None:
        fn = _step_function(module, trainable, frozen, opt)
        with _quiet():
            traced = make_fx(fn, tracing_mode="symbolic")(x, y, lr, *flat, *[state[n] for n in frozen])
            wrapper = _Step(traced, {n: state[n] for n in frozen})
            dim = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                wrapper, (x, y, lr, flat), dynamo=True, opset_version=STEP_OPSET, optimize=False,
                dynamic_shapes=({0: dim}, {0: dim}, None, [None] * len(flat)),
                custom_translation_table={torch.ops.aten.convolution_backward.default: convolution_backward},
            )
        assert program is not None
        model = program.model_proto
        step_cache.remember(digest, model, len(frozen))
    inputs, outputs = step_io_names(trainable, opt)
    _rename(model, inputs, outputs, {step_cache.frozen_name(i): n for i, n in enumerate(frozen)})
    _strip(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def _strip(model: onnx.ModelProto) -> None:
    """Drop what only a debugger reads (per-node stack traces, inferred shapes): a tenth of the size."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.metadata_props[:]


def _rename(model: onnx.ModelProto, inputs: list[str], outputs: list[str], inits: dict[str, str]) -> None:
    """Give the exported graph's inputs, outputs and frozen initializers their contract names."""
    graph = model.graph
    have_in = [i.name for i in graph.input]
    have_out = [o.name for o in graph.output]
    if len(have_in) != len(inputs) or len(have_out) != len(outputs):
        raise ValueError(f"the exported step has {len(have_in)} inputs and {len(have_out)} outputs; "
                         f"expected {len(inputs)} and {len(outputs)}")
    mapping = {**dict(zip(have_in, inputs, strict=True)), **dict(zip(have_out, outputs, strict=True)), **inits}
    taken = {v for n in graph.node for v in [*n.input, *n.output]} | {t.name for t in graph.initializer}
    clash = (set(mapping.values()) & taken) - set(mapping)
    if clash:
        raise ValueError(f"the exported step already uses the names {sorted(clash)[:3]}")

    def rn(name: str) -> str:
        return mapping.get(name, name)

    for node in graph.node:
        node.input[:] = [rn(n) for n in node.input]
        node.output[:] = [rn(n) for n in node.output]
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            v.name = rn(v.name)
    for t in graph.initializer:
        t.name = rn(t.name)

"""Traced training steps kept per architecture: exports of the same structure skip the trace.

Tracing and exporting a step graph takes tens of seconds, and most of a fleet's sub-models share an
architecture (the same module shapes, selected from other module indices). The exported graph does
not depend on parameter values: trainable parameters and optimizer state are inputs, frozen tensors
are initializers named ``frozen_<i>`` by position. So a graph traced once serves every sub-model of
the same structure once its ``frozen_<i>`` initializers carry that sub-model's values. The key is
the module tree (child names of selected modules made index-free), the shapes and dtypes of every
tensor in order, which positions train, the optimizer and the traced shapes. The export check
against autograd still runs on every bundle.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
from onnx import numpy_helper
from torch import Tensor, nn

CAPACITY = 16  # serialized graphs kept (a digits step graph is ~0.5 MB, a resnet18 one ~50 MB)
_graphs: OrderedDict[str, bytes] = OrderedDict()
stats = {"hits": 0, "misses": 0}


def key(module: nn.Module, state: Mapping[str, Tensor], trainable: Sequence[str], frozen: Sequence[str],
        extra: Sequence[Any]) -> str:
    """What the traced graph depends on, as a digest."""
    position = {n: i for i, n in enumerate(state)}
    signature = [re.sub(r"\(m\d+\)", "(m)", repr(module)), list(extra),
                 [(position[n], tuple(state[n].shape), str(state[n].dtype)) for n in trainable],
                 [(tuple(state[n].shape), str(state[n].dtype)) for n in frozen]]
    return hashlib.sha256(repr(signature).encode()).hexdigest()


def frozen_name(i: int) -> str:
    return f"frozen_{i}"


def _holds_every_frozen(model: onnx.ModelProto, count: int) -> bool:
    names = {t.name for t in model.graph.initializer}
    return all(frozen_name(i) in names for i in range(count))


def remember(digest: str, model: onnx.ModelProto, count: int) -> None:
    """Keep a freshly exported (not yet renamed) step graph, if its frozen tensors are plain initializers."""
    if not _holds_every_frozen(model, count):
        return
    _graphs[digest] = model.SerializeToString()
    _graphs.move_to_end(digest)
    while len(_graphs) > CAPACITY:
        _graphs.popitem(last=False)


def recall(digest: str, frozen: Sequence[Tensor]) -> onnx.ModelProto | None:
    """The kept graph of this structure with ``frozen`` as its frozen initializers, or None."""
    data = _graphs.get(digest)
    if data is None:
        stats["misses"] += 1
        return None
    stats["hits"] += 1
    _graphs.move_to_end(digest)
    model = onnx.ModelProto()
    model.ParseFromString(data)
    slots = {t.name: t for t in model.graph.initializer}
    for i, value in enumerate(frozen):
        old = slots[frozen_name(i)]
        old.CopyFrom(numpy_helper.from_array(value.detach().cpu().numpy(), frozen_name(i)))
    return model


def clear() -> None:
    _graphs.clear()

"""The one grammar of bank part ids and parameter names: parse, format and map them into each other.

A bank part is one of ``stem``, ``selector.embed``, ``selector.gate{l}`` (the gate of module layer
``l``), ``L{l}M{i}`` (module ``i`` of module layer ``l``) and ``head``. A parameter has a bank name
(its name in the cloud model's state dict, e.g. ``layers.0.mods.m2.conv.weight``) and, inside an
exported bundle, an ONNX name (the sub-model is wrapped as ``net``: ``net.layers.0.mods.m2.conv.weight``).
The normalisation the export bakes into a graph (``norm_*``) belongs to no bank part; :func:`part_of`
names it ``normalisation``. Nothing here imports torch.
"""

from __future__ import annotations

import re

from eclm.errors import DataError
from eclm.ids import check_environment

HEAD = "head"
STEM = "stem"
SELECTOR_EMBED = "selector.embed"
NORMALISATION = "normalisation"  # the graph's baked-in input normalisation: not a bank part
ONNX_PREFIX = "net."  # the export wraps the sub-model as ``net``

_MODULE = re.compile(r"L(0|[1-9][0-9]*)M(0|[1-9][0-9]*)")
_GATE = re.compile(r"selector\.gate(0|[1-9][0-9]*)")
_HINT = "part ids are stem, selector.embed, selector.gate{l}, L{l}M{i} and head"


def module_id(layer: int, index: int) -> str:
    """The id of module ``index`` of module layer ``layer``."""
    if isinstance(layer, bool) or isinstance(index, bool) or int(layer) < 0 or int(index) < 0:
        raise DataError(f"no module at layer {layer!r}, index {index!r}", hint="layers and indices count from 0")
    return f"L{int(layer)}M{int(index)}"


def gate_id(layer: int) -> str:
    """The id of the selector's gate of module layer ``layer``."""
    if isinstance(layer, bool) or int(layer) < 0:
        raise DataError(f"no gate for layer {layer!r}", hint="layers count from 0")
    return f"selector.gate{int(layer)}"


def is_module_id(part_id: str) -> bool:
    """Whether ``part_id`` names a bank module (``L{l}M{i}``), not a fixed part."""
    return isinstance(part_id, str) and _MODULE.fullmatch(part_id) is not None


def parse_module_id(part_id: str) -> tuple[int, int]:
    """(layer, index) of a module id; a :class:`DataError` for anything else."""
    m = _MODULE.fullmatch(part_id) if isinstance(part_id, str) else None
    if m is None:
        raise DataError(f"{part_id!r} is not a module id", hint="module ids are L{layer}M{index}, e.g. L0M2")
    return int(m.group(1)), int(m.group(2))


def is_gate_id(part_id: str) -> bool:
    """Whether ``part_id`` names the selector's gate of a module layer (``selector.gate{l}``)."""
    return isinstance(part_id, str) and _GATE.fullmatch(part_id) is not None


def parse_gate_id(part_id: str) -> int:
    """The layer of a gate id ``selector.gate{l}``; a :class:`DataError` for anything else."""
    m = _GATE.fullmatch(part_id) if isinstance(part_id, str) else None
    if m is None:
        raise DataError(f"{part_id!r} is not a gate id", hint="gate ids are selector.gate{layer}")
    return int(m.group(1))


def check_part_id(part_id: str) -> str:
    """``part_id`` itself if it is a bank part id; a :class:`DataError` naming the grammar otherwise."""
    if part_id in (STEM, SELECTOR_EMBED, HEAD):
        return part_id
    if is_module_id(part_id) or is_gate_id(part_id):
        return part_id
    raise DataError(f"{part_id!r} is not a part id", hint=_HINT)


def fixed_part_ids(num_layers: int) -> list[str]:
    """Parts every sub-model carries, whatever modules it selects."""
    return [STEM, SELECTOR_EMBED, *[gate_id(i) for i in range(num_layers)], HEAD]


def prefixes(part_id: str) -> list[str]:
    """The bank-name prefixes of the parameters (and buffers) of ``part_id``."""
    if is_module_id(part_id):
        layer, index = parse_module_id(part_id)
        return [f"layers.{layer}.mods.m{index}."]
    if is_gate_id(part_id):
        layer = parse_gate_id(part_id)
        return [f"selector.gates.{layer}.", f"selector.noise.{layer}."]
    return [check_part_id(part_id) + "."]


def onnx_prefixes(part_id: str) -> list[str]:
    """The ONNX-name prefixes of the parameters of ``part_id`` inside a bundle's graphs."""
    return [onnx_name(p) for p in prefixes(part_id)]


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its bank or ONNX name (``normalisation`` for ``norm_*``)."""
    n = bank_name(name)
    if n.startswith("norm_"):
        return NORMALISATION
    fields = n.split(".")
    if len(fields) > 4 and fields[0] == "layers" and fields[2] == "mods" and fields[3].startswith("m"):
        with_id = f"L{fields[1]}M{fields[3][1:]}"
        if is_module_id(with_id):
            return with_id
    if len(fields) > 3 and fields[0] == "selector" and fields[1] in ("gates", "noise"):
        with_id = f"selector.gate{fields[2]}"
        if is_gate_id(with_id):
            return with_id
    for part_id in (STEM, SELECTOR_EMBED, HEAD):
        if n.startswith(part_id + "."):
            return part_id
    raise DataError(f"parameter {name!r} belongs to no bank part", hint=_HINT)


LINE_SEPARATOR = "@"  # a part's environment line: ``L0M2@line-3`` (the shared line is the part id itself)


def line_key(part_id: str, environment: str) -> str:
    """The key of ``part_id``'s line in ``environment`` (the part id itself for the shared line "")."""
    check_part_id(part_id)
    env = check_environment(environment)
    return f"{part_id}{LINE_SEPARATOR}{env}" if env else part_id


def has_lines(part_id: str) -> bool:
    """Whether ``part_id`` has environment lines: every part but the head (it stays with each device)."""
    return part_id != HEAD


def split_line_key(key: str) -> tuple[str, str]:
    """(part id, environment) of a line key; a plain part id is the shared line ("")."""
    part_id, sep, env = key.partition(LINE_SEPARATOR)
    check_part_id(part_id)
    if sep and not env:
        raise DataError(f"{key!r} names no environment after {LINE_SEPARATOR!r}", hint="line keys are PART@ENV")
    return part_id, check_environment(env)


def onnx_name(bank: str) -> str:
    """The ONNX name, inside a bundle, of the parameter the bank calls ``bank``."""
    return ONNX_PREFIX + bank


def bank_name(onnx: str) -> str:
    """The bank's name of a parameter named ``onnx`` in a bundle (a bank name is returned as it is)."""
    return onnx.removeprefix(ONNX_PREFIX)

"""Strict JSON out and in: no NaN or Infinity written (RFC 8259 has none), bounded nesting and numbers read."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

MAX_DEPTH = 32  # arrays and objects inside each other; a batch of images needs 5
MAX_INT_DIGITS = 30  # an integer literal longer than this is refused before Python converts it

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# An integer literal (not the digits of a float) longer than MAX_INT_DIGITS.
_LONG_INT = re.compile(rb"(?<![0-9.eE+-])-?[0-9]{%d,}(?![0-9.eE])" % (MAX_INT_DIGITS + 1))


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity, numpy's too) replaced by None."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes null for non-finite floats and refuses to write NaN or Infinity."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


class JsonLimitError(ValueError):
    """A JSON text nests too deep or carries an integer too long to be data."""


def _without_strings(raw: bytes) -> bytes:
    return _STRING.sub(b'""', raw)


def depth(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw`` (strings skipped), in C-speed passes."""
    return _depth(_without_strings(raw))


def _depth(stripped: bytes) -> int:
    brackets = stripped.translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, dtype=np.uint8)
    opening = (steps == ord("[")) | (steps == ord("{"))
    return int(np.cumsum(np.where(opening, 1, -1)).max())


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not JSON")


def loads(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON: NaN/Infinity (written or by overflow), integers over :data:`MAX_INT_DIGITS` digits
    and nesting deeper than ``max_depth`` raise :class:`JsonLimitError`; malformed text raises
    ``json.JSONDecodeError`` (``UnicodeDecodeError`` for bytes that are not UTF-8).
    """
    data = raw.encode() if isinstance(raw, str) else raw
    stripped = _without_strings(data)
    d = _depth(stripped)
    if d > max_depth:
        raise JsonLimitError(f"nesting {d} levels deep (at most {max_depth})")
    long_int = _LONG_INT.search(stripped)
    if long_int:
        raise JsonLimitError(f"an integer of {len(long_int.group().lstrip(b'-'))} digits "
                             f"(at most {MAX_INT_DIGITS})")
    return json.loads(data, parse_float=_parse_float, parse_constant=_no_constant)

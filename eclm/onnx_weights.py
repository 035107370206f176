"""Reads the initializers (named weights) of an ONNX file with numpy alone: no onnx package, no torch.

The board has ONNX Runtime and numpy but not the ``onnx`` package; ONNX Runtime does not hand a
graph's initializers back. The runtime owns its parameters (one copy, shared by the serving session
and the training step), so it reads them here from the protobuf wire format: ``ModelProto.graph``
(field 7), ``GraphProto.initializer`` (field 5), and of each ``TensorProto`` its dims (1), data type
(2), name (8) and data (``raw_data`` 9, or the typed ``float_data`` 4 / ``int64_data`` 7 fields).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from eclm.errors import BundleError

_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 11: np.float64}  # TensorProto.DataType
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_TYPE, _T_FLOAT, _T_INT32, _T_INT64, _T_NAME, _T_RAW, _T_DOUBLE, _T_LOCATION = 1, 2, 4, 5, 7, 8, 9, 10, 14


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of every field of one message; length-delimited values as views."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire == 1:
            yield number, wire, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 5:
            yield number, wire, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _packed_varints(value: int | memoryview) -> list[int]:
    if isinstance(value, int):
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _tensor(msg: memoryview) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    dtype_code, name, raw = 0, "", None
    typed_field, typed = 0, memoryview(b"")
    for number, _wire, value in _fields(msg):
        if number == _T_DIMS:
            dims.extend(_signed(v) for v in _packed_varints(value))
        elif number == _T_TYPE and isinstance(value, int):
            dtype_code = value
        elif number == _T_NAME and isinstance(value, memoryview):
            name = bytes(value).decode()
        elif number == _T_RAW and isinstance(value, memoryview):
            raw = value
        elif number == _T_LOCATION and value == 1:
            raise ValueError(f"initializer {name or '?'} keeps its data in an external file")
        elif number in (_T_FLOAT, _T_DOUBLE, _T_INT32, _T_INT64):
            if not isinstance(value, memoryview):
                raise ValueError(f"initializer {name or '?'}: unpacked repeated data is not supported")
            typed_field, typed = number, value
    if dtype_code not in _DTYPES:
        raise ValueError(f"initializer {name or '?'} has ONNX data type {dtype_code}, not a supported one")
    dtype = np.dtype(_DTYPES[dtype_code]).newbyteorder("<")
    count = int(np.prod(dims)) if dims else 1
    if raw is not None:
        arr = np.frombuffer(raw, dtype=dtype, count=count)
    elif typed_field in (_T_FLOAT, _T_DOUBLE):
        arr = np.frombuffer(typed, dtype=np.dtype("<f4" if typed_field == _T_FLOAT else "<f8"), count=count)
    elif typed_field in (_T_INT32, _T_INT64):
        arr = np.asarray([_signed(v) for v in _packed_varints(typed)], dtype=np.int64)[:count]
    elif count == 0:
        arr = np.zeros(0, dtype=dtype)
    else:
        raise ValueError(f"initializer {name or '?'} holds no data")
    # A copy: aligned, writable, owned, and independent of the file's buffer.
    return name, np.array(arr.astype(dtype.newbyteorder("="), copy=False).reshape(dims), copy=True)


def _parse(model: memoryview) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for number, _w, graph in _fields(model):
        if number != _MODEL_GRAPH or not isinstance(graph, memoryview):
            continue
        for gnum, _gw, init in _fields(graph):
            if gnum == _GRAPH_INITIALIZER and isinstance(init, memoryview):
                name, arr = _tensor(init)
                out[name] = arr
    return out


def _raw_spans(model: memoryview) -> dict[str, tuple[int, int]]:
    """(offset, length) in ``model`` of each initializer's ``raw_data``, by name."""
    base = np.frombuffer(model, np.uint8).ctypes.data

    def at(view: memoryview) -> int:
        return int(np.frombuffer(view, np.uint8).ctypes.data - base) if len(view) else -1

    spans: dict[str, tuple[int, int]] = {}
    for number, _w, graph in _fields(model):
        if number != _MODEL_GRAPH or not isinstance(graph, memoryview):
            continue
        for gnum, _gw, init in _fields(graph):
            if gnum != _GRAPH_INITIALIZER or not isinstance(init, memoryview):
                continue
            name, raw = "", None
            for tnum, _tw, value in _fields(init):
                if tnum == _T_NAME and isinstance(value, memoryview):
                    name = bytes(value).decode()
                elif tnum == _T_RAW and isinstance(value, memoryview):
                    raw = value
            if raw is not None and len(raw):
                spans[name] = (at(raw), len(raw))
    return spans


def model_with_initializers(path: str | os.PathLike[str], values: dict[str, np.ndarray]) -> bytes:
    """The ONNX model at ``path`` as bytes, with ``values`` written over its initializers of those names.

    Each value must have the byte size of the initializer it replaces (same shape and type) and the file must
    hold it as ``raw_data`` (as the exporter writes it); anything else is a :class:`BundleError`.
    """
    data = bytearray(Path(path).read_bytes())
    view = memoryview(data)
    try:
        spans = _raw_spans(view)
        for name, array in values.items():
            if name not in spans:
                continue  # not an initializer of this graph (a variant holds fewer)
            offset, length = spans[name]
            raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(raw) != length:
                raise ValueError(f"initializer {name} holds {length} bytes, the new value {len(raw)}")
            data[offset : offset + length] = raw
    except ValueError as exc:
        raise BundleError(f"cannot write weights into {os.fspath(path)}: {exc}", hint="re-export the bundle") from exc
    finally:
        view.release()
    return bytes(data)


def read_initializers(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every initializer of the ONNX model at ``path`` as an owned numpy array, by name."""
    problem = ""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _parse(view)  # its views of the mapping are gone when it returns
            except ValueError as exc:
                problem = str(exc)  # the traceback (and its views) ends with this block
            finally:
                view.release()
    except (OSError, ValueError) as exc:
        problem = str(exc)
    raise BundleError(f"cannot read the weights of {os.fspath(path)}: {problem}", hint="re-export the bundle")

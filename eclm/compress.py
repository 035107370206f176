"""Tensor compression for the wire: fp16 or int8 with per-tensor scales, optional top-k sparsity, zlib/lzma.

A codec is named like ``int8+zlib`` or ``fp16+top0.1+lzma``: a precision (``fp32``, ``fp16``,
``int8``), optionally ``topF`` (keep the fraction F of entries largest in magnitude), and a general
compressor (``none``, ``zlib``, ``lzma``). Decoding always returns dense float32 arrays.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from eclm.errors import DataError

PRECISIONS = ("fp32", "fp16", "int8")
COMPRESSORS = ("none", "zlib", "lzma")
MAX_DECOMPRESSED = 512 * 2**20  # refuse decompression bombs
MAX_ELEMENTS = MAX_DECOMPRESSED // 4  # what the declared shapes may add up to (a top-k payload is expanded to them)


@dataclass(frozen=True)
class Codec:
    """A parsed codec name."""

    precision: str = "fp32"
    top: float | None = None
    compressor: str = "zlib"

    @staticmethod
    def parse(name: str) -> Codec:
        precision, top, compressor = "fp32", None, "none"
        for part in name.split("+"):
            if part in PRECISIONS:
                precision = part
            elif part in COMPRESSORS:
                compressor = part
            elif part.startswith("top"):
                try:
                    top = float(part[3:])
                except ValueError:
                    top = -1.0
                if not 0 < top <= 1:
                    raise DataError(f"codec {name!r}: top fraction must be in (0, 1]", hint="e.g. int8+top0.1+zlib")
            else:
                raise DataError(f"unknown codec part {part!r} in {name!r}",
                                hint=f"precision {PRECISIONS}, optional topF, compressor {COMPRESSORS}")
        return Codec(precision, top, compressor)

    @property
    def name(self) -> str:
        parts = [self.precision] + ([f"top{self.top:g}"] if self.top else []) + [self.compressor]
        return "+".join(parts)


def encode(tensors: dict[str, np.ndarray], codec: Codec) -> tuple[bytes, dict[str, Any]]:
    """Compressed bytes and the header entries needed to decode them."""
    out: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for name, arr in sorted(tensors.items()):
        a = np.asarray(arr)
        a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a  # the wire is little-endian
        shapes[name] = list(a.shape)
        dtypes[name] = a.dtype.str
        if a.dtype.kind != "f":  # integer buffers travel exactly
            out[name] = np.ascontiguousarray(a)
            continue
        flat = a.astype(np.float32).reshape(-1)
        if codec.top is not None:
            k = min(flat.size, max(1, int(round(codec.top * flat.size))))
            idx = np.sort(np.argpartition(np.abs(flat), -k)[-k:]).astype(np.int32) if k else np.zeros(0, np.int32)
            out[name + "::idx"] = idx
            flat = flat[idx]
        if codec.precision == "fp16":
            out[name] = flat.astype(np.float16)
        elif codec.precision == "int8":
            scale = float(np.max(np.abs(flat))) / 127.0 if flat.size else 0.0
            q = np.zeros_like(flat, dtype=np.int8) if scale == 0 else np.clip(np.round(flat / scale), -127, 127)
            out[name] = q.astype(np.int8)
            out[name + "::scale"] = np.array([scale], dtype=np.float32)
        else:
            out[name] = flat
    raw = save(out)
    if codec.compressor == "zlib":
        raw = zlib.compress(raw, 6)
    elif codec.compressor == "lzma":
        raw = lzma.compress(raw, preset=6)
    return raw, {"codec": codec.name, "shapes": shapes, "dtypes": dtypes}


def decode(data: bytes, header: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode`; malformed input raises :class:`DataError`."""
    try:
        codec = Codec.parse(str(header["codec"]))
        shapes = {k: tuple(int(d) for d in v) for k, v in dict(header["shapes"]).items()}
        dtypes = dict(header.get("dtypes", {}))
        declared = sum(int(np.prod(shape, dtype=np.float64)) for shape in shapes.values())
        if any(d < 0 for shape in shapes.values() for d in shape) or declared > MAX_ELEMENTS:
            raise DataError(f"tensor payload declares shapes of {declared} elements (at most {MAX_ELEMENTS}, "
                            "no negative sizes)", hint="send smaller payloads")
        if codec.compressor == "zlib":
            d = zlib.decompressobj()
            raw = d.decompress(data, MAX_DECOMPRESSED)
            if d.unconsumed_tail:
                raise DataError("tensor payload decompresses beyond the limit", hint="send smaller payloads")
        elif codec.compressor == "lzma":
            dl = lzma.LZMADecompressor()
            raw = dl.decompress(data, max_length=MAX_DECOMPRESSED)
            if not dl.eof:
                raise DataError("tensor payload decompresses beyond the limit", hint="send smaller payloads")
        else:
            raw = data
        stored = dict(load(raw))
        out: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            v = stored[name]
            if np.dtype(dtypes.get(name, "<f4")).kind != "f":
                out[name] = v.reshape(shape)
                continue
            if codec.precision == "int8":
                v = v.astype(np.float32) * float(stored[name + "::scale"][0])
            v = v.astype(np.float32)
            if codec.top is not None:
                dense = np.zeros(int(np.prod(shape)), dtype=np.float32)
                dense[stored[name + "::idx"]] = v
                v = dense
            out[name] = v.reshape(shape)
        return out
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"malformed tensor payload: {exc}", hint="the sender must use eclm.compress") from exc

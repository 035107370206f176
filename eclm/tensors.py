"""The safe tensor format: safetensors bytes (a JSON header and raw little-endian data, never pickle)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from safetensors.numpy import load, save

from eclm.errors import DataError


def encode_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialise named arrays; the bytes are deterministic for equal inputs."""
    return save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())})


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Parse bytes from :func:`encode_tensors`; malformed bytes raise :class:`DataError`."""
    try:
        return dict(load(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and ValueErrors
        raise DataError(f"malformed tensor payload: {exc}", hint="the sender must use eclm.tensors") from exc


def read_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        return decode_tensors(f.read())


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """Content hash of named arrays (names, dtypes, shapes and values)."""
    return hashlib.sha256(encode_tensors(tensors)).hexdigest()

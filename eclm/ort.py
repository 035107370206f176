"""Imports ONNX Runtime for the torch-free parts (the runtime, the probe): one place that names the package.

Plain ``onnxruntime`` imports neither torch nor any training module; serving and the training step
graph both run on it (x86_64 and aarch64 wheels alike).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module."""
    return importlib.import_module("onnxruntime")

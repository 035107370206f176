"""Import ONNX Runtime without torch: the training build's import-time check otherwise pulls it in.

``onnxruntime-training-cpu`` 1.19.2 tries ``from onnxruntime.training.ortmodule import ORTModule``
while importing ``onnxruntime``; when torch is installed (a developer's machine, the cloud) that
loads all of torch (~250 MB resident). On a board torch is absent and the check fails quietly; here
we make it fail quietly everywhere by hiding torch for the duration of that one import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType


class _HideTorch(importlib.abc.MetaPathFinder):
    """Refuses torch imports; everything else falls through to the normal finders."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "torch" or fullname.startswith("torch."):
            raise ImportError(f"{fullname} is hidden while ONNX Runtime loads")
        return None


def load_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, imported without importing torch (unless torch is already loaded)."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    if "torch" in sys.modules:
        return importlib.import_module("onnxruntime")
    hider = _HideTorch()
    sys.meta_path.insert(0, hider)
    try:
        return importlib.import_module("onnxruntime")
    finally:
        sys.meta_path.remove(hider)
        for name in [m for m in sys.modules if m.startswith("onnxruntime.training")]:
            del sys.modules[name]  # half-imported by the failed check; a later real import starts clean

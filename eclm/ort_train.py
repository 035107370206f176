"""ONNX Runtime's on-device training API driven through its C binding, without importing torch.

``import onnxruntime.training`` imports torch in ONNX Runtime 1.19.2; the C binding
``onnxruntime.capi._pybind_state`` offers the same checkpoint, module and optimizer objects
without it, which keeps a board's runtime small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eclm.errors import BundleError
from eclm.ort import load_onnxruntime

TRAINING_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), after a training run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def training_available() -> bool:
    """Whether the installed ONNX Runtime was built with the training API."""
    try:
        load_onnxruntime()
        from onnxruntime.capi import _pybind_state as c

        return hasattr(c, "Module") and hasattr(c, "load_checkpoint")
    except ImportError:
        return False


@dataclass
class OrtTrainer:
    """A checkpoint, its training module and optimizer, loaded from a folder of ORT artifacts."""

    folder: Path
    checkpoint: Path | None = None  # default: the folder's own checkpoint
    threads: int = 0  # 0: ONNX Runtime's default

    def __post_init__(self) -> None:
        if not training_available():
            raise BundleError(
                "this ONNX Runtime has no training API",
                hint="install onnxruntime-training-cpu (x86_64) or build ONNX Runtime with --enable_training_apis",
            )
        load_onnxruntime()
        from onnxruntime.capi import _pybind_state as c

        self._c = c
        missing = [f for f in TRAINING_FILES if not (self.folder / f).exists()]
        if missing:
            raise BundleError(f"training artifacts missing in {self.folder}: {missing}", hint="re-export")
        c.set_default_logger_severity(3)  # importing the training tooling leaves the global logger verbose
        device = c.OrtDevice(c.OrtDevice.cpu(), c.OrtDevice.default_memory(), 0)
        options = c.get_default_session_options()
        options.log_severity_level = 3  # errors only; the training build defaults to verbose graph logs
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.enable_cpu_mem_arena = False  # a board runs this for weeks: give memory back after each run
        self.state = c.load_checkpoint(os.fspath(self.checkpoint or self.folder / "checkpoint"))
        self.module = c.Module(
            os.fspath(self.folder / "training_model.onnx"),
            self.state,
            os.fspath(self.folder / "eval_model.onnx"),
            device,
            options,
        )
        self.optimizer = c.Optimizer(os.fspath(self.folder / "optimizer_model.onnx"), self.state, device, options)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One forward, backward and optimizer step on a batch; returns the loss."""
        fetches = self._c.OrtValueVector()
        self.module.train_step([np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)], fetches)
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()
        return float(fetches[0].numpy())

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and logits of the eval graph on a batch."""
        fetches = self._c.OrtValueVector()
        self.module.eval_step([np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)], fetches)
        return float(fetches[0].numpy()), fetches[1].numpy()

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(float(lr))

    def parameter_names(self) -> list[str]:
        return list(self.state.parameter_names())

    def parameter(self, name: str) -> np.ndarray:
        """Current value of a parameter held by the checkpoint."""
        return np.array(self.state.get_parameter(name).data.numpy(), copy=True)

    def trainable_names(self) -> list[str]:
        return [n for n in self.parameter_names() if self.state.get_parameter(n).requires_grad]

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        from onnxruntime import OrtValue

        self.state.copy_parameter_from(name, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))._ortvalue)

    def save(self, path: str | os.PathLike[str], include_optimizer_state: bool = False) -> None:
        """Write the checkpoint (parameters, and optionally the optimizer state)."""
        self._c.save_checkpoint(self.state, os.fspath(path), include_optimizer_state)

    def export_inference(self, path: str | os.PathLike[str], outputs: list[str]) -> None:
        """Write an inference graph holding the current parameters (the eval graph without the loss)."""
        self.module.export_model_for_inferencing(os.fspath(path), list(outputs))

"""Runs a bundle's training step graph with plain ONNX Runtime: no training build, no torch.

The step graph (``training/train_step.onnx``, written by the exporter) takes a batch (``input``),
its ``labels``, the ``learning_rate``, every trainable parameter (``param/<name>``) and the optimizer
state (``state/<slot>/<name>``, ``state/step``), and returns ``loss``, ``logits`` and, for each of
those inputs, its next value under ``new/`` + the input's name. Frozen parameters are initializers
of the graph named as in ``model.onnx``.

The parameters live in numpy arrays the caller owns, wrapped as OrtValues without a copy: frozen
ones are handed to the session with ``SessionOptions.add_initializer`` (the serving session holds
the very same arrays), trainable ones are bound with IOBinding. Each step writes its outputs into
a second set of buffers and the two sets swap, so the caller's starting arrays are never written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import TrainingUnavailableError
from eclm.ort import load_onnxruntime

INPUT, LABELS, LEARNING_RATE = "input", "labels", "learning_rate"
LOSS, LOGITS = "loss", "logits"
PARAM, STATE, NEW = "param/", "state/", "new/"
STEP_FILE = "train_step.onnx"


def param_input(name: str) -> str:
    """The step graph's input name of trainable parameter ``name``."""
    return PARAM + name


def state_input(slot: str, name: str | None = None) -> str:
    """The step graph's input name of an optimizer state tensor (per parameter, or a scalar)."""
    return f"{STATE}{slot}/{name}" if name is not None else STATE + slot


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), after a training run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Graph rewrites that must not run on a graph whose initializers the runtime hands in:
# - constant folding computes with the values in the file, not the ones handed in, so a trained
#   BatchNorm scale (folded with its statistics) would be silently ignored;
# - the blocked (NCHWc) layout of convolution weights, and convolution fusions that bake a following
#   Mul or Add into new weights, keep a second copy beside the runtime's array (and likewise ignore it).
# Prepacking is turned off for the same reason (see session_options).
DISABLED_OPTIMIZERS = ("ConstantFolding", "NchwcTransformer", "ConvAddFusion", "ConvMulFusion", "ConvBNFusion")


def session_options(threads: int = 1) -> Any:
    """Options of every session the runtime opens: few threads, quiet, no arena, no packed weight copies."""
    ort = load_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # No arena: it would keep the memory of the largest batch ever run for good.
    options.enable_cpu_mem_arena = False
    # Kernels would otherwise keep a re-laid-out copy of each weight beside the shared array.
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def open_session(path: Path, arrays: Mapping[str, np.ndarray], threads: int = 1, *,
                 own_copy: bool = False) -> tuple[Any, list[Any]]:
    """An inference session over the graph at ``path`` that reads ``arrays`` in place as its initializers
    of those names (no copy). Returns the session and the OrtValues it reads: keep both alive together.

    ``own_copy``: the session gets the graph with ``arrays`` written into it instead and keeps its own copy,
    which lets ONNX Runtime fold constants and fuse layers (faster; the weights are then held twice).
    """
    ort = load_onnxruntime()
    options = session_options(threads)
    if own_copy:
        from eclm.onnx_weights import model_with_initializers

        model = model_with_initializers(path, dict(arrays))
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]), []
    kept = []
    for name, array in arrays.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        kept.append(value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(DISABLED_OPTIMIZERS))
    return session, kept


class StepRunner:
    """One training run's session over the step graph, its parameter buffers and optimizer state."""

    def __init__(self, path: Path, weights: Mapping[str, np.ndarray], trainable: Sequence[str],
                 threads: int = 1) -> None:
        ort = load_onnxruntime()
        self._ort = ort
        missing = [n for n in trainable if n not in weights]
        if missing:
            raise TrainingUnavailableError(f"the model has no parameters {missing[:3]} that the step trains",
                                           hint="re-export the bundle")
        for name in trainable:
            if weights[name].dtype != np.float32 or not weights[name].flags.c_contiguous:
                raise TrainingUnavailableError(f"parameter {name} is not a contiguous float32 array",
                                               hint="re-export the bundle")
        frozen = {n: a for n, a in weights.items() if n not in set(trainable)}
        try:
            self.session, self._kept = open_session(path, frozen, threads)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise TrainingUnavailableError(
                f"the training step graph does not load in this ONNX Runtime ({ort.__version__}): "
                f"{str(exc).strip().splitlines()[0][:300]}",
                hint="install a current onnxruntime, or re-export the bundle with this exporter",
            ) from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        self.carried = [n for n in inputs if n not in (INPUT, LABELS, LEARNING_RATE)]
        problems = [n for n in (INPUT, LABELS, LEARNING_RATE, LOSS) if n not in inputs and n not in outputs]
        problems += [n for n in self.carried if not n.startswith((PARAM, STATE)) or NEW + n not in outputs]
        got = sorted(n.removeprefix(PARAM) for n in self.carried if n.startswith(PARAM))
        if problems or got != sorted(trainable):
            raise TrainingUnavailableError(
                f"the training step graph does not match its bundle ({', '.join(problems[:3]) or 'trainable set'})",
                hint="re-export the bundle",
            )
        self.trainable = list(trainable)
        self.steps = 0
        # The caller's arrays start the run and are only read; steps write into two buffers of our own.
        self._current: dict[str, np.ndarray] = {param_input(n): weights[n] for n in trainable}
        for name in self.carried:
            if name.startswith(STATE):
                shape = [int(d) for d in inputs[name].shape]
                self._current[name] = np.zeros(shape, dtype=np.float32)
        self._spare: dict[str, np.ndarray] = {n: np.empty_like(a) for n, a in self._current.items()}
        self._owned = {n for n in self.carried if n.startswith(STATE)}  # buffers written so far

    def step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> float:
        """One forward, backward and optimizer step on a batch; returns the loss."""
        return self._run(x, y, learning_rate, want_logits=False)[0]

    def step_with_logits(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> tuple[float, np.ndarray]:
        """A step that also returns the logits the forward pass computed (before the update)."""
        loss, logits = self._run(x, y, learning_rate, want_logits=True)
        assert logits is not None
        return loss, logits

    def _run(self, x: np.ndarray, y: np.ndarray, lr: float, want_logits: bool) -> tuple[float, np.ndarray | None]:
        ort = self._ort
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT, np.ascontiguousarray(x, dtype=np.float32))
        binding.bind_cpu_input(LABELS, np.ascontiguousarray(y, dtype=np.int64))
        binding.bind_cpu_input(LEARNING_RATE, np.asarray(lr, dtype=np.float32))
        binding.bind_output(LOSS)  # outputs come back in binding order: loss, [logits]
        if want_logits:
            binding.bind_output(LOGITS)
        keep = []
        for name in self.carried:
            src = ort.OrtValue.ortvalue_from_numpy(self._current[name])
            dst = ort.OrtValue.ortvalue_from_numpy(self._spare[name])
            keep += [src, dst]
            binding.bind_ortvalue_input(name, src)
            binding.bind_ortvalue_output(NEW + name, dst)
        self.session.run_with_iobinding(binding)
        fetched = binding.get_outputs()
        for name in self.carried:
            done = self._spare[name]
            if name in self._owned:
                self._spare[name] = self._current[name]
            else:  # the caller's array: never written, so the next step gets a fresh buffer
                self._spare[name] = np.empty_like(done)
                self._owned.add(name)
            self._current[name] = done
        self.steps += 1
        return float(fetched[0].numpy()), (fetched[1].numpy() if want_logits else None)

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer state's current values, by step-graph input name."""
        return {n: a for n, a in self._current.items() if n.startswith(STATE)}

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable parameters' current values (arrays of this runner; the caller's before any step)."""
        return {n: self._current[param_input(n)] for n in self.trainable}

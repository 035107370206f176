"""What serves predictions: one inference session over a bundle generation, with input checks.

The runtime owns the parameters: ``weights`` holds one array per initializer of the graph (the
bundle's values, overlaid by what a generation trained or received), and the session reads them
in place (``SessionOptions.add_initializer``); a training run hands the same arrays to the step graph.
Small models are the exception (``copy_max_bytes``): their session keeps an optimized copy, since
the optimizations ONNX Runtime must skip on shared weights cost them more than the copy costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eclm.errors import DataError
from eclm.manifest import BundleManifest
from eclm.train_step import open_session


@dataclass
class ServingModel:
    """A bundle's manifest and an ONNX Runtime session on one of its generations."""

    manifest: BundleManifest
    bundle_dir: Path
    digest: str
    generation: int
    model_path: Path
    weights: dict[str, np.ndarray]  # initializer values the session reads (every one, or a variant's shared ones)
    changed: frozenset[str] = frozenset()  # parameters whose values differ from the bundle's (a generation's own)
    versions: dict[str, int] | None = None  # module versions of this generation (default: the bundle's)
    line: str = ""  # the environment whose lines ``versions`` count in ("": the shared parts; cloud_sync/lines.py)
    threads: int = 1
    # Weights of at most this many bytes in all: the session keeps its own, optimized copy (faster predictions,
    # weights held twice); larger ones are read in place from ``weights`` (held once). 0: always in place.
    copy_max_bytes: int = 0
    training_problem: str = ""  # why this runtime cannot train the bundle, found when it was opened
    _kept: list[object] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # In place, the session reads these arrays: keep the OrtValues alive as long as it.
        self.own_copy = 0 < sum(a.nbytes for a in self.weights.values()) <= self.copy_max_bytes
        self.session, self._kept = open_session(self.model_path, self.weights, self.threads, own_copy=self.own_copy)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(int(d) for d in self.manifest.input["shape"][1:])
        self.labels = list(self.manifest.labels)

    @property
    def trained(self) -> dict[str, np.ndarray]:
        """The values this generation holds apart from the bundle's (what its folder stores)."""
        return {n: self.weights[n] for n in sorted(self.changed)}

    @property
    def module_versions(self) -> dict[str, int]:
        """Version of every part this generation holds."""
        if self.versions is not None:
            return dict(self.versions)
        return {p["part_id"]: int(p["version"]) for p in [*self.manifest.modules, *self.manifest.fixed_parts]}

    @property
    def trainable(self) -> bool:
        return bool(self.manifest.training.get("available")) and not self.training_problem

    @property
    def training_reason(self) -> str:
        """Why this model does not train here ("" when it does)."""
        return self.training_problem or str(self.manifest.training.get("reason") or "")

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Inputs as (N, *input_shape) float32 with finite values, or a :class:`DataError` saying why."""
        if x.dtype.kind not in "fiu":
            raise DataError(f"inputs must be numbers, got dtype {x.dtype}", hint="send float32 values")
        if x.ndim == len(self.input_shape):
            x = x[None]
        if tuple(x.shape[1:]) != self.input_shape:
            flat = int(np.prod(self.input_shape))
            if x.ndim == 2 and x.shape[1] == flat:
                x = x.reshape(len(x), *self.input_shape)
            else:
                raise DataError(
                    f"inputs have shape {tuple(x.shape)}; this model takes (N, {', '.join(map(str, self.input_shape))})"
                    f" or (N, {flat})",
                    hint="reshape the samples to the bundle's input shape",
                )
        if len(x) == 0:
            raise DataError("no inputs", hint="send at least one sample")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise DataError("inputs hold NaN or infinite values", hint="send finite values only")
        return x

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: x})[0])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities for already-checked inputs."""
        z = self.logits(x)  # a fresh array of the session's: worked on in place
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def log_loss(self, x: np.ndarray, y: np.ndarray, batch: int = 32) -> float:
        """Mean cross-entropy of the labels (NaN without samples)."""
        if len(y) == 0:
            return float("nan")
        total = 0.0
        for i in range(0, len(y), batch):
            p = self.predict(x[i : i + batch])
            total += float(-np.log(np.clip(p[np.arange(len(p)), y[i : i + batch]], 1e-12, 1.0)).sum())
        return total / len(y)

    def accuracy(self, x: np.ndarray, y: np.ndarray, batch: int = 32) -> float:
        if len(y) == 0:
            return float("nan")
        correct = 0
        for i in range(0, len(y), batch):
            correct += int((self.logits(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        return correct / len(y)

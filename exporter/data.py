"""Data sets for cloud training: scikit-learn's digits, the generated 1-D ``signals``, or the user's own ``.npz``
(``X``, ``y``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eclm.errors import DataError

PROXY_SHARE = 0.3  # METHOD.md: the cloud trains on 30% of all data; devices share the other 70%
VALIDATION_SHARE = 0.2  # of the proxy split, held out for the cloud's own validation


@dataclass(frozen=True)
class Dataset:
    """Samples as (N, C, H, W) float32 in the data set's raw units, integer labels, label names."""

    name: str
    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))


@dataclass(frozen=True)
class Splits:
    """The seeded partition of a data set: cloud proxy (train + validation) and the device pool."""

    train: Dataset
    val: Dataset
    pool: Dataset


def _as_images(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x.reshape(x.shape[0], 1, 1, x.shape[1])
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return x
    raise DataError(
        f"X has shape {x.shape}; expected (N, F), (N, H, W) or (N, C, H, W)",
        hint="reshape your samples to one of those layouts",
    )


SYNTHETIC = "synthetic-cifar"
BUILTIN = ("digits", "signals")  # the named data sets `--dataset` accepts besides an .npz path


def load_dataset(name_or_path: str) -> Dataset:
    """``digits`` (8x8 images, shipped with scikit-learn, no download), ``signals`` (1-D waveforms of
    64 steps, generated from a fixed seed: exporter/signals.py), ``synthetic-cifar`` (seeded noise of
    CIFAR's shape, for sizing and speed only), or a path to an ``.npz`` with X and y.
    """
    if name_or_path == SYNTHETIC:
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 1.0, size=(600, 3, 32, 32)).astype(np.float32)
        return Dataset(SYNTHETIC, x, np.arange(600, dtype=np.int64) % 10, tuple(str(i) for i in range(10)))
    if name_or_path == "digits":
        from sklearn.datasets import load_digits

        raw = load_digits()
        x = raw.data.reshape(-1, 1, 8, 8).astype(np.float32)
        return Dataset("digits", x, raw.target.astype(np.int64), tuple(str(t) for t in raw.target_names))
    if name_or_path == "signals":
        from exporter import signals

        x, y, names = signals.generate()
        return Dataset(signals.NAME, x, y, names)
    path = Path(name_or_path)
    if path.suffix == ".npz" and not path.is_file():
        raise DataError(f"file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""),
                        hint="give the path of an .npz file holding arrays X and y (see docs/data.md)")
    if path.suffix != ".npz":
        raise DataError(
            f"unknown data set {name_or_path!r}",
            hint="use 'digits', 'signals', 'synthetic-cifar' or an .npz file holding arrays X and y (see docs/data.md)",
        )
    # allow_pickle=False: an .npz from elsewhere must never run code when loaded.
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz or "y" not in npz:
                raise DataError(f"{path} lacks X or y", hint="save with np.savez(path, X=..., y=...)")
            x = _as_images(np.asarray(npz["X"], dtype=np.float32))
            y = np.asarray(npz["y"])
            labels = tuple(str(s) for s in npz["labels"]) if "labels" in npz else None
    except ValueError as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="store plain numeric arrays, no objects") from exc
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must be N integer labels matching X", hint="fix y")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: X holds NaN or infinite values", hint="clean or drop those samples")
    if y.min() < 0:
        raise DataError(f"{path}: labels must be 0..C-1", hint="encode labels as 0..C-1")
    n_classes = int(y.max()) + 1
    labels = labels or tuple(str(i) for i in range(n_classes))
    if len(labels) < n_classes:
        raise DataError(f"{path}: {len(labels)} label names for {n_classes} classes", hint="fix labels")
    return Dataset(path.stem, x, y.astype(np.int64), labels)


def _subset(ds: Dataset, idx: np.ndarray) -> Dataset:
    return Dataset(ds.name, ds.x[idx], ds.y[idx], ds.labels)


def split(ds: Dataset, seed: int) -> Splits:
    """Stratified, seeded: 30% proxy (80/20 train/validation) and 70% device pool."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ds.y))
    proxy, pool = train_test_split(idx, train_size=PROXY_SHARE, stratify=ds.y, random_state=seed)
    train, val = train_test_split(
        proxy, test_size=VALIDATION_SHARE, stratify=ds.y[proxy], random_state=seed
    )
    return Splits(_subset(ds, np.sort(train)), _subset(ds, np.sort(val)), _subset(ds, np.sort(pool)))


def gate_split(ds: Dataset, seed: int, secret: bytes) -> Dataset:
    """The merge gate's validation samples: a stratified ``VALIDATION_SHARE`` of the cloud's proxy split,
    drawn by the bank's secret (not by the public seed), so it cannot be rebuilt from public data.
    """
    import hashlib

    from sklearn.model_selection import train_test_split

    if len(secret) < 16:
        raise DataError("the validation secret is too short", hint="delete it; the daemon makes a new one")
    idx = np.arange(len(ds.y))
    proxy, _ = train_test_split(idx, train_size=PROXY_SHARE, stratify=ds.y, random_state=seed)
    keyed = int.from_bytes(hashlib.sha256(b"eclm-gate-split" + secret).digest()[:4], "big")
    _, val = train_test_split(proxy, test_size=VALIDATION_SHARE, stratify=ds.y[proxy], random_state=keyed)
    return _subset(ds, np.sort(val))


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation, the normalisation baked into exported graphs."""
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    std = np.where(std < 1e-6, 1.0, std)
    return [float(v) for v in mean], [float(v) for v in std]

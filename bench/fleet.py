"""A fleet simulator: devices with their own classes, corruptions and shifting data, and the arms compared.

METHOD.md section 5's protocol on the data set at hand: each device holds 50 to 150 samples of m
classes from the devices' 70% of the data; at every adaptation step half of each device's samples are
replaced by fresh ones from its current environment (scheduled shifts can change its classes or
corruption); a share of the fleet adapts per round. The devices' share is split once, stratified and
seeded, into a training part (devices' samples) and a test part (the held-out samples accuracy is
measured on: 30% of each class), so no device is ever tested on a sample it or any other device
trained on. Arms share data, seeds and local-training settings (3 epochs, batch 16, learning rate
1e-3):

- ``none``: the cloud model, never adapted;
- ``local``: each device fine-tunes its ECLM sub-model with the edge runtime, nothing is shared;
- ``eclm``: the real system: exported bundles, the edge runtime training with ONNX Runtime, deltas
  over a real MQTT broker to the real merger daemon, signed module updates back;
- ``fedavg``: the full modular model trained on every participating device (PyTorch), averaged;
- ``heterofl``: nested sub-models by device capacity (the first 1, 1/2 or 1/4 of each layer's
  modules), trained locally (PyTorch) and aggregated per module over the devices holding it.

The arms live in ``bench/arms_torch.py`` (none, fedavg, heterofl) and ``bench/arms_edge.py`` (local, eclm).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bench.corruptions import IMAGE_KINDS, corrupt
from eclm.errors import DataError, EclmError

LOCAL_EPOCHS, LOCAL_BATCH, LOCAL_LR = 3, 16, 1e-3
TEST_SHARE = 0.3  # of each class of the devices' data, held out for testing only


@dataclass(frozen=True)
class Shift:
    """From ``step`` on, ``devices`` (indices; empty: all) see other classes and/or another corruption."""

    step: int
    devices: tuple[int, ...] = ()
    classes: tuple[int, ...] | None = None
    corruption: str | None = None
    environment: str | None = None  # the devices' environment label after it; None: derived (environment_after)


@dataclass(frozen=True)
class FleetConfig:
    """The protocol's knobs."""

    devices: int = 100
    per_round: int = 5  # the paper's participation: 25 of 500 devices per round (5%)
    classes_per_device: int = 2
    min_samples: int = 50
    max_samples: int = 150
    steps: int = 20
    replace_share: float = 0.5
    corruptions: tuple[str, ...] = IMAGE_KINDS  # the suites set the data set's own: corruptions.kinds_for
    test_samples: int = 100
    shifts: tuple[Shift, ...] = ()
    seed: int = 0


@dataclass
class Device:
    """One device's environment and local data (raw units)."""

    index: int
    name: str
    classes: tuple[int, ...]
    corruption: str
    capacity: float
    size: int
    x: np.ndarray = field(default_factory=lambda: np.zeros((0,)))
    y: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    idx: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))  # pool indices of x
    environment: str = ""  # the environment line it works in ("": the shared line); see environment_of


SHARED_LINE = ""  # the environment label of uncorrupted data: the cloud's shared line


def environment_of(corruption: str) -> str:
    """The environment label of a corruption: its name, the shared line for none."""
    return SHARED_LINE if corruption == "none" else corruption


def environment_after(shift: Shift, device: Device) -> str:
    """The environment a shift puts a device in: the shift's own label if it has one, else the new
    corruption's, else ``classes-<c>-<c>...`` for a new class mix, else the device's current one.
    """
    if shift.environment is not None:
        return shift.environment
    if shift.corruption is not None:
        return environment_of(shift.corruption)
    if shift.classes is not None:
        return "classes-" + "-".join(map(str, shift.classes))
    return device.environment


class Pool:
    """The devices' share of the data set, split once into a training and a test part, sampled per
    environment; the two parts never share a sample.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int, test_share: float = TEST_SHARE) -> None:
        self.x, self.y = x, y
        self.rng = np.random.default_rng(seed)
        self.value_range = (float(x.min()), float(x.max()))
        self.num_classes = int(y.max()) + 1
        split_rng = np.random.default_rng([seed, 0x7e57])
        test = [c[: max(1, int(round(test_share * len(c))))] if len(c) > 1 else c[:0]
                for c in (split_rng.permutation(np.flatnonzero(y == k)) for k in range(self.num_classes))]
        self.test_idx = np.sort(np.concatenate(test)).astype(np.int64)
        self.train_idx = np.setdiff1d(np.arange(len(y)), self.test_idx).astype(np.int64)

    def draw_indices(self, classes: tuple[int, ...], n: int, part: str) -> np.ndarray:
        """``n`` pool indices of ``classes`` from the ``train`` or ``test`` part (with replacement only if
        the part holds fewer than ``n``).
        """
        base = {"train": self.train_idx, "test": self.test_idx}[part]
        idx = base[np.isin(self.y[base], classes)]
        if len(idx) == 0:
            raise DataError(f"no {part} samples of classes {list(classes)} in the devices' data",
                            hint="use a data set with at least two samples of every class a device holds")
        return self.rng.choice(idx, size=n, replace=len(idx) < n)

    def draw(self, classes: tuple[int, ...], corruption: str, n: int,
             part: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Corrupted samples, their labels and their pool indices."""
        pick = self.draw_indices(classes, n, part)
        seed = int(self.rng.integers(0, 2**31))
        return (corrupt(self.x[pick], corruption, seed=seed, value_range=self.value_range), self.y[pick],
                pick)


def make_fleet(cfg: FleetConfig, num_classes: int) -> list[Device]:
    rng = np.random.default_rng(cfg.seed)
    capacities = (1.0, 0.5, 0.25)
    fleet = []
    for i in range(cfg.devices):
        classes = tuple(sorted(int(c) for c in rng.choice(num_classes, cfg.classes_per_device, replace=False)))
        corruption = str(cfg.corruptions[i % len(cfg.corruptions)])
        fleet.append(Device(i, f"dev-{i:03d}", classes, corruption, capacities[i % 3],
                            int(rng.integers(cfg.min_samples, cfg.max_samples + 1)),
                            environment=environment_of(corruption)))
    return fleet


def apply_shifts(cfg: FleetConfig, devices: list[Device], step: int) -> list[int]:
    """Apply the shifts that start at ``step``; returns the devices they touched."""
    touched = []
    for s in cfg.shifts:
        if s.step != step:
            continue
        for i in s.devices or range(len(devices)):
            d = devices[i]
            d.environment = environment_after(s, d)
            if s.classes is not None:
                d.classes = s.classes
            if s.corruption is not None:
                d.corruption = s.corruption
            touched.append(i)
    return touched


def refresh(d: Device, pool: Pool, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``share`` of the device's samples with fresh ones; returns the fresh ones."""
    n_new = d.size if len(d.y) == 0 else max(1, int(round(share * d.size)))
    x, y, idx = pool.draw(d.classes, d.corruption, n_new, "train")
    keep = d.size - n_new
    d.x = np.concatenate([d.x[len(d.x) - keep:], x]) if keep > 0 else x
    d.y = np.concatenate([d.y[len(d.y) - keep:], y]) if keep > 0 else y
    d.idx = np.concatenate([d.idx[len(d.idx) - keep:], idx]) if keep > 0 else idx
    return x, y


class Arm(Protocol):
    """One way of keeping the fleet's models accurate."""

    name: str

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """One round for ``devices`` (with their fresh samples); returns bytes up and down per device."""
        ...

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float: ...

    def close(self) -> None: ...


def run(arms: list[Any], cfg: FleetConfig, pool: Pool, devices: list[Device],
        progress: Any = None) -> dict[str, Any]:
    """Run every arm through the same steps; accuracy of the participating devices after each round.

    ``samples`` in the result holds, per step and participating device, the pool indices of its training
    samples after the refresh and of its test samples (disjoint: the pool's two parts).

    A device whose bundle cannot be made or served (an export check that fails on this data set, say) is
    left out of its arm's means and listed in ``failed_devices``; the run goes on with the others.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    per_step: dict[str, list[float]] = {a.name: [] for a in arms}
    bytes_: dict[str, list[dict[str, float]]] = {a.name: [] for a in arms}
    seconds: dict[str, list[float]] = {a.name: [] for a in arms}
    history: list[dict[str, Any]] = []
    samples: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
    for step in range(cfg.steps):
        shifted = apply_shifts(cfg, devices, step)
        chosen = sorted(rng.choice(len(devices), size=min(cfg.per_round, len(devices)), replace=False).tolist())
        chosen = sorted(set(chosen) | set(shifted)) if shifted and len(chosen) < len(devices) else chosen
        fresh = {i: refresh(devices[i], pool, cfg.replace_share) for i in chosen}
        tests = {i: pool.draw(devices[i].classes, devices[i].corruption, cfg.test_samples, "test") for i in chosen}
        samples.append({i: (devices[i].idx.copy(), tests[i][2]) for i in chosen})
        _check_disjoint(samples[-1], step)
        tests_xy = {i: t[:2] for i, t in tests.items()}
        row: dict[str, Any] = {"step": step, "devices": chosen, "shifted": shifted,
                               "environments": {i: d.environment for i, d in enumerate(devices)}}
        for arm in arms:
            t = time.perf_counter()
            b = arm.adapt([devices[i] for i in chosen], fresh)
            seconds[arm.name].append(time.perf_counter() - t)
            bytes_[arm.name].append(b)
            accs = {i: a for i in chosen if (a := arm.accuracy(devices[i], *tests_xy[i])) == a}  # NaN: left out
            per_step[arm.name].append(float(np.mean(list(accs.values()))) if accs else float("nan"))
            row[arm.name] = accs
        history.append(row)
        if progress is not None:
            progress(step, {a.name: per_step[a.name][-1] for a in arms})
    failed = {a.name: sorted(getattr(a, "failed", {}).values()) for a in arms if getattr(a, "failed", None)}
    return {"accuracy_per_step": per_step, "bytes": bytes_, "seconds": seconds, "history": history,
            "failed_devices": failed, "samples": samples}


def _check_disjoint(step_samples: dict[int, tuple[np.ndarray, np.ndarray]], step: int) -> None:
    """No device is tested on a sample it holds for training (the pool's split makes this so; checked)."""
    for i, (train, test) in step_samples.items():
        if np.intersect1d(train, test).size:
            raise EclmError(f"step {step}: device {i} is tested on samples it trains on",
                            hint="a bug in bench/fleet.py: the pool's training and test parts must not overlap")

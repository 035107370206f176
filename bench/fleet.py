"""A fleet simulator: devices with their own classes, corruptions and shifting data, and the arms compared.

METHOD.md section 5's protocol on digits: each device holds 50 to 150 samples of m classes from the
devices' 70% of the data; at every adaptation step half of each device's samples are replaced by
fresh ones from its current environment (scheduled shifts can change its classes or corruption);
a share of the fleet adapts per round. Arms share data, seeds and local-training settings (3
epochs, batch 16, learning rate 1e-3):

- ``none``: the cloud model, never adapted;
- ``local``: each device fine-tunes its ECLM sub-model with the edge runtime, nothing is shared;
- ``eclm``: the real system: exported bundles, the edge runtime training with ONNX Runtime, deltas
  over a real MQTT broker to the real merger daemon, signed module updates back;
- ``fedavg``: the full modular model trained on every participating device (PyTorch), averaged;
- ``heterofl``: nested sub-models by device capacity (the first 1, 1/2 or 1/4 of each layer's
  modules), trained locally (PyTorch) and aggregated per module over the devices holding it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.corruptions import corrupt

LOCAL_EPOCHS, LOCAL_BATCH, LOCAL_LR = 3, 16, 1e-3


@dataclass(frozen=True)
class Shift:
    """From ``step`` on, ``devices`` (indices; empty: all) see other classes and/or another corruption."""

    step: int
    devices: tuple[int, ...] = ()
    classes: tuple[int, ...] | None = None
    corruption: str | None = None


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
    corruptions: tuple[str, ...] = ("none", "rotation", "noise", "contrast", "blur")
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


class Pool:
    """The devices' share of the data set, sampled per environment."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.x, self.y = x, y
        self.rng = np.random.default_rng(seed)
        self.value_range = (float(x.min()), float(x.max()))
        self.num_classes = int(y.max()) + 1

    def draw(self, classes: tuple[int, ...], corruption: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(np.isin(self.y, classes))
        pick = self.rng.choice(idx, size=n, replace=len(idx) < n)
        seed = int(self.rng.integers(0, 2**31))
        return corrupt(self.x[pick], corruption, seed=seed, value_range=self.value_range), self.y[pick]


def make_fleet(cfg: FleetConfig, num_classes: int) -> list[Device]:
    rng = np.random.default_rng(cfg.seed)
    capacities = (1.0, 0.5, 0.25)
    return [Device(i, f"dev-{i:03d}", tuple(sorted(int(c) for c in rng.choice(num_classes, cfg.classes_per_device,
                                                                                  replace=False))),
                   str(cfg.corruptions[i % len(cfg.corruptions)]), capacities[i % 3],
                   int(rng.integers(cfg.min_samples, cfg.max_samples + 1))) for i in range(cfg.devices)]


def apply_shifts(cfg: FleetConfig, devices: list[Device], step: int) -> list[int]:
    """Apply the shifts that start at ``step``; returns the devices they touched."""
    touched = []
    for s in cfg.shifts:
        if s.step != step:
            continue
        for i in s.devices or range(len(devices)):
            d = devices[i]
            if s.classes is not None:
                d.classes = s.classes
            if s.corruption is not None:
                d.corruption = s.corruption
            touched.append(i)
    return touched


def refresh(d: Device, pool: Pool, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``share`` of the device's samples with fresh ones; returns the fresh ones."""
    n_new = d.size if len(d.y) == 0 else max(1, int(round(share * d.size)))
    x, y = pool.draw(d.classes, d.corruption, n_new)
    keep = d.size - n_new
    d.x = np.concatenate([d.x[len(d.x) - keep:], x]) if keep > 0 else x
    d.y = np.concatenate([d.y[len(d.y) - keep:], y]) if keep > 0 else y
    return x, y


class Arm(Protocol):
    """One way of keeping the fleet's models accurate."""

    name: str

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """One round for ``devices`` (with their fresh samples); returns bytes up and down per device."""
        ...

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float: ...

    def close(self) -> None: ...


# -- PyTorch arms -------------------------------------------------------------------------------


def _torch_train(model: Any, x: np.ndarray, y: np.ndarray, mean: list[float], std: list[float],
                 rng: np.random.Generator) -> list[float]:
    """Local training as on a device: 3 epochs, batch 16, AdamW 1e-3; BatchNorm statistics frozen."""
    import torch
    import torch.nn.functional as F

    xt = (torch.from_numpy(x) - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)
    yt = torch.from_numpy(y)
    model.eval()  # BatchNorm uses its running statistics, as the exported graphs do
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LOCAL_LR)
    step_s = []
    for _ in range(LOCAL_EPOCHS):
        order = rng.permutation(len(y))
        for i in range(0, len(y), LOCAL_BATCH):
            idx = torch.from_numpy(order[i : i + LOCAL_BATCH])
            t = time.perf_counter()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_s.append(time.perf_counter() - t)
    return step_s


def _torch_accuracy(model: Any, x: np.ndarray, y: np.ndarray, mean: list[float], std: list[float]) -> float:
    import torch

    xt = (torch.from_numpy(x) - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        return float((model(xt).argmax(1).numpy() == y).mean())


def _nbytes(state: dict[str, Any]) -> int:
    return int(sum(v.numel() * 4 for k, v in state.items() if v.dtype.is_floating_point))


class CloudArm:
    """``none``: the cloud model as trained, never adapted."""

    name = "none"

    def __init__(self, bank: Path) -> None:
        from exporter.bank import DirectoryBank
        from exporter.torchio import model_from_bank

        self.model = model_from_bank(DirectoryBank(bank))
        info = DirectoryBank(bank).info()
        self.mean, self.std = info.normalisation["mean"], info.normalisation["std"]

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        return {"uplink": 0.0, "downlink": 0.0}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return _torch_accuracy(self.model, x, y, self.mean, self.std)

    def close(self) -> None:
        pass


class FedAvgArm(CloudArm):
    """``fedavg``: the full model trained on each participating device, averaged by sample count."""

    name = "fedavg"

    def __init__(self, bank: Path, seed: int) -> None:
        super().__init__(bank)
        self.rng = np.random.default_rng(seed)
        self.step_seconds: list[float] = []

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:

        states, weights = [], []
        for d in devices:
            local = copy.deepcopy(self.model)
            self.step_seconds += _torch_train(local, d.x, d.y, self.mean, self.std, self.rng)
            states.append(local.state_dict())
            weights.append(len(d.y))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        merged = {k: (sum(float(wi) * s[k].double() for wi, s in zip(w, states, strict=True)).to(v.dtype)
                      if v.dtype.is_floating_point else v)
                  for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(merged)
        full = float(_nbytes(self.model.state_dict()))
        return {"uplink": full, "downlink": full}


class HeteroFLArm(CloudArm):
    """``heterofl``: nested sub-models by capacity (first modules of each layer), aggregated per module."""

    name = "heterofl"

    def __init__(self, bank: Path, seed: int) -> None:
        super().__init__(bank)
        self.rng = np.random.default_rng(seed)
        self.sizes = [ls.num_modules for ls in self.model.cfg.layers]

    def selection(self, capacity: float) -> list[list[int]]:
        return [list(range(max(1, int(round(n * capacity))))) for n in self.sizes]

    def submodel(self, capacity: float) -> Any:
        from exporter.modular import SubModel

        return SubModel(self.model, self.selection(capacity))

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        sums: dict[str, Any] = {}
        counts: dict[str, float] = {}
        up = 0.0
        full_state = self.model.state_dict()
        for d in devices:
            sub = self.submodel(d.capacity)
            _torch_train(sub, d.x, d.y, self.mean, self.std, self.rng)
            state = sub.state_dict()
            up += _nbytes(state)
            for k, v in state.items():
                key = k if k in full_state else None
                if key is None or not v.dtype.is_floating_point or v.shape != full_state[key].shape:
                    continue  # gates restricted to the sub-model's modules keep the cloud's values
                sums[key] = sums.get(key, 0) + v.double() * len(d.y)
                counts[key] = counts.get(key, 0.0) + len(d.y)
        merged = {k: ((sums[k] / counts[k]).to(v.dtype) if k in sums else v) for k, v in full_state.items()}
        self.model.load_state_dict(merged)
        return {"uplink": up / max(1, len(devices)), "downlink": up / max(1, len(devices))}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return _torch_accuracy(self.submodel(device.capacity), x, y, self.mean, self.std)


# -- edge-runtime arms --------------------------------------------------------------------------


class LocalArm:
    """``local``: each device fine-tunes its own ECLM bundle with the edge runtime; nothing is shared."""

    name = "local"

    def __init__(self, bank: Path, work: Path, devices: list[Device], keys: tuple[Path, Path] | None = None) -> None:
        from eclm.signing import generate_keys

        self.bank, self.work = bank, work
        # Bundles are signed and checked as in a deployment (and no device warns that it serves unsigned ones).
        if keys is None:
            folder = work / self.name / "keys"
            folder.mkdir(parents=True, exist_ok=True)
            mine = (folder / "signing.key", folder / "signing.pub")
            keys = mine if mine[0].exists() else generate_keys(folder)  # reused with the bundles made before
        self.signing_key, self.trust_key = keys
        self.bundles: dict[tuple[int, ...], Path] = {}
        self.services: dict[int, Any] = {}
        self.failed: dict[int, str] = {}  # devices left out of the run, and why (the run goes on without them)
        for d in devices:
            self._start(d)

    def _start(self, d: Device) -> bool:
        """Export and open the device's runtime; a failure is recorded for the report, not raised."""
        from eclm.errors import EclmError

        if d.index in self.failed:
            return False
        try:
            self.service(d)
        except EclmError as exc:
            self.failed[d.index] = f"{d.name} (classes {','.join(map(str, d.classes))}): {exc.message}"
            return False
        return True

    def ok(self, devices: list[Device]) -> list[Device]:
        """The devices whose runtime could be started."""
        return [d for d in devices if self._start(d)]

    def bundle(self, classes: tuple[int, ...]) -> Path:
        from exporter.export import ExportRequest, export_bundle

        if classes not in self.bundles:
            out = self.work / self.name / "bundles" / "-".join(map(str, classes))
            if not (out / "manifest.json").exists():
                export_bundle(ExportRequest(self.bank, profile="pi4", out_dir=out, classes=list(classes),
                                            measure=False, signing_key=self.signing_key))
            self.bundles[classes] = out
        return self.bundles[classes]

    def service(self, d: Device) -> Any:
        from edge_runtime.config import load_config
        from edge_runtime.service import EdgeService

        if d.index not in self.services:
            self.services[d.index] = EdgeService(load_config(overrides={
                "bundle": self.bundle(d.classes), "state_dir": self.work / self.name / d.name, "device_id": d.name,
                "train_every_samples": 0, "max_samples": d.size, "min_train_samples": 8, "drift": False,
                "resource_interval_s": 0, "trust_key": self.trust_key}, environ={}))
        return self.services[d.index]

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        for d in self.ok(devices):
            svc = self.service(d)
            svc.add_samples(*fresh[d.index])
            svc.train_now("round")
        return {"uplink": 0.0, "downlink": 0.0}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        if not self._start(device):
            return float("nan")  # left out: not counted in the step's mean
        return float(self.service(device).serving.accuracy(x, y))

    def close(self) -> None:
        for svc in self.services.values():
            svc.close()


class EclmArm(LocalArm):
    """``eclm``: the edge runtime plus deltas over a real broker to the real merger daemon, updates back."""

    name = "eclm"

    def __init__(self, bank: Path, work: Path, devices: list[Device]) -> None:
        import shutil

        from bench.broker import start_broker
        from bench.procs import daemon, wait_connected
        from eclm.signing import generate_keys

        self.cloud_bank = work / "eclm-bank"
        shutil.copytree(bank, self.cloud_bank)
        (work / "keys").mkdir(parents=True, exist_ok=True)
        self.priv, self.pub = generate_keys(work / "keys")
        super().__init__(self.cloud_bank, work, devices, keys=(self.priv, self.pub))
        self.broker = start_broker(None, work / "broker")
        self.daemon = daemon(self.cloud_bank, self.broker.url, self.priv, work / "sync.log",
                             "--round-deltas", "1000", "--round-seconds", "1",
                             # The paper's merge: every device's module in, plain weighted mean.
                             "--min-devices", "1", "--strategy", "weighted")
        self.daemon.start()
        wait_connected(self.daemon)
        self.syncs: dict[int, Any] = {}

    def _sync(self, d: Device) -> Any:
        from dataclasses import replace

        from edge_runtime.sync import EdgeSync

        if d.index not in self.syncs:
            svc = self.service(d)
            svc.cfg = replace(svc.cfg, broker=self.broker.url, trust_key=self.pub)
            sync = EdgeSync(svc)
            sync.start()
            self.syncs[d.index] = sync
        return self.syncs[d.index]

    def adapt(self, devices: list[Device], fresh: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        from bench.procs import ledger_rows, wait_until

        devices = self.ok(devices)
        if not devices:
            return {"uplink": 0.0, "downlink": 0.0}
        up0 = {d.index: self._bytes(d) for d in devices}
        syncs = [self._sync(d) for d in devices]
        wait_until(lambda: all(s.connected.is_set() for s in syncs), 120, "devices to connect")
        super().adapt(devices, fresh)
        for s in syncs:
            s.flush_once()
        wait_until(lambda: all(len(self.service(d).outbox) == 0 for d in devices), 120, "deltas to be acknowledged")
        wait_until(lambda: all(r[2] != "pending" for r in ledger_rows(self.cloud_bank)), 120, "the merge")
        time.sleep(1.0)
        wait_until(lambda: all(s.updates.empty() for s in syncs), 60, "module updates to be applied")
        time.sleep(0.5)
        ups = [self._bytes(d)[0] - up0[d.index][0] for d in devices]
        downs = [self._bytes(d)[1] - up0[d.index][1] for d in devices]
        # Devices go offline after their round, as boards do; the broker keeps what the cloud sends
        # them meanwhile (persistent sessions) and delivers it when they next connect.
        for d in devices:
            self.syncs.pop(d.index).close()
        return {"uplink": float(np.mean(ups)), "downlink": float(np.mean(downs))}

    def _bytes(self, d: Device) -> tuple[float, float]:
        m = self.service(d).metrics
        return (m.uplink_bytes._value.get(), m.downlink_bytes._value.get())

    def close(self) -> None:
        for s in self.syncs.values():
            s.close()
        super().close()
        self.daemon.kill()
        self.broker.stop()


def run(arms: list[Any], cfg: FleetConfig, pool: Pool, devices: list[Device],
        progress: Any = None) -> dict[str, Any]:
    """Run every arm through the same steps; accuracy of the participating devices after each round.

    A device whose bundle cannot be made or served (an export check that fails on this data set, say) is
    left out of its arm's means and listed in ``failed_devices``; the run goes on with the others.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    per_step: dict[str, list[float]] = {a.name: [] for a in arms}
    bytes_: dict[str, list[dict[str, float]]] = {a.name: [] for a in arms}
    seconds: dict[str, list[float]] = {a.name: [] for a in arms}
    history: list[dict[str, Any]] = []
    for step in range(cfg.steps):
        shifted = apply_shifts(cfg, devices, step)
        chosen = sorted(rng.choice(len(devices), size=min(cfg.per_round, len(devices)), replace=False).tolist())
        chosen = sorted(set(chosen) | set(shifted)) if shifted and len(chosen) < len(devices) else chosen
        fresh = {i: refresh(devices[i], pool, cfg.replace_share) for i in chosen}
        tests = {i: pool.draw(devices[i].classes, devices[i].corruption, cfg.test_samples) for i in chosen}
        row: dict[str, Any] = {"step": step, "devices": chosen, "shifted": shifted}
        for arm in arms:
            t = time.perf_counter()
            b = arm.adapt([devices[i] for i in chosen], fresh)
            seconds[arm.name].append(time.perf_counter() - t)
            bytes_[arm.name].append(b)
            accs = {i: a for i in chosen if (a := arm.accuracy(devices[i], *tests[i])) == a}  # NaN: left out
            per_step[arm.name].append(float(np.mean(list(accs.values()))) if accs else float("nan"))
            row[arm.name] = accs
        history.append(row)
        if progress is not None:
            progress(step, {a.name: per_step[a.name][-1] for a in arms})
    failed = {a.name: sorted(getattr(a, "failed", {}).values()) for a in arms if getattr(a, "failed", None)}
    return {"accuracy_per_step": per_step, "bytes": bytes_, "seconds": seconds, "history": history,
            "failed_devices": failed}

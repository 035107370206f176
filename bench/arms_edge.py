"""The edge-runtime arms of the fleet simulator: local-only fine-tuning and the whole ECLM loop (bench/fleet.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet import Device

# Samples a device needs to train: the few-shot regime's smallest device holds 10, of which the store holds
# out every 5th by id (2 of any 10 in a row), leaving 8 (tests/test_bench_stats.py checks this).
MIN_TRAIN_SAMPLES = 8


class LocalArm:
    """``local``: each device fine-tunes its own ECLM bundle with the edge runtime; nothing is shared."""

    name = "local"

    def __init__(self, bank: Path, work: Path, devices: list[Device], keys: tuple[Path, Path] | None = None,
                 edge_settings: dict[str, Any] | None = None) -> None:
        from eclm.signing import generate_keys

        self.bank, self.work = bank, work
        self.edge_settings = edge_settings or {}  # runtime settings beyond the bench's (an ablation's)
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
                "train_every_samples": 0, "max_samples": d.size, "min_train_samples": MIN_TRAIN_SAMPLES, "drift": False,
                "resource_interval_s": 0, "trust_key": self.trust_key, **self.edge_settings}, environ={}))
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


@dataclass(frozen=True)
class EclmOptions:
    """How the ECLM arm runs its rounds (the arm-level ablations of bench/suites.py ABLATIONS)."""

    merges: bool = True  # False: the daemon never merges; the arm waits for acknowledgements only
    downlink_same_round: bool = True  # False: devices leave once acknowledged, get updates when they next connect
    solo_environments: bool = False  # True: each device's line is its own name, so no two devices share one
    refine_updates: bool = False  # True: devices fine-tune each module update before judging it (--refine-updates)


class EclmArm(LocalArm):
    """``eclm``: the edge runtime plus deltas over a real broker to the real merger daemon, updates back."""

    name = "eclm"

    def __init__(self, bank: Path, work: Path, devices: list[Device], daemon_args: tuple[str, ...] = (),
                 options: EclmOptions = EclmOptions()) -> None:
        import shutil

        from bench.broker import start_broker
        from bench.procs import daemon, wait_connected
        from eclm.signing import generate_keys

        self.cloud_bank = work / "eclm-bank"
        shutil.copytree(bank, self.cloud_bank)
        (work / "keys").mkdir(parents=True, exist_ok=True)
        self.priv, self.pub = generate_keys(work / "keys")
        super().__init__(self.cloud_bank, work, devices, keys=(self.priv, self.pub),
                         edge_settings={"refine_updates": options.refine_updates})
        self.broker = start_broker(None, work / "broker")
        # One merge per step, of every delta the step's devices sent (the paper's round; FedAvg's too): the
        # daemon never merges by itself here, and the arm asks for the round (SIGUSR1) once every delta of the
        # step is stored. Merging on a timer instead merged the deltas one by one as they arrived.
        self.daemon = daemon(self.cloud_bank, self.broker.url, self.priv, work / "sync.log",
                             "--round-deltas", "1000000000", "--round-seconds", "1000000000",
                             # The paper's merge: every device's module in, plain weighted mean.
                             "--min-devices", "1", "--strategy", "weighted",
                             *daemon_args)  # an ablation's flags come last and win
        self.daemon.start()
        wait_connected(self.daemon)
        self.options = options
        self.syncs: dict[int, Any] = {}
        self.lines: bool | None = None  # whether the runtime has environment lines (None: not asked yet)
        self.declared: dict[int, str] = {}  # the environment each device declared at its last round

    def line(self, d: Device) -> str:
        """The environment line the device declares: its environment, or its own name (solo-environments)."""
        return d.name if self.options.solo_environments else d.environment

    def _declare(self, d: Device) -> None:
        """Tell the device's runtime which environment it works in (if this runtime has environment lines)."""
        set_environment = getattr(self.service(d), "set_environment", None)
        self.lines = set_environment is not None
        if set_environment is not None:
            set_environment(self.line(d))

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
        for d in devices:
            self._declare(d)  # before connecting and training: the round's deltas belong to this line
        syncs = [self._sync(d) for d in devices]
        wait_until(lambda: all(s.connected.is_set() for s in syncs), 120, "devices to connect")
        self._await_lines(devices)
        opts = self.options
        if opts.merges and not opts.downlink_same_round:
            # The previous round's merge, whose updates the broker kept for these devices while they were away.
            wait_until(lambda: all(r[2] != "pending" for r in ledger_rows(self.cloud_bank)), 120, "the merge")
            time.sleep(1.0)
            wait_until(lambda: all(s.updates.empty() for s in syncs), 60, "module updates to be applied")
        super().adapt(devices, fresh)
        for s in syncs:
            s.flush_once()
        wait_until(lambda: all(len(self.service(d).outbox) == 0 for d in devices), 120, "deltas to be acknowledged")
        if opts.merges:
            self._merge_now()
        if opts.merges and opts.downlink_same_round:
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

    def _merge_now(self) -> None:
        """Every delta of the step is stored (acknowledged): one round merges them all."""
        import signal

        assert self.daemon.proc is not None, "the sync daemon is not running"
        self.daemon.proc.send_signal(signal.SIGUSR1)

    def _await_lines(self, devices: list[Device], timeout: float = 20.0) -> None:
        """A device that has just entered an environment with module lines gets them pushed on connecting
        (cloud_sync/lines.py); as a board whose training waits for samples, it trains after taking (or
        refusing) them. Devices whose environment did not change, or whose environment has no lines yet,
        do not wait.
        """
        from eclm.parts import split_line_key
        from module_bank import DirectoryBank

        lines = {split_line_key(key)[1] for key in DirectoryBank(self.cloud_bank).info().lines}
        entering = [d for d in devices if self.line(d) in lines and self.declared.get(d.index) != self.line(d)]
        for d in devices:
            self.declared[d.index] = self.line(d)
        if not self.lines or not entering:
            return
        before = {d.index: self.service(d).updates.last_update for d in entering}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
                self.service(d).serving.line == self.line(d) or self.service(d).updates.last_update
                is not before[d.index] for d in entering):
            time.sleep(0.05)

    def _bytes(self, d: Device) -> tuple[float, float]:
        m = self.service(d).metrics
        return (m.uplink_bytes._value.get(), m.downlink_bytes._value.get())

    def close(self) -> None:
        for s in self.syncs.values():
            s.close()
        super().close()
        self.daemon.kill()
        self.broker.stop()

"""The whole loop over a real broker: a daemon and five edge runtimes (separate processes) on digits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from broker import Mosquitto, mosquitto_binary
from sync_harness import Edge, daemon, ledger_rows, ledger_versions, wait_connected, wait_until

from bench.corruptions import corrupt
from eclm.signing import generate_keys
from exporter.data import load_dataset, split
from exporter.export import ExportRequest, export_bundle

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

DEVICES = {
    "dev-a": ([1, 4, 7], "rotation"),
    "dev-b": ([0, 2, 5], "noise"),
    "dev-c": ([3, 6, 9], "contrast"),
    "dev-d": ([2, 7, 8], "blur"),
    "dev-e": ([0, 3, 8], "rotation"),
}
ROUNDS = 3


def _device_data(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per device: its classes' pool samples, corrupted, split into 3 training batches and a test set."""
    pool = split(load_dataset("digits"), 0).pool
    out = {}
    for k, (dev, (classes, kind)) in enumerate(DEVICES.items()):
        mask = np.isin(pool.y, classes)
        x = corrupt(pool.x[mask], kind, seed=seed + k)
        y = pool.y[mask]
        order = np.random.default_rng(seed + k).permutation(len(y))
        x, y = x[order], y[order]
        n_test = len(y) // 3
        out[dev] = {"test_x": x[:n_test], "test_y": y[:n_test], "train_x": x[n_test:], "train_y": y[n_test:]}
    return out


def settled(status: str, reason: str) -> bool:
    return status in ("merged", "held", "rejected") or (status, reason) == ("pending", "waiting_support")


def test_three_rounds_five_devices(digits_bank, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(digits_bank[0], bank)
    keys = tmp_path / "keys"
    keys.mkdir()
    priv, pub = generate_keys(keys)
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    data = _device_data()
    sync = daemon(bank, broker.url, priv, tmp_path / "sync.log", "--round-deltas", str(len(DEVICES)),
                  "--round-seconds", "4")
    edges: dict[str, Edge] = {}
    try:
        sync.start()
        wait_connected(sync)
        for dev, (classes, _) in DEVICES.items():
            out = tmp_path / f"bundle-{dev}"
            export_bundle(ExportRequest(bank, profile="pi4", out_dir=out, classes=classes, measure=False,
                                        signing_key=priv))
            # Not under test here: five runtimes, the daemon and pytest share two cores, which the resource
            # monitor would rightly read as CPU pressure and answer with cheaper variants.
            edges[dev] = Edge(dev, out, tmp_path / f"state-{dev}", broker.url, pub, tmp_path / f"{dev}.log",
                              env={"ECLM_EDGE_RESOURCE_INTERVAL_S": "0"})
        for e in edges.values():
            e.start()
        start_acc = {d: e.accuracy(data[d]["test_x"], data[d]["test_y"]) for d, e in edges.items()}

        produced: list[str] = []
        for r in range(ROUNDS):
            for dev, e in edges.items():
                tx, ty = data[dev]["train_x"], data[dev]["train_y"]
                part = slice(r * len(ty) // ROUNDS, (r + 1) * len(ty) // ROUNDS)
                code, out = e.post("/v1/samples", {"inputs": tx[part].tolist(), "labels": ty[part].tolist()})
                assert code == 200, out
                last = e.train_and_wait()
                if last.get("delta_id"):
                    produced.append(last["delta_id"])
            for e in edges.values():
                e.wait_outbox_empty()
            # At the defaults (min devices 2): a part only one device trained waits for support, still pending.
            wait_until(lambda: all(settled(s, why) for _, _, s, why in ledger_rows(bank)),
                       90, f"round {r + 1} to be merged")
            assert sync.alive(), sync.tail()

        end_acc = {d: e.accuracy(data[d]["test_x"], data[d]["test_y"]) for d, e in edges.items()}
        rows = ledger_rows(bank)
        versions = ledger_versions(bank)
        report = {d: (round(start_acc[d], 3), round(end_acc[d], 3)) for d in edges}
        print("accuracy start -> end per device:", report)
        print("ledger:", {s: sum(1 for r in rows if r[2] == s) for s in ("merged", "held", "rejected", "pending")},
              "held as disagreeing:", sum(1 for r in rows if r[3] == "disagrees"))
        print("module versions above 1:", {k: v for k, v in versions.items() if v > 1})

        for dev in edges:
            assert end_acc[dev] > start_acc[dev], f"{dev} did not improve: {report[dev]}"
        assert any(v > 1 for v in versions.values()), "no module version advanced"
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))
        assert set(produced) <= set(ids), "a delta the devices produced never reached the ledger"
        for delta_id, _, status, reason in rows:
            assert settled(status, reason), (delta_id, status, reason)
            if status != "merged":
                assert reason, f"{delta_id} is {status} without a reason"
    finally:
        for e in edges.values():
            e.proc.kill()
        sync.kill()
        broker.stop()

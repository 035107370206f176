"""Faults over a real broker: broker restart, daemon kill -9 mid-merge, a device offline, duplicates, junk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, mosquitto_binary
from sync_harness import Edge, daemon, ledger_rows, ledger_versions, wait_connected, wait_until
from sync_messages import make_profile

from eclm import topics, wire
from eclm.signing import generate_keys
from edge_runtime.outbox import Outbox
from exporter.data import load_dataset, split
from exporter.export import ExportRequest, export_bundle
from module_bank import DirectoryBank

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
CLASSES = {"f-a": [1, 4, 7], "f-b": [0, 2, 5]}


class Rig:
    """A bank copy, keys, a broker, the daemon and two edge runtimes, all real processes."""

    def __init__(self, bank: Path, tmp: Path, *daemon_args: str) -> None:
        self.tmp = tmp
        self.bank = tmp / "bank"
        shutil.copytree(bank, self.bank)
        (tmp / "keys").mkdir()
        self.priv, self.pub = generate_keys(tmp / "keys")
        self.broker = Mosquitto(tmp / "broker")
        self.broker.start()
        # Crash safety, not support: a part one of the two devices trained alone merges (min devices 1).
        self.daemon_args = ("--round-deltas", "2", "--round-seconds", "2", "--min-devices", "1", *daemon_args)
        self.sync = daemon(self.bank, self.broker.url, self.priv, tmp / "sync.log", *self.daemon_args)
        self.sync.start()
        wait_connected(self.sync)
        self.edges: dict[str, Edge] = {}
        for dev, classes in CLASSES.items():
            out = tmp / f"bundle-{dev}"
            export_bundle(ExportRequest(self.bank, profile="pi4", out_dir=out, classes=classes, measure=False,
                                        signing_key=self.priv))
            self.edges[dev] = Edge(dev, out, tmp / f"state-{dev}", self.broker.url, self.pub, tmp / f"{dev}.log",
                                   env={"ECLM_EDGE_RESOURCE_INTERVAL_S": "0", "ECLM_EDGE_RESEND_S": "3"})
            self.edges[dev].start()
        pool = split(load_dataset("digits"), 0).pool
        self.data = {d: (pool.x[np.isin(pool.y, c)], pool.y[np.isin(pool.y, c)]) for d, c in CLASSES.items()}
        self.rounds = 0

    def train(self, dev: str) -> str | None:
        x, y = self.data[dev]
        part = slice(self.rounds * 60 % (len(y) - 60), self.rounds * 60 % (len(y) - 60) + 60)
        self.rounds += 1
        code, out = self.edges[dev].post("/v1/samples", {"inputs": x[part].tolist(), "labels": y[part].tolist()})
        assert code == 200, out
        return self.edges[dev].train_and_wait().get("delta_id")

    def restart_daemon(self) -> None:
        self.sync.kill()
        self.sync = daemon(self.bank, self.broker.url, self.priv, self.tmp / "sync.log", *self.daemon_args)
        self.sync.start()
        wait_connected(self.sync)

    def all_settled(self) -> bool:
        return bool(ledger_rows(self.bank)) and all(r[2] != "pending" for r in ledger_rows(self.bank))

    def check_ledger(self, produced: list[str]) -> None:
        """Every produced delta is in the ledger once; no version counts a delta twice; bank.json agrees."""
        rows = ledger_rows(self.bank)
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))
        assert set(produced) <= set(ids), set(produced) - set(ids)
        # bank.json is rewritten just after the ledger commits a round: give an ongoing round a moment.
        def agrees() -> bool:
            info, versions = DirectoryBank(self.bank).info(), ledger_versions(self.bank)
            return all(rec.version == versions.get(pid, 1) for pid, rec in info.parts.items())

        wait_until(agrees, 20, "bank.json to agree with the ledger")
        info = DirectoryBank(self.bank).info()
        versions = ledger_versions(self.bank)
        for pid, rec in info.parts.items():
            assert rec.version == versions.get(pid, 1), (pid, rec.version, versions.get(pid))
            merged_into = [d for entry in rec.lineage for d in entry.get("deltas", [])]
            assert len(merged_into) == len(set(merged_into)), f"{pid} counts a delta twice"

    def close(self) -> None:
        for e in self.edges.values():
            e.proc.kill()
        self.sync.kill()
        self.broker.stop()


@pytest.fixture()
def rig(digits_bank, tmp_path: Path):
    r = Rig(digits_bank[0], tmp_path)
    yield r
    r.close()


def test_broker_restarted_mid_round(rig: Rig) -> None:
    produced = [rig.train("f-a")]
    rig.broker.stop()
    produced += [rig.train("f-a"), rig.train("f-b")]  # kept in the outboxes while the broker is down
    assert rig.edges["f-a"].get("/v1/status")["outbox"]["entries"] >= 1
    rig.broker.start()
    for e in rig.edges.values():
        e.wait_outbox_empty(timeout=90)
    wait_until(rig.all_settled, 90, "the deltas to be merged")
    rig.check_ledger([p for p in produced if p])
    assert rig.sync.alive()


def test_daemon_killed_mid_merge(rig: Rig) -> None:
    produced = []
    for delay in (0.0, 0.3, 0.8):
        produced += [rig.train("f-a"), rig.train("f-b")]
        wait_until(lambda: sum(1 for r in ledger_rows(rig.bank) if r[2] == "pending") >= 1
                   or rig.all_settled(), 60, "deltas to be stored")
        time.sleep(delay)
        assert rig.sync.proc is not None
        os.kill(rig.sync.proc.pid, signal.SIGKILL)
        rig.restart_daemon()
    for e in rig.edges.values():
        e.wait_outbox_empty(timeout=90)
    wait_until(rig.all_settled, 90, "the deltas to be merged after the restarts")
    rig.check_ledger([p for p in produced if p])


def test_device_offline_for_a_round_then_back(rig: Rig) -> None:
    produced = [rig.train("f-b")]
    rig.edges["f-b"].wait_outbox_empty()
    rig.edges["f-b"].proc.kill(signal.SIGTERM)
    produced += [rig.train("f-a"), rig.train("f-a")]
    rig.edges["f-a"].wait_outbox_empty()
    wait_until(rig.all_settled, 60, "the round without f-b")
    rig.edges["f-b"].start()
    produced.append(rig.train("f-b"))
    rig.edges["f-b"].wait_outbox_empty(timeout=90)
    wait_until(rig.all_settled, 60, "f-b's delta to be merged")
    rig.check_ledger([p for p in produced if p])
    assert rig.edges["f-b"].get("/v1/status")["outbox"]["entries"] == 0


def _raw_client(url: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{time.time_ns()}", protocol=mqtt.MQTTv311)
    port = int(url.rsplit(":", 1)[1])
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_duplicate_malformed_and_oversized(digits_bank, tmp_path: Path) -> None:
    rig = Rig(digits_bank[0], tmp_path, "--max-payload", "200000")
    try:
        acks: list[wire.AckMessage] = []
        listener = _raw_client(rig.broker.url)
        listener.on_message = lambda _c, _u, m: acks.append(wire.decode(bytes(m.payload)))
        listener.subscribe(topics.ack("f-dup"), qos=1)
        # A real delta from a device's outbox, sent twice under another device id.
        rig.edges["f-a"].proc.kill(signal.SIGTERM)  # its state directory is reused in-process below
        svc_state = tmp_path / "state-f-a"
        from edge_runtime.config import load_config
        from edge_runtime.service import EdgeService
        from edge_runtime.sync import delta_message

        svc = EdgeService(load_config(overrides={"state_dir": svc_state, "device_id": "f-dup",
                                                 "train_every_samples": 0, "resource_interval_s": 0}, environ={}))
        x, y = rig.data["f-a"]
        svc.add_samples(x[:60], y[:60].tolist())
        svc.train_now()
        entry = Outbox(svc_state / "outbox").pending()[0]
        msg = delta_message(svc, entry)
        svc.close()
        data = wire.encode(msg, codec="int8+zlib")
        sender = _raw_client(rig.broker.url)
        # The device makes itself known the way edges do: a profile for this bank.
        known = wire.encode(make_profile(rig.bank, "f-dup"))
        sender.publish(topics.profile("f-dup"), known, qos=1).wait_for_publish(10)
        for _ in range(2):
            sender.publish(topics.delta("f-dup"), data, qos=1).wait_for_publish(10)
        sender.publish(topics.delta("f-dup"), b"\x00garbage\xff" * 10, qos=1).wait_for_publish(10)
        sender.publish(topics.delta("f-dup"), b"x" * 300_000, qos=1).wait_for_publish(10)
        wait_until(lambda: len(acks) >= 2, 30, "two acks")
        assert sorted(a.status for a in acks[:2]) == ["duplicate", "stored"]
        assert [r[0] for r in ledger_rows(rig.bank)].count(msg.delta_id) == 1
        status = json.loads(subprocess.run(
            [sys.executable, "-c", "from cloud_sync.cli import main; main()", "status", "--bank", str(rig.bank),
             "--json"], capture_output=True, text=True, check=True).stdout)
        assert status["rejected_by_reason"].get("malformed", 0) >= 1
        assert status["rejected_by_reason"].get("oversized", 0) >= 1
        assert rig.sync.alive()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{rig.sync.metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'eclm_sync_rejected_total{reason="malformed"}' in metrics, metrics[:2000]
        assert 'eclm_sync_events_total{kind="duplicate"}' in metrics
        produced = rig.train("f-b")  # the daemon still serves valid deltas
        rig.edges["f-b"].wait_outbox_empty()
        assert produced in [r[0] for r in ledger_rows(rig.bank)]
        sender.loop_stop()
        listener.loop_stop()
    finally:
        rig.close()

"""Hostile broker messages against a real edge process: forged acks lose nothing, no message stops
the edge's sync, chunk floods stay bounded, client ids are per install. Real broker, daemon and edge.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, mosquitto_binary
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sync_harness import Edge, Proc, daemon, ledger_rows, wait_connected, wait_until

from eclm import topics, wire
from eclm.signing import Signer, generate_keys, load_signer
from exporter.data import load_dataset, split
from exporter.export import ExportRequest, export_bundle

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
DEV = "f-a"
CLASSES = [1, 4, 7]


class HostileRig:
    """A bank copy, keys, a broker, one edge (and the daemon when asked), and a raw publisher."""

    def __init__(self, bank: Path, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.bank = tmp / "bank"
        shutil.copytree(bank, self.bank)
        (tmp / "keys").mkdir()
        self.priv, self.pub = generate_keys(tmp / "keys")
        self.signer = load_signer(self.priv)
        self.broker = Mosquitto(tmp / "broker")
        self.broker.start()
        self.bundle = tmp / "bundle"
        export_bundle(ExportRequest(self.bank, profile="pi4", out_dir=self.bundle, classes=CLASSES, measure=False,
                                    signing_key=self.priv))
        self.env = {"ECLM_EDGE_RESOURCE_INTERVAL_S": "0", "ECLM_EDGE_RESEND_S": "3", **(env or {})}
        self.edge = self.new_edge()
        self.edge.start()
        self.sync: Proc | None = None
        pool = split(load_dataset("digits"), 0).pool
        keep = np.isin(pool.y, CLASSES)
        self.x, self.y = pool.x[keep], pool.y[keep]
        self.raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{time.time_ns()}",
                               protocol=mqtt.MQTTv311)
        self.raw.connect("127.0.0.1", int(self.broker.url.rsplit(":", 1)[1]))
        self.raw.loop_start()

    def new_edge(self) -> Edge:
        return Edge(DEV, self.bundle, self.tmp / "state", self.broker.url, self.pub, self.tmp / "edge.log",
                    env=self.env)

    def start_daemon(self, *args: str) -> None:
        self.sync = daemon(self.bank, self.broker.url, self.priv, self.tmp / "sync.log", *args)
        self.sync.start()
        wait_connected(self.sync)

    def train(self) -> str:
        code, out = self.edge.post("/v1/samples", {"inputs": self.x[:80].tolist(), "labels": self.y[:80].tolist()})
        assert code == 200, out
        delta_id = self.edge.train_and_wait().get("delta_id")
        assert delta_id, self.edge.proc.tail()
        return str(delta_id)

    def send(self, topic: str, payload: bytes) -> None:
        self.raw.publish(topic, payload, qos=1).wait_for_publish(30)

    def refused(self) -> float:
        return self.edge.metric("eclm_edge_sync_refused_total")

    def wait_refused(self, n: float) -> None:
        """Block until the edge has counted ``n`` refusals (it handles each broker message in order)."""
        wait_until(lambda: self.refused() >= n, 60, f"{n} refusals on the edge:\n{self.edge.proc.tail()}")

    def close(self) -> None:
        self.raw.loop_stop()
        self.edge.proc.kill()
        if self.sync is not None:
            self.sync.kill()
        self.broker.stop()


@pytest.fixture()
def rig(digits_bank, tmp_path: Path):
    r = HostileRig(digits_bank[0], tmp_path, {"ECLM_EDGE_MAX_REASSEMBLY_BYTES": str(4 * 2**20)})
    yield r
    r.close()


def _frame(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header).encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_forged_ack_loses_no_delta(rig: HostileRig) -> None:
    """Acks that are unsigned, signed by another key, for another device, or a pattern: the entry stays,
    survives a restart (same client id), and reaches the daemon's ledger once it runs."""
    delta_id = rig.train()
    assert rig.edge.get("/v1/status")["outbox"]["entries"] == 1
    intruder = Signer(Ed25519PrivateKey.generate())
    forged = [
        wire.encode(wire.AckMessage(delta_id, "rejected", device_id=DEV)),  # unsigned
        wire.encode(wire.AckMessage(delta_id, "rejected", device_id=DEV), signer=intruder),  # another key
        wire.encode(wire.AckMessage(delta_id, "stored", device_id="f-b"), signer=rig.signer),  # another device
        wire.encode(wire.AckMessage(delta_id, "stored"), signer=rig.signer),  # no device
        wire.encode(wire.AckMessage("*", "rejected", device_id=DEV), signer=rig.signer),  # a pattern
        wire.encode(wire.AckMessage("*", "rejected", device_id=DEV)),
    ]
    for data in forged:
        rig.send(topics.ack(DEV), data)
    rig.wait_refused(len(forged))
    status = rig.edge.get("/v1/status")
    assert status["outbox"]["entries"] == 1, rig.edge.proc.tail()
    assert status["sync"]["refused"] == {"bad_signature": 3, "wrong_device": 2, "malformed": 1}
    client_id = status["sync"]["client_id"]
    assert client_id.startswith(f"eclm-edge-{DEV}-") and client_id != f"eclm-edge-{DEV}"

    rig.edge.proc.kill(signal.SIGTERM)
    rig.edge = rig.new_edge()
    rig.edge.start()
    assert rig.edge.get("/v1/status")["sync"]["client_id"] == client_id  # the broker session survives restarts
    rig.start_daemon("--round-deltas", "1000", "--round-seconds", "100000")
    rig.edge.wait_outbox_empty(90)
    assert [r[0] for r in ledger_rows(rig.bank)] == [delta_id]


def test_hostile_acks_and_updates_do_not_stop_the_edges_sync(rig: HostileRig) -> None:
    """Bad ids, garbage, wrong types, foreign and oversized messages, a chunk flood: afterwards a valid
    ack and a valid signed module update are still processed, and the held bytes stay bounded."""
    rig.start_daemon("--round-deltas", "1000", "--round-seconds", "100000")
    wait_until(lambda: rig.edge.get("/v1/status")["sync"]["connected"], 60, "the edge to connect")
    intruder = Signer(Ed25519PrivateKey.generate())
    ack, update = topics.ack(DEV), topics.update(DEV)
    head_tensors = {"head.fc.bias": np.zeros(1000, np.float32)}  # a shape no bundle has
    hostile = [
        (ack, wire.encode(wire.AckMessage("x**", "rejected", device_id=DEV), signer=rig.signer)),
        (ack, wire.encode(wire.AckMessage("../../x", "stored", device_id=DEV), signer=rig.signer)),
        (ack, wire.encode(wire.AckMessage("0" * 32, "stored", device_id=DEV), signer=rig.signer)),  # never sent
        (ack, b"\x00garbage\xff" * 20),
        (ack, _frame({"type": "ack", "schema_version": 1, "fields": {"delta_id": 5, "status": []}})),
        (ack, _frame({"type": "ack", "schema_version": 1, "fields": "no"})),
        (ack, _frame({"type": "nope", "schema_version": 1, "fields": {}})),
        (update, b"\xff" * 1000),
        (update, wire.encode(wire.ModuleUpdateMessage("u1", "bank", {"head": 99}, {"head": ["head.fc.bias"]},
                                                      head_tensors, device_id=DEV), signer=intruder)),
        (update, wire.encode(wire.ModuleUpdateMessage("u2", "bank", {"head": 99}, {"head": ["head.fc.bias"]},
                                                      head_tensors, device_id="f-b"), signer=rig.signer)),
        (update, wire.encode(wire.ChunkMessage("big", 0, 100_000, "0" * 64, b"x" * 1000))),
        (update, wire.encode(wire.RequestMessage("profile")).replace(b'"request"', b'"profile"')),
    ]
    for topic, data in hostile:
        rig.send(topic, data)
    rig.wait_refused(len(hostile))
    # A signed update for this device with wrong shapes reaches the update worker, which refuses it and lives on.
    rig.send(update, wire.encode(wire.ModuleUpdateMessage("u3", "bank", {"head": 99}, {"head": ["head.fc.bias"]},
                                                          head_tensors, device_id=DEV), signer=rig.signer))

    # A flood of incomplete chunks (50 MB offered) on the update topic: the edge holds at most its cap.
    pid = rig.edge.proc.proc.pid  # type: ignore[union-attr]
    before = _rss_kib(pid)
    piece = np.random.default_rng(0).bytes(500_000)
    for i in range(100):
        rig.send(update, wire.encode(wire.ChunkMessage(f"flood{i}", 0, 2, "0" * 64, piece)))
    n = rig.refused()
    rig.send(update, b"marker")
    rig.wait_refused(n + 1)
    grown_mb = (_rss_kib(pid) - before) / 1024
    assert grown_mb < 30, f"the edge grew by {grown_mb:.0f} MB under a 50 MB chunk flood (cap 4 MB)"

    sync = rig.edge.get("/v1/status")["sync"]
    assert sync["healthy"] and sync["network_loop"] and sync["threads"] == {"network": True, "outbox": True,
                                                                             "updates": True}, sync
    assert sync["last_message_at"] is not None and sync["connected"]
    assert rig.edge.metric('eclm_edge_sync_thread_alive{thread="network"}') == 1

    # A valid ack (from the daemon) is still processed ...
    delta_id = rig.train()
    rig.edge.wait_outbox_empty(90)
    assert delta_id in [r[0] for r in ledger_rows(rig.bank)]
    # ... and so is a valid signed module update: the head at its current values, one version newer.
    from edge_runtime.config import load_config
    from edge_runtime.service import EdgeService

    svc = EdgeService(load_config(overrides={"state_dir": rig.tmp / "reader", "bundle": rig.bundle,
                                             "train_every_samples": 0, "resource_interval_s": 0}, environ={}))
    try:
        module = max(svc.serving.manifest.modules, key=lambda m: len(m["params"]))
        values = {n.removeprefix("net."): svc.serving.weights[n].copy() for n in module["params"]}
    finally:
        svc.close()
    pid = module["part_id"]
    version = rig.edge.get("/v1/status")["module_versions"][pid]
    msg = wire.ModuleUpdateMessage("good", "bank", {pid: version + 1}, {pid: sorted(values)}, values, device_id=DEV)
    for part in wire.chunk(wire.encode(msg, signer=rig.signer), 64 * 2**10):
        rig.send(update, part)
    wait_until(lambda: rig.edge.get("/v1/status")["module_versions"][pid] == version + 1, 60,
               f"the module update to apply:\n{rig.edge.proc.tail()}")

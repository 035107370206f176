"""Many simulated devices over few MQTT connections, for the scale benchmark (``eclm bench --suite scale``).

A device here is only an id, a valid profile and one valid delta: real wire messages (:mod:`eclm.wire`)
for the bank's real module shapes, published on the device's own topics. Devices are multiplexed over
``connections`` paho clients (one network thread each), so 10,000 devices need no 10,000 threads. Each
connection subscribes to the exact ack and update topics of its devices in one SUBSCRIBE: the topic
grammar (``eclm/v1/devices/ID/KIND``) has the device id as one level, so no wildcard selects a group of
devices, and ``+`` would deliver every device's acks to every connection. The broker runs without ACLs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eclm import topics, wire

CODEC = "int8+zlib"  # the edge runtime's default codec for deltas


@dataclass
class Shapes:
    """What a valid message of a bank needs: its id, module layer sizes, part versions and float parameters."""

    bank_id: str
    layer_sizes: list[int]
    versions: dict[str, int]
    params: dict[str, dict[str, tuple[int, ...]]]

    @classmethod
    def of_bank(cls, bank: Path, parts: tuple[str, ...]) -> Shapes:
        from module_bank import DirectoryBank

        b = DirectoryBank(bank)
        info = b.info()
        sizes = [len(layer["widths"]) for layer in info.config["layers"]]
        params = {pid: {n: tuple(a.shape) for n, a in b.read_part(pid).items() if a.dtype.kind == "f"}
                  for pid in parts}
        return cls(info.bank_id, sizes, {pid: info.parts[pid].version for pid in parts}, params)


@dataclass
class Sent:
    """One device's delta: its id, encoded bytes and when it was (last) published."""

    device: str
    delta_id: str
    payload: bytes
    at: float = 0.0


def profile_bytes(shapes: Shapes, device: str) -> bytes:
    """A valid profile of a trainable pi4 device holding the benchmark's parts (so updates are addressed to it)."""
    msg = wire.ProfileMessage(device, shapes.bank_id, "scale", [[1.0 / n] * n for n in shapes.layer_sizes], 40,
                              profile_name="pi4", modules=dict(shapes.versions), trainable=True)
    return wire.encode(msg)


def delta_messages(shapes: Shapes, devices: list[str], seed: int = 0, scale: float = 1e-3) -> list[Sent]:
    """One valid delta per device: a shared small direction plus 10% per-device noise.

    The shared direction keeps the robust strategy from dropping deltas as opposing the others, so every
    stored delta is expected in a lineage; the values are far inside the norm bound.
    """
    rng = np.random.default_rng(seed)
    direction = {n: scale * rng.normal(size=s) for p in shapes.params.values() for n, s in p.items()}
    names = {pid: sorted(p) for pid, p in shapes.params.items()}
    out = []
    for dev in devices:
        tensors = {n: (d + 0.1 * scale * rng.normal(size=d.shape)).astype(np.float32) for n, d in direction.items()}
        msg = wire.DeltaMessage(uuid.uuid4().hex, dev, shapes.bank_id, "scale", dict(shapes.versions), names,
                                tensors, 32, importance=[[0.5] * n for n in shapes.layer_sizes],
                                metrics={"loss": 0.25})
        out.append(Sent(dev, msg.delta_id, wire.encode(msg, codec=CODEC)))
    return out


@dataclass
class Record:
    """What the fleet saw: per delta the ack (time, status), per device the first update after its delta."""

    acks: dict[str, tuple[float, str]] = field(default_factory=dict)
    updates: dict[str, float] = field(default_factory=dict)
    update_messages: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Fleet:
    """``devices`` simulated devices over ``connections`` MQTT clients to a broker on 127.0.0.1:``port``."""

    def __init__(self, port: int, devices: list[str], connections: int) -> None:
        self.port = port
        self.devices = devices
        k = max(1, min(connections, len(devices)))
        self.groups = [devices[i::k] for i in range(k)]
        self.conn_of = {d: i for i, g in enumerate(self.groups) for d in g}
        self.clients: list[Any] = []
        self.record = Record()
        self.sent: dict[str, Sent] = {}  # delta id -> what was sent
        self.by_device: dict[str, Sent] = {}
        self._subscribed = threading.Semaphore(0)

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        now = time.perf_counter()
        kind = topics.kind_of(m.topic)
        rec = self.record
        if kind == "ack":
            try:
                msg = wire.decode(bytes(m.payload))
            except Exception:  # noqa: BLE001 - a benchmark counts only what it understands
                return
            if isinstance(msg, wire.AckMessage):
                with rec.lock:
                    rec.acks.setdefault(msg.delta_id, (now, msg.status))
        elif kind == "update":
            device = topics.device_of(m.topic)
            with rec.lock:
                rec.update_messages += 1
                sent = self.by_device.get(device)
                if sent is not None and sent.at and now >= sent.at and device not in rec.updates:
                    rec.updates[device] = now

    def connect(self, timeout: float = 60) -> None:
        """Connect every client and wait until each has subscribed to its devices' ack and update topics."""
        import paho.mqtt.client as mqtt

        run = uuid.uuid4().hex[:6]
        for i, group in enumerate(self.groups):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"eclm-scale-{run}-{i}",
                            protocol=mqtt.MQTTv311)
            c.max_inflight_messages_set(2000)
            c.max_queued_messages_set(0)
            c.on_message = self._on_message
            subs = [(t, 1) for d in group for t in (topics.ack(d), topics.update(d))]

            def on_connect(cl: Any, _u: Any, _f: Any, reason: Any, _p: Any, subs: list[Any] = subs) -> None:
                if not getattr(reason, "is_failure", False):
                    cl.subscribe(subs)

            c.on_connect = on_connect
            c.on_subscribe = lambda *_: self._subscribed.release()
            c.connect("127.0.0.1", self.port, keepalive=120)
            c.loop_start()
            self.clients.append(c)
        deadline = time.time() + timeout
        for _ in self.clients:
            if not self._subscribed.acquire(timeout=max(0.1, deadline - time.time())):
                raise TimeoutError("the simulated devices' connections did not all subscribe")

    def publish_profiles(self, shapes: Shapes) -> None:
        for d in self.devices:
            self.clients[self.conn_of[d]].publish(topics.profile(d), profile_bytes(shapes, d), qos=1)

    def publish(self, sent: list[Sent], spread: float = 0.0) -> float:
        """Publish each delta once (within ``spread`` seconds, evenly, or as fast as possible); the start time."""
        t0 = time.perf_counter()
        n = max(1, len(sent))
        for i, s in enumerate(sent):
            if spread:
                wait = t0 + spread * i / n - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            self.send(s)
        return t0

    def send(self, s: Sent) -> None:
        """(Re)publish one delta, as a device's outbox does until it is acknowledged."""
        with self.record.lock:
            s.at = time.perf_counter()
            self.sent[s.delta_id] = s
            self.by_device[s.device] = s
        self.clients[self.conn_of[s.device]].publish(topics.delta(s.device), s.payload, qos=1)

    def unacked(self) -> list[Sent]:
        with self.record.lock:
            return [s for d, s in self.sent.items() if d not in self.record.acks]

    def wait(self, cond: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return True
            time.sleep(interval)
        return cond()

    def close(self) -> None:
        """Disconnect every client first (their network loops then end at once), then join their threads."""
        for c in self.clients:
            c.disconnect()
        for c in self.clients:
            c.loop_stop()
        self.clients = []

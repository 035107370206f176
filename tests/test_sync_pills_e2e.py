"""Pills against a real daemon process over a real broker: it keeps serving, or exits for its supervisor."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, mosquitto_binary
from sync_harness import daemon, ledger_rows, wait_connected, wait_until
from sync_messages import make_delta, make_profile

from eclm import topics, wire
from eclm.signing import generate_keys
from module_bank import DirectoryBank, Ledger

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


class Wire:
    """A raw MQTT client that publishes forged or honest messages and records what comes back."""

    def __init__(self, url: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{time.time_ns()}",
                             protocol=mqtt.MQTTv311)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.c.loop_start()
        self.c.subscribe(f"{topics.PREFIX}/devices/+/ack", qos=1)
        self.c.subscribe(f"{topics.PREFIX}/devices/+/update", qos=1)
        time.sleep(0.5)

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def send(self, msg: Any, device: str | None = None) -> None:
        kind = {"delta": "delta", "profile": "profile", "status": "status"}[msg.TYPE]
        topic = f"{topics.PREFIX}/devices/{device or msg.device_id}/{kind}"
        self.c.publish(topic, wire.encode(msg), qos=1).wait_for_publish(10)

    def acks(self, device: str) -> list[wire.AckMessage]:
        with self.lock:
            return [m for t, d in self.got if t == topics.ack(device) and isinstance(m := wire.decode(d),
                                                                                      wire.AckMessage)]

    def updates(self, device: str) -> int:
        with self.lock:
            return sum(1 for t, _ in self.got if t == topics.update(device))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def rig(digits_bank: Any, tmp_path: Path) -> Any:
    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))
    priv, _ = generate_keys(tmp_path / "keys")
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    procs: list[Any] = []

    def start(log: str = "sync.log", *extra: str) -> Any:
        # One device's delta merges alone (min devices 1): these tests are about pills, not support.
        p = daemon(bank, broker.url, priv, tmp_path / log, "--round-deltas", "1", "--round-seconds", "1",
                   "--min-devices", "1", *extra)  # later flags win
        p.start()
        wait_connected(p)
        procs.append(p)
        return p

    yield bank, broker, start
    for p in procs:
        p.kill()
    broker.stop()


def status_of(bank: Path, delta_id: str) -> str:
    return next((r[2] for r in ledger_rows(bank) if r[0] == delta_id), "")


def test_pills_do_not_stop_the_daemon(rig: Any) -> None:
    bank, broker, start = rig
    # A pill a daemon without the edge checks had stored: it used to kill every restart.
    legacy = make_delta(bank, "pill", sample_count=10**400)
    ledger = Ledger(bank / "sync.sqlite")
    ledger.store_delta(legacy.delta_id, "pill", wire.encode(legacy))
    ledger.close()
    sync = start()
    w = Wire(broker.url)
    try:
        w.send(make_profile(bank, "fake", profile_name="no-such-board", trainable=False))  # profile pill
        w.send(make_profile(bank, "d" * 200, trainable=False))  # topic pill
        w.send(make_profile(bank, "pill"))
        overflow = make_delta(bank, "pill", sample_count=10**400, seed=5)
        w.send(overflow)  # overflow pill
        for i in range(3):  # events with made-up kinds
            w.send(wire.StatusMessage("pill", True, event=f"made-up-{i}"))
        # A board that does not train asks for a bundle (no training step to export: this test is about pills).
        ask = make_profile(bank, "board", trainable=False, want_bundle=True, profile_name="pi-zero-2w")
        w.send(ask)
        for _ in range(5):  # asks again and again: one derivation runs, the rest coalesce
            w.send(ask)
        w.send(make_profile(bank, "honest"))
        good = make_delta(bank, "honest", seed=1)
        w.send(good)
        wait_until(lambda: status_of(bank, good.delta_id) == "merged", 180, "the honest delta to be merged")
        wait_until(lambda: w.updates("board") > 0, 300, "the requested bundle")
        assert sync.alive(), sync.tail()
        assert status_of(bank, legacy.delta_id) == "quarantined"
        assert [(a.status, a.reason.split(":")[0]) for a in w.acks("pill")] == [("rejected", "bad_number")]
        summary = Ledger(bank / "sync.sqlite")
        try:
            rejected = summary.summary()["rejected_by_reason"]
        finally:
            summary.close()
        assert rejected["unknown_profile"] == 1 and rejected["bad_device_id"] == 1 and rejected["bad_number"] == 1
        # Still merging after all that.
        again = make_delta(bank, "honest", seed=2)
        w.send(again)
        wait_until(lambda: status_of(bank, again.delta_id) == "merged", 180, "a second honest delta")
        assert sync.alive(), sync.tail()
    finally:
        w.close()


def test_dead_round_loop_exits_and_acks_nothing_more(rig: Any) -> None:
    bank, broker, start = rig
    blocker = DirectoryBank(bank).part_file("head", 2)
    blocker.mkdir(parents=True)  # the next version of head cannot be written: a fault of the bank
    sync = start()
    w = Wire(broker.url)
    try:
        w.send(make_profile(bank, "honest"))
        first = make_delta(bank, "honest", seed=1)
        w.send(first)
        wait_until(lambda: not sync.alive(), 120, "the daemon to exit")
        assert sync.proc.returncode not in (0, None), sync.tail()
        assert status_of(bank, first.delta_id) == "pending"  # kept for the restart, not quarantined
        late = make_delta(bank, "honest", seed=2)
        w.send(late)
        time.sleep(2)
        assert [a.delta_id for a in w.acks("honest")] == [first.delta_id]  # nothing acked after it died
        blocker.rmdir()
        start("sync2.log")
        w.send(late)
        wait_until(lambda: status_of(bank, first.delta_id) == "merged", 120, "the kept delta to be merged")
        wait_until(lambda: status_of(bank, late.delta_id) == "merged", 120, "the late delta to be merged")
    finally:
        w.close()


def test_sigusr1_merges_what_is_pending_at_once(rig: Any) -> None:
    """A daemon that would not merge for years merges the stored deltas when asked (SIGUSR1), in one round;
    the signal with nothing pending neither kills it nor merges anything."""
    import signal

    bank, broker, start = rig
    sync = start("sync.log", "--round-deltas", "1000000", "--round-seconds", "1000000000")
    sync.proc.send_signal(signal.SIGUSR1)  # nothing pending: an empty round, and it keeps running
    w = Wire(broker.url)
    try:
        deltas = []
        for i, device in enumerate(("one", "two")):
            w.send(make_profile(bank, device))
            deltas.append(make_delta(bank, device, seed=10 + i))
            w.send(deltas[-1])
        wait_until(lambda: all(status_of(bank, d.delta_id) == "pending" for d in deltas), 60, "both stored")
        time.sleep(2)
        assert all(status_of(bank, d.delta_id) == "pending" for d in deltas)  # not due by count or time
        sync.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: all(status_of(bank, d.delta_id) == "merged" for d in deltas), 60, "the asked round")
        import sqlite3

        with sqlite3.connect(bank / "sync.sqlite") as db:
            rounds = {r[0] for r in db.execute("SELECT merged_round FROM deltas WHERE delta_id IN (?, ?)",
                                               [d.delta_id for d in deltas])}
        assert len(rounds) == 1, rounds  # one round, both deltas
        assert sync.alive() and "asked by SIGUSR1" in sync.tail(200)
    finally:
        w.close()

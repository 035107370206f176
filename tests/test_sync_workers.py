"""Several merger workers on one PostgreSQL bank and one broker (real processes, real mosquitto, real PostgreSQL).

Two workers share the device topics (MQTT 5 shared subscriptions); the one merging is killed with
SIGKILL while it holds the merge claim, and the supervisor starts it again. Every delta acknowledged as
stored is merged exactly once (one lineage entry, status merged), none is lost, and the module
versions form one unbroken line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _eclm_testutil import subprocess_env
from broker import Mosquitto, mosquitto_binary
from pg import pg_url  # noqa: F401 - fixture
from sync_messages import make_delta, make_profile

from eclm import topics, wire
from module_bank import copy_bank, open_bank
from module_bank.work import holder

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto")
DEVICES = 40


def _pids_of(client_id: str) -> list[int]:
    """Processes whose command line names ``client_id`` (a worker started by the supervisor)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if client_id.encode() in cmd and b"cloud_sync.cli" in cmd:
                out.append(int(entry.name))
    return out


def test_two_workers_one_killed_mid_round_every_acked_delta_merged_once(digits_bank, pg_url: str,  # noqa: F811
                                                                         tmp_path: Path) -> None:

    copy_bank(digits_bank[0], pg_url)
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    log = (tmp_path / "workers.log").open("wb")
    try:
        _run(broker, log, pg_url, tmp_path)
    finally:
        broker.stop()
        log.close()


def _run(broker: Mosquitto, log: object, pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    import paho.mqtt.client as mqtt

    sup = subprocess.Popen([sys.executable, "-m", "cloud_sync.cli", "sync", "--bank", pg_url, "--broker",
                            broker.url, "--workers", "2", "--min-devices", "1", "--round-deltas", "8",
                            "--round-seconds", "1", "--claim-seconds", "5", "--no-gate", "--metrics-port", "0",
                            "--client-id", "eclm-sync-test"], stdout=log, stderr=subprocess.STDOUT,
                           env=subprocess_env(), start_new_session=True)
    try:
        _drive(sup, broker, log, pg_url, tmp_path, mqtt)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGTERM)
            try:
                sup.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(sup.pid, signal.SIGKILL)


def _drive(sup: subprocess.Popen[bytes], broker: Mosquitto, log: object, pg_url: str, tmp_path: Path,  # noqa: F811
           mqtt: object) -> None:
    acks: dict[str, str] = {}
    lock = threading.Lock()

    def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        msg = wire.decode(bytes(m.payload))
        if isinstance(msg, wire.AckMessage):
            with lock:
                acks.setdefault(msg.delta_id, f"{msg.status} {msg.reason}".strip())

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet")
    client.on_message = on_message
    client.connect("127.0.0.1", int(broker.url.rsplit(":", 1)[1]))
    client.subscribe(topics.device_filter("ack"), qos=1)
    client.loop_start()
    sent: list[str] = []
    killed: list[str] = []
    try:
        bank = open_bank(pg_url)
        deadline = time.time() + 60
        while len(_pids_of("eclm-sync-test-w0")) + len(_pids_of("eclm-sync-test-w1")) < 2:
            assert time.time() < deadline and sup.poll() is None, log.name
            time.sleep(0.2)
        time.sleep(4)  # both workers connected and subscribed (they load the bank first)
        for i in range(DEVICES):
            client.publish(topics.profile(f"dev-{i}"), wire.encode(make_profile(pg_url, f"dev-{i}")), qos=1)
        time.sleep(2)

        def send(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                msg = make_delta(pg_url, f"dev-{i}", seed=i)
                sent.append(msg.delta_id)
                client.publish(topics.delta(f"dev-{i}"), wire.encode(msg), qos=1)

        send(0, DEVICES // 2)
        deadline = time.time() + 60
        while not killed and time.time() < deadline:  # the worker that holds the merge claim dies mid-round
            held = holder(bank.db, "merge")
            if held is not None and held[1] > time.time():
                for pid in _pids_of(held[0]):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(held[0])
            time.sleep(0.005)
        assert killed, "no worker ever held the merge claim"
        send(DEVICES // 2, DEVICES)
        deadline = time.time() + 120
        while time.time() < deadline:
            states = bank.ledger.delta_states()
            if len(acks) == len(sent) and all(states.get(d, ("", 0))[0] == "merged" for d in sent):
                break
            time.sleep(0.5)
        states = bank.ledger.delta_states()
        lineage = bank.ledger.lineage("head")
        bank.close()
    finally:
        client.loop_stop()
        os.killpg(sup.pid, signal.SIGTERM)
        try:
            sup.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
        broker.stop()
        log.close()
    output = (tmp_path / "workers.log").read_text(errors="replace")
    assert "worker" in output and "exited with -9" in output, output[-3000:]  # the supervisor saw it and restarted
    assert len(acks) == len(sent), (len(acks), len(sent), output[-3000:])  # nothing lost
    stored = [d for d in sent if acks[d].split()[0] in ("stored", "duplicate")]
    assert len(stored) == len(sent), [a for a in acks.values() if not a.startswith(("stored", "duplicate"))]
    assert all(states[d][0] == "merged" for d in stored), {d: states.get(d) for d in stored}
    merged_in = [d for v in lineage for d in v["deltas"]]
    assert sorted(merged_in) == sorted(stored)  # each exactly once, in one version
    versions = [v["version"] for v in lineage]
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 3  # an unbroken line of versions
    shutil.rmtree(tmp_path / "broker", ignore_errors=True)

"""Device identity by certificate on a real mosquitto: the PKI's certificates, the generated broker config and ACL.

A device is its certificate's CN: it cannot publish on another device's topics, read another's updates,
or connect without a certificate of our CA that is not revoked. Then the daemon and an edge runtime
exchange a delta and its ack over mqtts, and deltas sent with another device's certificate are never stored.
"""

from __future__ import annotations

import shutil
import signal
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Mosquitto, free_port, mosquitto_binary
from sync_harness import Edge, daemon, ledger_rows, wait_connected, wait_until
from sync_messages import make_delta
from typer.testing import CliRunner

from cloud_sync import pki
from cloud_sync.broker_config import write_broker_config
from cloud_sync.cli import app as cloud_app
from cloud_sync.core import LEDGER
from eclm import topics, wire
from eclm.errors import ConfigError
from eclm.mqtt import BrokerUrl, make_client, probe
from eclm.signing import generate_keys
from exporter.data import load_dataset
from exporter.export import ExportRequest, export_bundle
from module_bank import Ledger

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (apt-get install "
                                     "-y mosquitto): this test needs the real broker")
DEVICES = ("dev1", "dev2", "dev3")


@dataclass
class Rig:
    """A PKI (dev1, dev2, dev3 revoked, cloud merger, broker for 127.0.0.1 and localhost) and its broker."""

    root: Path
    pki: Path
    broker: Mosquitto
    other_ca: Path  # a device "dev1" enrolled by another CA

    def tls(self, who: str) -> Path:
        return self.pki / ("cloud/merger" if who == "cloud" else f"devices/{who}")

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tls")
    d = root / "pki"
    pki.init_ca(d)
    for dev in DEVICES:
        pki.enroll_device(d, dev)
    pki.enroll_cloud(d, "merger")
    pki.server_cert(d, ["127.0.0.1", "localhost"])
    pki.revoke(d, "dev3")
    other = root / "other-pki"
    pki.init_ca(other)
    pki.enroll_device(other, "dev1")
    port = free_port()
    conf, _ = write_broker_config(d, port, root / "generated" / "mosquitto.conf", bind="127.0.0.1")
    broker = Mosquitto(root / "broker", port, config=conf)
    broker.start()
    try:
        yield Rig(root, d, broker, other / "devices" / "dev1")
    finally:
        broker.stop()


@dataclass
class Client:
    """A paho client that records what it receives; ``ok`` once the broker accepted the connection."""

    client: Any
    ok: threading.Event = field(default_factory=threading.Event)
    received: list[tuple[str, bytes]] = field(default_factory=list)

    def wait(self, timeout: float = 10) -> bool:
        return self.ok.wait(timeout)

    def sub(self, *filters: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(10)

    def pub(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(url: str, tls_dir: Path | None, client_id: str, custom_tls: dict[str, Any] | None = None,
            username: str | None = None) -> Client:
    """Connect with ``tls_dir``'s certificate (or, with ``custom_tls``, paho's tls_set arguments as given)."""
    broker = BrokerUrl.parse(url)
    if custom_tls is None:
        client = make_client(client_id, broker, tls_dir=tls_dir)
    else:
        client = make_client(client_id, BrokerUrl(broker.host, broker.port))
        client.tls_set(**custom_tls)
    c = Client(client)
    if username is not None:
        client.username_pw_set(username)
    client.reconnect_delay_set(5, 5)
    client.on_connect = lambda _c, _u, _f, reason, _p: c.ok.set() if not reason.is_failure else None
    client.on_message = lambda _c, _u, m: c.received.append((m.topic, bytes(m.payload)))
    try:
        client.connect(broker.host, broker.port, keepalive=10)
    except (OSError, ssl.SSLError):
        return c  # refused in the handshake: never ok
    client.loop_start()
    return c


@needs_mosquitto
def test_devices_and_cloud_connect_with_their_certificates(rig: Rig) -> None:
    for who in ("dev1", "dev2", "cloud"):
        c = connect(rig.url, rig.tls(who), f"t-{who}")
        try:
            assert c.wait(), f"{who} was not let in"
        finally:
            c.close()


@needs_mosquitto
@pytest.mark.parametrize("case", ["no certificate", "plain mqtt", "revoked", "other CA", "broker's certificate"])
def test_clients_without_a_valid_certificate_are_refused(rig: Rig, case: str) -> None:
    if case == "no certificate":
        c = connect(rig.url, None, "t-nocert", {"ca_certs": str(rig.pki / "ca.pem")})
    elif case == "plain mqtt":
        c = connect(f"mqtt://127.0.0.1:{rig.broker.port}", None, "t-plain")
    elif case == "revoked":
        c = connect(rig.url, rig.tls("dev3"), "t-revoked")
    else:  # another CA's "dev1", or the broker's own (server-only) certificate
        folder = rig.other_ca if case == "other CA" else rig.pki / "server"
        c = connect(rig.url, None, "t-other", {"ca_certs": str(rig.pki / "ca.pem"),
                                               "certfile": str(folder / "cert.pem"),
                                               "keyfile": str(folder / "key.pem")})
    try:
        assert not c.wait(4), f"{case}: the broker let the client in"
    finally:
        c.close()


@needs_mosquitto
def test_clients_say_why_tls_fails(rig: Rig, tmp_path: Path) -> None:
    def why(host: str, tls_dir: Path) -> str:
        return probe(BrokerUrl.parse(f"mqtts://{host}:{rig.broker.port}"), tls_dir)

    assert why("127.0.0.1", rig.tls("dev3")) == "TLS: sslv3 alert certificate revoked"
    assert "TLS connection succeeds" in why("127.0.0.1", rig.tls("dev1"))
    shutil.copytree(rig.other_ca, tmp_path / "other")  # another CA: the broker's certificate is not trusted
    assert "broker's certificate is not accepted" in why("127.0.0.1", tmp_path / "other")
    shutil.copy(rig.pki / "ca.pem", tmp_path / "other" / "ca.pem")  # ... and ours does not trust its certificate
    assert why("127.0.0.1", tmp_path / "other") == "TLS: tlsv1 alert unknown ca"
    assert "TLS connection succeeds" in why("localhost", rig.tls("dev1"))


@needs_mosquitto
def test_a_revoked_certificate_is_refused_after_sighup_or_restart(tmp_path: Path) -> None:
    d = pki.init_ca(tmp_path / "pki")
    for who in ("a", "b"):
        pki.enroll_device(d, who)
    pki.enroll_cloud(d, "merger")
    pki.server_cert(d, ["127.0.0.1"])
    port = free_port()
    conf, _ = write_broker_config(d, port, tmp_path / "mosquitto.conf", bind="127.0.0.1")
    broker = Mosquitto(tmp_path / "broker", port, config=conf)
    url = f"mqtts://127.0.0.1:{port}"
    broker.start()
    try:
        before = connect(url, d / "devices" / "a", "t-a")
        assert before.wait()
        before.close()
        # The broker's certificate names 127.0.0.1 only: a client that dials "localhost" refuses it.
        wrong_host = connect(f"mqtts://localhost:{port}", d / "devices" / "a", "t-host")
        assert not wrong_host.wait(3)
        wrong_host.close()
        assert "Hostname mismatch" in probe(BrokerUrl.parse(f"mqtts://localhost:{port}"), d / "devices" / "a")
        pki.revoke(d, "a")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its crlfile on SIGHUP (for new connections)
        time.sleep(0.5)
        for restart in (False, True):  # ... and at start-up
            if restart:
                broker.restart()
            after, other = connect(url, d / "devices" / "a", "t-a2"), connect(url, d / "devices" / "b", "t-b")
            try:
                assert other.wait() and not after.wait(3), f"restart={restart}"
            finally:
                after.close()
                other.close()
    finally:
        broker.stop()


@needs_mosquitto
def test_a_device_cannot_publish_as_another_or_read_anothers_topics(rig: Rig) -> None:
    cloud = connect(rig.url, rig.tls("cloud"), "t-cloud")
    dev1 = connect(rig.url, rig.tls("dev1"), "t-dev1")
    dev2 = connect(rig.url, rig.tls("dev2"), "t-dev2")
    try:
        assert cloud.wait() and dev1.wait() and dev2.wait()
        cloud.sub(*topics.CLOUD_SUBSCRIPTIONS)
        # dev1 tries to read every device's cloud->device topics and every device's uplink
        dev1.sub(*(topics.device_filter(k) for k in topics.CLOUD_KINDS + topics.DEVICE_KINDS))
        dev2.sub(topics.ack("dev2"), topics.update("dev2"), topics.request("dev2"))
        for kind in topics.DEVICE_KINDS:  # forged: dev1's certificate on dev2's topics
            dev1.pub(topics.device_filter(kind, "dev2"), b"forged by dev1")
        dev1.pub(topics.delta("dev1"), b"own delta")  # honest: dev1 on its own topic
        dev2.pub(topics.delta("dev2"), b"dev2 delta")
        for send in (topics.ack, topics.update, topics.request):  # dev1 also tries to talk to dev2 as the cloud
            dev1.pub(send("dev2"), b"forged by dev1")
            cloud.pub(send("dev2"), b"for dev2")
            cloud.pub(send("dev1"), b"for dev1")
        # Each honest message was published after the forged ones on the same connection, and the broker keeps
        # a connection's order: once the honest ones are in, a forged one let through would be in too.
        wait_until(lambda: len(cloud.received) >= 2 and len(dev1.received) >= 3 and len(dev2.received) >= 3, 20,
                   "the honest messages")
        time.sleep(0.3)
        got = {t: p for t, p in cloud.received}
        assert got == {topics.delta("dev1"): b"own delta", topics.delta("dev2"): b"dev2 delta"}, cloud.received
        # dev2 hears only the cloud; dev1 hears only what is addressed to it, never dev2's traffic
        assert sorted(dev2.received) == sorted((s("dev2"), b"for dev2") for s in (topics.ack, topics.update,
                                                                                   topics.request))
        assert sorted(dev1.received) == sorted((s("dev1"), b"for dev1") for s in (topics.ack, topics.update,
                                                                                   topics.request))
    finally:
        for c in (cloud, dev1, dev2):
            c.close()


@needs_mosquitto
def test_a_device_cannot_act_as_the_cloud_by_choosing_its_username(rig: Rig) -> None:
    """The username in CONNECT is ignored: the certificate's CN is the identity."""
    dev1 = connect(rig.url, rig.tls("dev1"), "t-dev1-as-cloud", username=pki.cloud_identity("merger"))
    cloud = connect(rig.url, rig.tls("cloud"), "t-cloud-2")
    dev2 = connect(rig.url, rig.tls("dev2"), "t-dev2-2")
    try:
        assert dev1.wait() and cloud.wait() and dev2.wait()
        dev1.sub(topics.device_filter("delta"))
        dev2.sub(topics.update("dev2"))
        cloud.sub(topics.delta("dev2"))
        dev1.pub(topics.update("dev2"), b"forged update")
        cloud.pub(topics.update("dev2"), b"real update")  # controls: the real cloud's update and dev2's delta
        dev2.pub(topics.delta("dev2"), b"dev2 delta")
        wait_until(lambda: dev2.received and cloud.received, 20, "the control messages")
        time.sleep(0.3)
        assert dev2.received == [(topics.update("dev2"), b"real update")]
        assert cloud.received == [(topics.delta("dev2"), b"dev2 delta")] and dev1.received == []
    finally:
        for c in (dev1, cloud, dev2):
            c.close()


def test_pki_refuses_what_would_blur_identities(tmp_path: Path) -> None:
    d = pki.init_ca(tmp_path / "pki")
    with pytest.raises(ConfigError, match="already holds a CA"):
        pki.init_ca(d)
    pki.enroll_device(d, "dev1")
    with pytest.raises(ConfigError, match="already enrolled"):
        pki.enroll_device(d, "dev1")
    old = pki.revoked_serials(d)
    pki.enroll_device(d, "dev1", force=True)  # a re-issue revokes the certificate it replaces
    assert len(pki.revoked_serials(d)) == len(old) + 1
    for bad in ("a/b", "x" * 65, "+", "#", "", " dev"):
        with pytest.raises(ConfigError):
            pki.enroll_device(d, bad)
    pki.enroll_cloud(d, "merger")
    with pytest.raises(ConfigError, match="cloud identity"):
        pki.enroll_device(d, "merger")
    with pytest.raises(ConfigError, match="enrolled device"):
        pki.enroll_cloud(d, "dev1")
    # a cloud identity is never a device id: the topic grammar has no "/" in device ids
    assert not topics.is_device_id(pki.cloud_identity("merger"))
    with pytest.raises(ConfigError, match="server/cert.pem"):
        write_broker_config(d, 8883, tmp_path / "m.conf")


def test_tls_client_settings_fail_in_one_line(tmp_path: Path) -> None:
    broker = BrokerUrl.parse("mqtts://broker.example.org")
    assert (broker.port, broker.tls, str(broker)) == (8883, True, "mqtts://broker.example.org:8883")
    with pytest.raises(ConfigError, match="needs a TLS folder") as no_dir:
        make_client("x", broker)
    assert "pki enroll" in str(no_dir.value.hint)
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match="lacks key.pem, ca.pem"):
        make_client("x", broker, tls_dir=tmp_path)
    with pytest.raises(ConfigError, match="not mqtts"):
        make_client("x", BrokerUrl.parse("mqtt://h"), tls_dir=tmp_path)


def test_cli_commands_write_a_pki_and_broker_config(tmp_path: Path) -> None:
    run = CliRunner().invoke
    d = str(tmp_path / "pki")
    for args in (["pki", "init", "--out", d], ["pki", "enroll", "dev1", "--pki", d],
                 ["pki", "enroll", "--cloud", "merger", "--pki", d],
                 ["pki", "server", "--host", "127.0.0.1,broker.lan", "--pki", d],
                 ["pki", "revoke", "dev1", "--pki", d],
                 ["broker-config", "--pki", d, "--port", "8883", "--out", str(tmp_path / "b" / "mosquitto.conf")]):
        result = run(cloud_app, args, prog_name="eclm-cloud")
        assert result.exit_code == 0, (args, result.output)
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "pki" / "devices" / "dev1" / "key.pem").stat().st_mode & 0o777 == 0o600
    acl = (tmp_path / "b" / "mosquitto.acl").read_text()
    assert "user eclm-cloud/merger" in acl and "pattern write eclm/v1/devices/%u/delta" in acl
    bad = run(cloud_app, ["pki", "enroll", "dev1", "--pki", d], prog_name="eclm-cloud")
    assert bad.exit_code == 17 and "--force" in bad.output
    shutil.rmtree(tmp_path / "pki" / "server")
    bad = run(cloud_app, ["broker-config", "--pki", d, "--out", str(tmp_path / "c.conf")], prog_name="eclm-cloud")
    assert bad.exit_code == 17 and "pki server" in bad.output


def _acks(c: Client) -> dict[str, str]:
    """delta id -> status of the acks a client received."""
    out = {}
    for _t, payload in c.received:
        msg = wire.decode(payload)
        if isinstance(msg, wire.AckMessage):
            out[msg.delta_id] = msg.status
    return out


def _rejects(bank: Path) -> dict[str, int]:
    """Rejections by reason, as `eclm-cloud status` reads them."""
    ledger = Ledger(bank / LEDGER)
    try:
        return dict(ledger.summary()["rejected_by_reason"])
    finally:
        ledger.close()


@needs_mosquitto
def test_sync_and_an_edge_exchange_a_delta_over_mqtts_and_forged_deltas_are_never_stored(
        rig: Rig, digits_bank: Any, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(digits_bank[0], bank)
    (tmp_path / "keys").mkdir()
    priv, pub = generate_keys(tmp_path / "keys")
    sync = daemon(bank, rig.url, priv, tmp_path / "sync.log", "--round-deltas", "1000", "--round-seconds", "3600",
                  "--tls-dir", str(rig.tls("cloud")))
    bundle = tmp_path / "bundle"
    export_bundle(ExportRequest(bank, profile="pi4", out_dir=bundle, classes=[1, 4, 7], measure=False,
                                signing_key=priv))
    edge = Edge("dev1", bundle, tmp_path / "state", rig.url, pub, tmp_path / "dev1.log", "--tls-dir",
                str(rig.tls("dev1")), env={"ECLM_EDGE_RESOURCE_INTERVAL_S": "0"})
    watch1 = connect(rig.url, rig.tls("dev1"), "t-watch-dev1")  # sees dev1's acks
    forger = connect(rig.url, rig.tls("dev2"), "t-forger")  # holds dev2's certificate, sends deltas naming dev1
    try:
        sync.start()
        wait_connected(sync)
        edge.start()
        assert watch1.wait() and forger.wait()
        watch1.sub(topics.ack("dev1"))
        forger.sub(topics.ack("dev2"), topics.ack("dev1"))
        wait_until(lambda: edge.get("/v1/status")["sync"]["connected"], 60, "the edge to connect over mqtts")
        # The edge's own delta travels over mqtts and is acknowledged: the outbox empties.
        data = load_dataset("digits")
        mask = np.isin(data.y, [1, 4, 7])
        x, y = data.x[mask][:60], data.y[mask][:60]
        code, out = edge.post("/v1/samples", {"inputs": x.tolist(), "labels": y.tolist()})
        assert code == 200, out
        produced = edge.train_and_wait().get("delta_id")
        assert produced, "training made no delta"
        edge.wait_outbox_empty()
        assert any(r[0] == produced and r[1] == "dev1" for r in ledger_rows(bank)), "the edge's delta is not stored"
        # Forgeries: dev2's certificate sends valid deltas that name dev1, on dev1's topic and on its own.
        forged = []
        for i in range(5):
            for topic in (topics.delta("dev1"), topics.delta("dev2")):
                msg = make_delta(bank, "dev1", seed=100 + i)
                forged.append(msg.delta_id)
                forger.pub(topic, wire.encode(msg, codec="int8+zlib"))
        control = make_delta(bank, "dev1", seed=7)  # the same kind of delta from dev1's own certificate is stored
        watch1.pub(topics.delta("dev1"), wire.encode(control, codec="int8+zlib"))
        wait_until(lambda: _acks(watch1).get(control.delta_id) == "stored", 30, "the control delta to be stored")
        time.sleep(1.0)
        stored = {r[0] for r in ledger_rows(bank)}
        accepted = [d for d in forged if d in stored or _acks(watch1).get(d) == "stored"
                    or _acks(forger).get(d) == "stored"]
        print(f"forged deltas accepted: {len(accepted)} of {len(forged)}")
        assert accepted == []
        # The five on dev2's own topic reached the daemon and were refused for naming dev1; the five on dev1's
        # topic never reached it (the broker's ACL dropped them).
        assert _rejects(bank).get("device_mismatch") == 5
        assert sync.alive(), sync.tail()
    finally:
        watch1.close()
        forger.close()
        edge.proc.kill()
        sync.kill()


def test_mqtts_without_a_usable_tls_folder_is_a_one_line_error(tmp_path: Path) -> None:
    from edge_runtime.cli import app as edge_app

    run = CliRunner().invoke
    state = str(tmp_path / "state")
    url = "mqtts://127.0.0.1:1"
    no_dir = run(edge_app, ["serve", "--broker", url, "--state-dir", state], prog_name="eclm-edge", env={})
    assert no_dir.exit_code == 17 and "needs a TLS folder" in no_dir.output and "pki enroll" in no_dir.output
    (tmp_path / "tls").mkdir()
    by_env = run(edge_app, ["serve", "--broker", url, "--state-dir", state], prog_name="eclm-edge",
                 env={"ECLM_TLS_DIR": str(tmp_path / "tls")})
    assert by_env.exit_code == 17 and "lacks cert.pem, key.pem, ca.pem" in by_env.output
    conf = tmp_path / "edge.toml"
    conf.write_text(f'[edge]\nbroker = "{url}"\ntls_dir = "{tmp_path / "tls"}"\n')
    by_file = run(edge_app, ["serve", "--config", str(conf), "--state-dir", state], prog_name="eclm-edge", env={})
    assert by_file.exit_code == 17 and "lacks cert.pem" in by_file.output
    assert not (tmp_path / "state").exists()  # nothing was started or written
    cloud = run(cloud_app, ["sync", "--bank", str(tmp_path / "bank"), "--broker", url, "--metrics-port", "0"],
                prog_name="eclm-cloud", env={})
    assert cloud.exit_code == 17 and "needs a TLS folder" in cloud.output
    assert not (tmp_path / "bank").exists()


@needs_mosquitto
def test_the_demo_runs_its_broker_daemon_and_edges_over_mqtts(tmp_path: Path) -> None:
    """`eclm demo --tls` wiring without the two-minute run: its broker, the daemon's and each edge's TLS folder."""
    from bench.broker import CLOUD_NAME, start_tls_broker
    from bench.cli import app as bench_app
    from bench.demo import DEVICES, run_demo

    names = [d.name for d in DEVICES]
    broker, d = start_tls_broker(tmp_path / "demo", names)
    clients = []
    try:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        cloud = connect(broker.url, d / "cloud" / CLOUD_NAME, "t-demo-cloud")
        clients.append(cloud)
        assert cloud.wait()
        cloud.sub(*topics.CLOUD_SUBSCRIPTIONS)
        for name in names:
            c = connect(broker.url, d / "devices" / name, f"t-demo-{name}")
            clients.append(c)
            assert c.wait(), name
            c.pub(topics.delta(name), name.encode())
        wait_until(lambda: len(cloud.received) == len(names), 10, "the demo's cloud to hear every device")
        assert sorted(cloud.received) == sorted((topics.delta(n), n.encode()) for n in names)
    finally:
        for c in clients:
            c.close()
        broker.stop()
    with pytest.raises(ConfigError, match="--tls starts the demo's own broker"):
        run_demo(tmp_path / "never", "mqtt://127.0.0.1:1883", tls=True)
    assert not (tmp_path / "never").exists()  # refused before anything was trained or started
    result = CliRunner().invoke(bench_app, ["demo", "--tls", "--broker", "mqtt://127.0.0.1:1883", "--workdir",
                                            str(tmp_path / "never")], prog_name="eclm")
    assert result.exit_code == 17, result.output

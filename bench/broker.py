"""A private mosquitto broker (own port, own persistence folder) for the demo, benchmarks and tests."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.reaper import track


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


class Mosquitto:
    """Starts ``mosquitto -c conf`` on a free loopback port with persistence, so restarts keep sessions.

    With ``config`` (e.g. from `eclm-cloud broker-config`, whose listener must be on ``port``) that file
    supplies the listeners and authentication; this class adds only the user and persistence settings.
    """

    def __init__(self, folder: Path, port: int | None = None, config: Path | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        if config is not None and port is None:
            raise ValueError("a given config names its own listener: pass its port")
        self.port = port or free_port()
        self.conf = folder / "mosquitto.conf"
        # As root mosquitto would switch to its own user, which cannot write our persistence folder.
        base = (f"user {getpass.getuser()}\npersistence true\npersistence_location {folder}/\nautosave_interval 1\n"
                "max_queued_messages 100000\n")
        listeners = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n" if config is None else config.read_text()
        self.tls = config is not None and "\ncertfile " in listeners
        self.conf.write_text(base + listeners)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.folder / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = track(subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class EmbeddedBroker:
    """A pure-Python broker (amqtt) in a background thread, for machines without mosquitto."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        import asyncio

        from amqtt.broker import Broker

        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "sys_interval": 0, "auth": {"allow-anonymous": True}}
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            broker = Broker(config, loop=loop)
            loop.run_until_complete(broker.start())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="eclm-embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError("the embedded broker did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


class ExternalBroker:
    """A broker someone else runs; nothing to start or stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def start_broker(url: str | None, folder: Path) -> Mosquitto | EmbeddedBroker | ExternalBroker:
    """The broker named by ``url``; else a private mosquitto when the binary exists; else an embedded one."""
    broker: Mosquitto | EmbeddedBroker | ExternalBroker
    if url:
        broker = ExternalBroker(url)
    elif mosquitto_binary() is not None:
        broker = Mosquitto(folder)
    else:
        broker = EmbeddedBroker()
    broker.start()
    return broker


CLOUD_NAME = "merger"


def start_tls_broker(workdir: Path, devices: list[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
                     ) -> tuple[Mosquitto, Path]:
    """A private mosquitto that only lets in certificates of a fresh PKI in ``workdir/pki``.

    The PKI holds the broker's certificate for ``hosts``, the cloud identity ``merger`` (its TLS folder:
    ``pki/cloud/merger``) and one certificate per device (``pki/devices/NAME``); the broker runs the
    configuration and ACL that `eclm-cloud broker-config` writes. Returns the started broker and the PKI.
    """
    from cloud_sync import pki
    from cloud_sync.broker_config import write_broker_config

    d = workdir / "pki"
    pki.init_ca(d)
    pki.server_cert(d, list(hosts))
    pki.enroll_cloud(d, CLOUD_NAME)
    for name in devices:
        pki.enroll_device(d, name)
    port = free_port()
    conf, _ = write_broker_config(d, port, workdir / "broker-config" / "mosquitto.conf", bind="127.0.0.1")
    broker = Mosquitto(workdir / "broker", port, config=conf)
    broker.start()
    return broker, d

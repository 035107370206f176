"""Broker URLs and a configured paho-mqtt client, shared by the device and the cloud daemon."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from eclm.errors import ConfigError
from eclm.hashing import atomic_write_bytes

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class BrokerUrl:
    """``mqtt://[user[:password]@]host[:port]``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @staticmethod
    def parse(url: str) -> BrokerUrl:
        try:
            u = urlparse(url)
        except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
            raise ConfigError(f"broker URL {url!r} is malformed: {exc}",
                              hint=f"e.g. {DEFAULT_BROKER} (IPv6: mqtt://[::1]:1883)") from None
        if u.scheme != "mqtt" or not u.hostname:
            raise ConfigError(f"broker URL {url!r} is not mqtt://HOST[:PORT]",
                              hint=f"e.g. {DEFAULT_BROKER} (TLS brokers are not supported yet)")
        try:
            port = u.port or 1883
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} has a bad port", hint="use a port 1..65535") from exc
        return BrokerUrl(u.hostname, port, unquote(u.username) if u.username else None,
                         unquote(u.password) if u.password else None)

    def __str__(self) -> str:  # never prints the password
        return f"mqtt://{self.host}:{self.port}"


def make_client(client_id: str, broker: BrokerUrl, will: tuple[str, bytes] | None = None) -> Any:
    """A paho client with a persistent session (queued QoS 1 messages survive disconnects) and back-off."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                         protocol=mqtt.MQTTv311)
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    # A callback that raises anyway (they all catch their own errors) is logged, and the network loop lives on.
    client.suppress_exceptions = True
    client.on_log = _log_callback_errors
    return client


def _log_callback_errors(_c: Any, _u: Any, _level: int, buf: str) -> None:
    """Paho's log, of which only the exceptions it caught in callbacks matter (the rest is chatter)."""
    if buf.startswith("Caught exception"):
        logging.getLogger("eclm.mqtt").error("an MQTT callback raised (the network loop goes on): %s", buf)


def install_client_id(folder: Path, prefix: str) -> str:
    """``PREFIX-SUFFIX``: a random suffix made on first use and kept in ``folder/mqtt-client-id``.

    Stable across restarts (the broker's persistent session survives them) but not guessable from
    the device id, so nobody can take the session over by connecting with the same client id.
    """
    path = folder / "mqtt-client-id"
    try:
        suffix = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        suffix = ""
    if len(suffix) != 16 or not all(c in "0123456789abcdef" for c in suffix):
        suffix = secrets.token_hex(8)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (suffix + "\n").encode())
    return f"{prefix}-{suffix}"

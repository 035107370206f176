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
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
TLS_FILES = ("cert.pem", "key.pem", "ca.pem")  # what `eclm-cloud pki enroll` writes for one identity


@dataclass(frozen=True)
class BrokerUrl:
    """``mqtt://[user[:password]@]host[:port]`` or, over TLS with a client certificate, ``mqtts://host[:port]``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @staticmethod
    def parse(url: str) -> BrokerUrl:
        try:
            u = urlparse(url)
        except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
            raise ConfigError(f"broker URL {url!r} is malformed: {exc}",
                              hint=f"e.g. {DEFAULT_BROKER} (IPv6: mqtt://[::1]:1883)") from None
        if u.scheme not in DEFAULT_PORTS or not u.hostname:
            raise ConfigError(f"broker URL {url!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
                              hint=f"e.g. {DEFAULT_BROKER}, or mqtts://broker.example.org:8883 with --tls-dir")
        try:
            port = u.port or DEFAULT_PORTS[u.scheme]
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} has a bad port", hint="use a port 1..65535") from exc
        return BrokerUrl(u.hostname, port, unquote(u.username) if u.username else None,
                         unquote(u.password) if u.password else None, tls=u.scheme == "mqtts")

    def __str__(self) -> str:  # never prints the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def check_tls(broker: BrokerUrl, tls_dir: Path | None) -> Path | None:
    """The TLS folder to use for ``broker``: required (with every file) for mqtts://, refused for mqtt://."""
    if not broker.tls:
        if tls_dir is not None:
            raise ConfigError(f"a TLS folder ({tls_dir}) is set but the broker URL {broker} is not mqtts://",
                              hint=f"use mqtts://{broker.host}:8883, or drop the TLS folder")
        return None
    if tls_dir is None:
        raise ConfigError(f"broker {broker} needs a TLS folder with cert.pem, key.pem and ca.pem",
                          hint="pass --tls-dir (ECLM_TLS_DIR) with a folder made by `eclm-cloud pki enroll ...`")
    missing = [f for f in TLS_FILES if not (tls_dir / f).is_file()]
    if missing:
        raise ConfigError(f"TLS folder {tls_dir} lacks {', '.join(missing)}",
                          hint="copy the folder `eclm-cloud pki enroll ID --pki DIR` wrote (DIR/devices/ID)")
    return tls_dir


SESSION_EXPIRY = 7 * 24 * 3600  # MQTT 5: seconds the broker keeps a disconnected client's session and queue


def make_client(client_id: str, broker: BrokerUrl, will: tuple[str, bytes] | None = None,
                tls_dir: Path | None = None, *, mqtt5: bool = False, manual_ack: bool = False) -> Any:
    """A paho client with a persistent session (queued QoS 1 messages survive disconnects) and back-off.

    For ``mqtts://`` the client presents ``tls_dir``'s certificate (its identity: the broker takes the
    certificate's CN as the username) and verifies the broker's certificate and host name against ca.pem.
    """
    import paho.mqtt.client as mqtt

    if mqtt5:  # shared subscriptions ($share/...) and session expiry; the session persists as with 3.1.1
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             manual_ack=manual_ack)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                             protocol=mqtt.MQTTv311, manual_ack=manual_ack)
    folder = check_tls(broker, tls_dir)
    if folder is not None:
        import ssl

        try:
            client.tls_set(ca_certs=str(folder / "ca.pem"), certfile=str(folder / "cert.pem"),
                           keyfile=str(folder / "key.pem"), cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"cannot use the TLS files in {folder}: {exc}",
                              hint="re-issue them with `eclm-cloud pki enroll ID --pki DIR --force`") from exc
        client.tls_insecure_set(False)  # the broker's certificate must name the host we connect to
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


def connect_options(mqtt5: bool) -> dict[str, Any]:
    """What ``connect_async`` needs for a persistent session: with MQTT 5, no clean start and a session expiry."""
    if not mqtt5:
        return {}
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    return {"clean_start": False, "properties": props}


def probe(broker: BrokerUrl, tls_dir: Path | None = None) -> str:
    """Why a connection to the broker fails, in the system's words (over TLS: the TLS layer's, e.g. a revoked
    certificate or a host name the broker's certificate does not name).
    """
    import socket
    import ssl

    try:
        with socket.create_connection((broker.host, broker.port), timeout=3) as sock:
            if not broker.tls or tls_dir is None:
                return "the TCP connection succeeds, the MQTT handshake does not"
            ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
            ctx.load_cert_chain(str(tls_dir / "cert.pem"), str(tls_dir / "key.pem"))
            with ctx.wrap_socket(sock, server_hostname=broker.host) as tls:
                try:
                    tls.recv(1)  # TLS 1.3: the broker's verdict on our certificate comes after the handshake
                except TimeoutError:
                    pass
            return "the TLS connection succeeds, the MQTT handshake does not"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the broker's certificate is not accepted ({exc.verify_message})"
    except ssl.SSLError as exc:  # e.g. the broker's alert: our certificate is revoked or of another CA
        return f"TLS: {str(exc.reason or exc).lower().replace('_', ' ')}"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


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

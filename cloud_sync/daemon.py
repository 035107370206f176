"""`eclm-cloud sync`: the merger daemon's MQTT loop. Decisions are in :mod:`cloud_sync.core`; this only moves bytes."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from cloud_sync.core import LEDGER, Publication, SyncCore, SyncSettings
from cloud_sync.ingest import Ingest
from cloud_sync.ports import SyncHooks
from eclm import topics
from eclm.errors import BrokerError, EclmError
from eclm.mqtt import BrokerUrl, check_tls, connect_options
from eclm.signing import Signer
from module_bank import Ledger, is_postgres

__all__ = ["LEDGER", "CLIENT_ID_FILE", "SyncCore", "SyncDaemon", "SyncHooks", "SyncSettings", "client_id_for"]
log = logging.getLogger("eclm.sync")
QUEUE_FULL = 15  # paho's MQTT_ERR_QUEUE_SIZE: publish() refused the message, nothing is queued
CLIENT_ID_FILE = "sync-client-id"


def client_id_for(bank: Path | str, ledger: Ledger | None = None) -> str:
    """The MQTT client id of this install: ``eclm-sync-`` plus a random suffix created once and kept with the bank
    (a file in a bank directory; the ledger's meta table in a PostgreSQL bank).

    A fixed, guessable id with a persistent session would let anyone take the daemon's session over.
    """
    if is_postgres(bank):
        if ledger is None:
            raise ValueError("a PostgreSQL bank keeps its client id in the ledger")
        made = f"eclm-sync-{secrets.token_hex(8)}"
        ledger.set_meta_once("sync_client_id", made)
        return ledger.meta("sync_client_id") or made
    path = Path(bank) / CLIENT_ID_FILE
    try:
        found = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        found = ""
    if found.startswith("eclm-sync-") and 16 <= len(found) <= 64 and topics.is_device_id(found):
        return found
    made = f"eclm-sync-{secrets.token_hex(8)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(made + "\n", encoding="utf-8")
    tmp.replace(path)
    return made


class SyncDaemon:
    """The MQTT side: subscribes, feeds :class:`SyncCore`, publishes what it returns, runs rounds.

    If the round loop or the derivation worker dies, the daemon stops handling (so it acknowledges
    nothing more) and :meth:`run` raises: the process exits non-zero for its supervisor to restart it.
    """

    def __init__(self, settings: SyncSettings, signer: Signer | None, hooks: SyncHooks,
                 merge_now: threading.Event | None = None) -> None:
        self.broker = BrokerUrl.parse(settings.broker)
        check_tls(self.broker, settings.tls_dir)  # a missing certificate fails now, with a hint
        self.core = SyncCore(settings, signer, hooks)
        self.settings = settings
        self.client_id = settings.client_id or client_id_for(settings.bank_dir, self.core.ledger)
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.dead = threading.Event()  # set when a worker loop died: no more acks
        self.merge_now = merge_now or threading.Event()  # set (SIGUSR1): the next check runs a round, due or not
        self.client: Any = None
        self.core.owner = self.core.derivations.owner = self.client_id
        self.ingest = Ingest(self.core.handle_many, self._publish, self._ack, settings.ingest_batch)

    def _publish(self, pubs: list[Publication]) -> None:
        for topic, data in pubs:
            self._publish_one(topic, data)

    def _publish_one(self, topic: str, data: bytes) -> None:
        """Hand one QoS 1 message to the client, waiting while its queue is full (65,535 unacknowledged
        messages: a round's updates to a large fleet reach that); never drops it silently.
        """
        next_warning = 0.0
        while True:
            rc = getattr(self.client.publish(topic, data, qos=1), "rc", 0)
            if rc != QUEUE_FULL:
                return
            if self.stop.is_set() or self.dead.is_set():
                log.error("not sent (the client's queue is full and the daemon stops): %s", topic[:200])
                return
            if time.monotonic() >= next_warning:  # once, then every 30 s while it stays full
                log.warning("the MQTT client's queue is full: waiting for the broker to take messages")
                next_warning = time.monotonic() + 30.0
            time.sleep(0.01)

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        # Queued for the ingest thread, which stores it and only then sends the broker's PUBACK.
        if self.dead.is_set():  # the work behind an ack would not happen: acknowledge nothing
            return
        try:
            self.ingest.put(str(m.topic), bytes(m.payload), int(m.mid), int(m.qos))
        except Exception:  # never let a message kill the network loop
            log.exception("message on %s failed", str(m.topic)[:200])

    def _ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def subscriptions(self) -> list[str]:
        """The device topics, shared with the other workers of the group when there is one."""
        group = self.settings.share_group
        return [f"$share/{group}/{t}" if group else t for t in topics.CLOUD_SUBSCRIPTIONS]

    def run(self) -> None:
        from eclm.mqtt import make_client, probe

        shared = bool(self.settings.share_group)
        client = make_client(self.client_id, self.broker, tls_dir=self.settings.tls_dir, mqtt5=shared,
                             manual_ack=True)
        self.client = client

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if getattr(reason, "is_failure", False):
                log.error("broker %s refused the connection: %s", self.broker, reason)
                return
            for t in self.subscriptions():
                c.subscribe(t, qos=1)
            self.connected.set()
            log.info("connected to %s as %s", self.broker, self.client_id)

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self.connected.clear()
            if self.stop.is_set() or self.dead.is_set():
                log.info("disconnected from %s", self.broker)
            else:
                log.warning("disconnected from %s (%s); reconnecting", self.broker, reason)

        failures = [0]

        def on_connect_fail(_c: Any, _u: Any) -> None:
            failures[0] += 1
            if failures[0] == 1 or failures[0] % 20 == 0:
                log.warning("cannot connect to %s (%s; attempt %d); retrying every 1-30 s", self.broker,
                            probe(self.broker, self.settings.tls_dir), failures[0])

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = self._on_message
        self.core.derivations.publish = self._publish
        try:
            client.connect_async(self.broker.host, self.broker.port, keepalive=30, **connect_options(shared))
        except OSError as exc:
            raise BrokerError(f"cannot reach broker {self.broker}: {exc}",
                              hint="start the broker or fix --broker") from exc
        self.core.derivations.start()
        self.ingest.start()
        client.loop_start()
        try:
            self._loop()
        finally:
            self.ingest.close()
            client.loop_stop()
            client.disconnect()
            self.core.close()

    def _loop(self) -> None:
        try:
            self._rounds()
        except BaseException:
            self.dead.set()  # from here on nothing is handled, so nothing is acknowledged
            raise

    def _rounds(self) -> None:
        while not self.stop.wait(0.5):
            if not self.core.derivations.alive():
                raise EclmError(f"the derivation worker died: {self.core.derivations.error}",
                                hint="restart the daemon (a supervisor does this on a non-zero exit)")
            if not self.ingest.alive():
                raise EclmError(f"the ingest thread died: {self.ingest.error}",
                                hint="restart the daemon (a supervisor does this on a non-zero exit)")
            self.core.merger.refresh()  # what other workers merged, for the checks on incoming deltas
            asked = self.merge_now.is_set()
            if asked:
                self.merge_now.clear()
                log.info("merging what is pending now (asked by SIGUSR1)")
            if asked or self.core.due():
                result, pubs = self.core.run_round()
                if result is not None:
                    log.info("round %d: %d merged, %d held, %d quarantined, versions %s", result.round,
                             len(result.merged), len(result.held), len(result.quarantined), result.versions)
                self._publish(pubs)
                self.core.round_published()

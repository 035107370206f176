"""The device's MQTT side: publish the outbox (QoS 1, dropped only on the cloud's ack), receive updates."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from eclm import topics, wire
from eclm.errors import BundleError, DataError, EclmError
from eclm.mqtt import BrokerUrl, install_client_id, make_client, probe
from eclm.signing import Verifier, load_verifier
from edge_runtime.outbox import Outbox
from edge_runtime.service import EdgeService
from edge_runtime.sync_health import SyncHealth

log = logging.getLogger("eclm.edge.sync")


def delta_message(service: EdgeService, path: Path) -> wire.DeltaMessage:
    """The wire message of one outbox file."""
    entry = Outbox.read(path)
    meta = entry.meta
    parts = {pid: list(p["params"]) for pid, p in meta["parts"].items()}
    return wire.DeltaMessage(
        delta_id=entry.delta_id,
        device_id=service.cfg.device_id,
        bank_id=str(meta["bank_id"]),
        bundle=str(meta.get("bundle", "")),
        base_versions={pid: int(p["base_version"]) for pid, p in meta["parts"].items()},
        parts=parts,
        tensors=entry.tensors,
        sample_count=int(meta.get("sample_count", 1)),
        importance=meta.get("importance"),
        metrics={k: v for k, v in dict(meta.get("metrics", {})).items() if v is not None},
        accepted_locally=bool(meta.get("accepted_locally", True)),
        environment=str(meta.get("environment", "")),
        base_environment=str(meta.get("base_environment", "")),
        created=float(meta.get("created", time.time())),
    )


class EdgeSync:
    """Connects to the broker (reconnecting with back-off), flushes the outbox, applies signed updates."""

    def __init__(self, service: EdgeService) -> None:
        cfg = service.cfg
        if cfg.broker is None:
            raise DataError("no broker configured", hint="pass --broker mqtt://HOST:PORT")
        self.service = service
        self.broker = BrokerUrl.parse(cfg.broker)
        self.device = cfg.device_id
        self.verifier: Verifier | None = load_verifier(cfg.trust_key) if cfg.trust_key else None
        self.inflight: dict[str, float] = {}
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.updates: queue.Queue[wire.Message] = queue.Queue(maxsize=16)
        cap = cfg.max_reassembly_bytes  # one legitimate sender (the cloud): it may use the whole cap
        self.reassembler = wire.Reassembler(max_total_bytes=cap, max_sender_bytes=cap, max_message_bytes=cap)
        self._last_profile: list[list[float]] | None = None
        self._lock = threading.Lock()
        offline = wire.encode(wire.StatusMessage(self.device, False))
        self.client_id = install_client_id(cfg.state_dir, f"eclm-edge-{self.device}")
        self.client = make_client(self.client_id, self.broker, will=(topics.status(self.device), offline),
                                  tls_dir=cfg.tls_dir)
        self.health = SyncHealth(self.client, service.metrics, self.stop)
        guard = self.health.guard
        self.client.on_connect = guard("on_connect")(self._on_connect)
        self.client.on_connect_fail = guard("on_connect_fail")(self._on_connect_fail)
        self.client.on_disconnect = guard("on_disconnect")(self._on_disconnect)
        self.client.on_message = guard("on_message")(self._on_message)
        self.client.on_subscribe = guard("on_subscribe")(lambda *_a: None)
        self.client.on_publish = guard("on_publish")(lambda *_a: None)
        if self.verifier is None:
            log.warning("no --trust-key: acks and updates from the broker are NOT verified; anyone who can publish "
                        "to %s can make this device drop deltas from its outbox (updates are refused). Configure "
                        "--trust-key with the cloud's signing.pub", topics.ack(self.device))
        self._failures = 0
        self._last_error: str | None = None
        self._since = time.time()  # of the current state (connected or not)
        service.listeners.append(self._on_event)
        service.sync_report = self.report

    # -- connection
    def start(self) -> None:
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=20)
        self.client.loop_start()
        self.health.start_worker("outbox", self._flush_loop)
        self.health.start_worker("updates", self._update_loop)

    def close(self) -> None:
        self.stop.set()
        if self.connected.is_set():
            self._publish(topics.status(self.device), wire.encode(wire.StatusMessage(self.device, False)), retain=True)
        self.client.disconnect()
        self.client.loop_stop()
        self.health.join(60)  # an update being applied (a refined one trains) finishes before the service closes

    def report(self) -> dict[str, Any]:
        """The connection as status shows it: offline is said, with the last error and since when."""
        health = self._check_health()
        connected = self.connected.is_set()
        return {"broker": str(self.broker), "client_id": self.client_id, "connected": connected,
                "since": self._since, "failed_attempts": self._failures,
                "last_error": None if connected else self._last_error,
                "mode": "online" if connected else "offline: serving and keeping deltas in the outbox, retrying",
                **health}

    def _check_health(self) -> dict[str, Any]:
        """Restart dead sync threads (see :class:`SyncHealth`); a dead network loop is not a connection."""
        health = self.health.check()
        if not health["network_loop"] and self.connected.is_set():
            self.connected.clear()
            self.service.metrics.broker_connected.set(0)
        return health

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        """Paho could not reach the broker (it retries with back-off up to 30 s): say so, do not stop serving."""
        self._failures += 1
        if self._failures == 1 or self._failures % 20 == 0:
            self._last_error = probe(self.broker, self.service.cfg.tls_dir)
            log.warning("broker %s cannot be reached (%s; attempt %d): serving offline, deltas wait in the "
                        "outbox; retrying every 1-30 s", self.broker, self._last_error, self._failures)

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._failures += 1
            self._last_error = f"refused: {reason}"
            log.error("broker %s refused the connection: %s", self.broker, reason)
            return
        self._failures = 0
        self._last_error = None
        self._since = time.time()
        for t in (topics.ack(self.device), topics.update(self.device), topics.request(self.device)):
            client.subscribe(t, qos=1)
        self.connected.set()
        self.service.metrics.broker_connected.set(1)
        s = self.service.serving
        self._publish(topics.status(self.device),
                      wire.encode(wire.StatusMessage(self.device, True, s.digest, s.generation)), retain=True)
        with self._lock:
            self.inflight.clear()  # resend whatever was not acknowledged before the reconnect
        self.publish_profile()
        log.info("connected to %s", self.broker)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        self._since = time.time()
        self.service.metrics.broker_connected.set(0)
        if self.stop.is_set():  # our own shutdown: nothing to reconnect
            log.info("disconnected from %s", self.broker)
        else:
            self._last_error = f"disconnected: {reason}"
            log.warning("disconnected from %s (%s); serving offline, will reconnect", self.broker, reason)

    def _publish(self, topic: str, data: bytes, retain: bool = False) -> None:
        for part in wire.chunk(data, self.service.cfg.max_payload):
            self.client.publish(topic, part, qos=1, retain=retain and len(part) == len(data))
            self.service.metrics.uplink_bytes.inc(len(part))

    # -- outgoing
    def _on_event(self, event: str, detail: dict[str, Any]) -> None:
        """Tell the cloud about rollbacks, variant switches and drift; ask for a bundle on importance drift."""
        if not self.connected.is_set():
            return
        s = self.service.serving
        status = wire.StatusMessage(self.device, True, s.digest, s.generation, event,
                                    {k: v for k, v in detail.items() if isinstance(v, str | int | float | bool | dict)})
        self._publish(topics.status(self.device), wire.encode(status))
        if event == "drift" and detail.get("kind") == "importance":
            self.publish_profile(want_bundle=True)
        elif event == "environment":  # the cloud sends the lines of the environment entered
            self.publish_profile()

    def publish_profile(self, want_bundle: bool = False) -> None:
        """Tell the cloud where this device's data routes, what it holds and what it is."""
        s = self.service.serving
        derived_for = [list(map(float, row)) for row in s.manifest.importance]
        importance = self.service.importance()
        measured = importance is not None
        if importance is None:
            importance = derived_for
        msg = wire.ProfileMessage(
            device_id=self.device, bank_id=s.manifest.bank_id, bundle=s.digest, importance=importance,
            sample_count=self.service.store.count(),
            profile_name=self.service.cfg.profile_name or s.manifest.profile["name"],
            modules=s.module_versions, trainable=s.trainable, want_bundle=want_bundle, measured=measured,
            derived_for=derived_for, environment=self.service.environment, line=s.line)
        self._last_profile = importance
        self._publish(topics.profile(self.device), wire.encode(msg))

    def flush_once(self) -> int:
        """Publish every outbox entry that is not in flight (or whose ack is overdue); returns how many."""
        if not self.connected.is_set():
            return 0
        sent = 0
        now = time.time()
        for path in self.service.outbox.pending():
            delta_id = path.stem.split("-", 1)[1]
            with self._lock:
                if now - self.inflight.get(delta_id, 0.0) < self.service.cfg.resend_s:
                    continue
                self.inflight[delta_id] = now
            try:
                msg = delta_message(self.service, path)
            except (DataError, KeyError, ValueError, TypeError) as exc:
                log.error("outbox entry %s is unreadable (%s); set aside", path.name, exc)
                self.service.outbox.quarantine(path)
                continue
            self._publish(topics.delta(self.device), wire.encode(msg, codec=self.service.cfg.codec))
            sent += 1
        return sent

    def _flush_loop(self) -> None:
        last_trained = None
        while not self.stop.wait(1.0):
            try:
                self._check_health()  # restarts a dead sibling worker or network loop
                self.flush_once()
                lt = self.service.last_training
                if lt is not None and lt is not last_trained and self.connected.is_set():
                    last_trained = lt
                    self.publish_profile()
            except Exception:  # keep trying; the outbox is durable
                log.exception("outbox flush failed")

    # -- incoming
    def _refuse(self, reason: str, detail: str) -> None:
        self.health.refuse(reason, detail)

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        payload = bytes(m.payload)
        self.service.metrics.downlink_bytes.inc(len(payload))
        self.health.handled()
        try:
            msg = wire.decode(payload, self.verifier, max_bytes=self.service.cfg.max_payload * 2)
            if isinstance(msg, wire.ChunkMessage):
                whole = self.reassembler.add(msg, topics.kind_of(str(m.topic)))
                if whole is None:
                    return
                msg = wire.decode(whole, self.verifier, max_bytes=self.service.cfg.max_reassembly_bytes)
        except wire.ChunkRefused as exc:
            self._refuse(f"chunk_{exc.reason}", f"on {m.topic}: {exc.message}")
            return
        except BundleError as exc:
            self._refuse("bad_signature", f"on {m.topic}: {exc.message}")
            self.service.metrics.bundle_rejections.inc()
            return
        except EclmError as exc:
            self._refuse("malformed", f"on {m.topic}: {exc.message}")
            return
        if isinstance(msg, wire.AckMessage):
            self._on_ack(msg)
        elif isinstance(msg, wire.RequestMessage):
            if msg.kind == "profile":
                self.publish_profile()
        elif isinstance(msg, wire.ModuleUpdateMessage | wire.BundleUpdateMessage):
            if isinstance(msg, wire.ModuleUpdateMessage) and msg.device_id != self.device:
                self._refuse("wrong_device", f"module update {msg.update_id[:40]} is addressed to "
                             f"{msg.device_id[:130]!r}, not {self.device!r}")
                return
            try:
                self.updates.put_nowait(msg)
            except queue.Full:
                self._refuse("update_queue_full", "update queue full; dropping update (the cloud resends on the "
                             "next merge)")
        else:
            self._refuse("unexpected_type", f"a {msg.TYPE} message on {m.topic}")

    def _on_ack(self, msg: wire.AckMessage) -> None:
        """Drop an outbox entry only on a valid ack: signed (checked by decode), for this device, for an entry held."""
        if msg.device_id != self.device:
            self._refuse("wrong_device", f"ack for delta {msg.delta_id} names device {msg.device_id[:130]!r}, "
                         f"not {self.device!r}")
            return
        outbox = self.service.outbox
        if not outbox.holds(msg.delta_id):
            if msg.delta_id not in outbox.known_ids():
                self._refuse("unknown_delta", f"ack for delta {msg.delta_id}, which this device never sent")
            return  # a repeated ack for a delta already dropped: nothing to do
        self.service.metrics.deltas_acked.labels(msg.status).inc()
        if msg.status == "rejected":
            log.warning("cloud rejected delta %s: %s", msg.delta_id, msg.reason[:500])
        outbox.ack(msg.delta_id)
        with self._lock:
            self.inflight.pop(msg.delta_id, None)
        self.service.metrics.outbox_entries.set(len(outbox))

    def _update_loop(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.updates.get(timeout=0.5)
            except queue.Empty:
                continue
            self.health.handled()
            if self.verifier is None:
                log.error("an update arrived but no --trust-key is configured; refused (updates must be signed)")
                self.service.metrics.bundle_rejections.inc()
                continue
            try:
                if isinstance(msg, wire.ModuleUpdateMessage):
                    result = self.service.apply_module_update(msg.versions, msg.tensors, msg.environment)
                else:
                    assert isinstance(msg, wire.BundleUpdateMessage)
                    result = self.service.install_bundle_archive(msg.archive, self.verifier)
                log.info("update %s: %s", getattr(msg, "update_id", "?"), result)
                self.publish_profile()
            except (BundleError, DataError, EclmError) as exc:
                log.error("update refused: %s", exc.message)
            except Exception:
                log.exception("applying an update failed; the serving model is unchanged")

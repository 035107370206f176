"""`eclm-cloud sync`: the merger daemon. Message handling is plain code; the MQTT loop only moves bytes."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.ledger import Ledger
from cloud_sync.merger import Merger, MergeSettings, RoundResult
from eclm import topics, wire
from eclm.archive import tar_bundle
from eclm.errors import DataError, EclmError
from eclm.manifest import bundle_digest
from eclm.mqtt import DEFAULT_BROKER, BrokerUrl
from eclm.signing import Signer

log = logging.getLogger("eclm.sync")
LEDGER = "sync.sqlite"


@dataclass(frozen=True)
class SyncSettings:
    """What the daemon is told."""

    bank_dir: Path
    broker: str = DEFAULT_BROKER
    round_deltas: int = 5  # merge once this many deltas are pending ...
    round_seconds: float = 30.0  # ... or when the oldest pending delta is this old
    max_payload: int = 4 * 2**20  # bigger messages are rejected (chunks are limited separately)
    chunk_bytes: int = 256 * 2**10  # outgoing messages above this are chunked
    update_codec: str = "fp32+zlib"
    derive_threshold: float = 0.5  # mean per-layer L1 change of importance that warrants a new bundle
    merge: MergeSettings = field(default_factory=MergeSettings)
    signing_key: Path | None = None
    client_id: str = "eclm-sync"


Publication = tuple[str, bytes]


class SyncCore:
    """Everything the daemon decides, without a broker: bytes in, publications out."""

    def __init__(self, settings: SyncSettings, signer: Signer | None) -> None:
        self.settings = settings
        self.signer = signer
        self.ledger = Ledger(settings.bank_dir / LEDGER)
        self.merger = Merger(settings.bank_dir, self.ledger, settings.merge)
        self.reassembler = wire.Reassembler()
        self.last_round = time.time()
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def handle(self, topic: str, payload: bytes) -> list[Publication]:
        """Process one incoming message; never raises for bad input (it is counted and logged)."""
        try:
            device = topics.device_of(topic)
        except DataError:
            self._reject("bad_topic", f"unexpected topic {topic}")
            return []
        try:
            msg = wire.decode(payload, max_bytes=self.settings.max_payload)
            if isinstance(msg, wire.ChunkMessage):
                whole = self.reassembler.add(msg, device)
                if whole is None:
                    return []
                payload = whole
                msg = wire.decode(whole, max_bytes=self.settings.max_payload * 64)
        except DataError as exc:
            reason = "oversized" if "exceeds the limit" in exc.message else "malformed"
            self._reject(reason, f"from {device}: {exc.message}")
            return []
        except Exception as exc:  # whatever a payload does to the parser, it is only a bad message
            self._reject("malformed", f"from {device}: {type(exc).__name__}: {exc}")
            return []
        try:
            if isinstance(msg, wire.DeltaMessage):
                return self._on_delta(device, msg, payload)
            if isinstance(msg, wire.ProfileMessage):
                return self._on_profile(device, msg)
            if isinstance(msg, wire.StatusMessage):
                fields: dict[str, Any] = {"online": int(msg.online), "bundle": msg.bundle}
                if msg.event:
                    log.info("device %s reports %s: %s", device, msg.event, msg.detail)
                    fields["last_event"] = json.dumps({"event": msg.event, **msg.detail}, default=str)
                    self._count(f"event_{msg.event}")
                self.ledger.touch_device(device, **fields)
                return []
            self._reject("unexpected_type", f"{msg.TYPE} from {device} on {topic}")
        except EclmError as exc:
            self._reject("error", f"{device}: {exc.message}")
        except Exception as exc:  # one bad message never stops the daemon
            log.exception("handling %s from %s failed", topic, device)
            self._reject("error", f"{device}: {exc}")
        return []

    def _reject(self, reason: str, detail: str, delta_id: str | None = None, device: str = "", size: int = 0) -> None:
        log.warning("rejected (%s): %s", reason, detail)
        self._count(f"rejected_{reason}")
        self.ledger.reject(reason, detail, delta_id, device, size)

    def _ack(self, device: str, delta_id: str, status: str, reason: str = "") -> Publication:
        """The ack for one delta, addressed to its device and signed with the cloud's key.

        Without a signing key the ack goes unsigned: only devices without ``--trust-key`` accept it
        (they warn that acks are not verified); devices with a trust key keep resending the delta.
        """
        if self.signer is None and not getattr(self, "_warned_unsigned_acks", False):
            self._warned_unsigned_acks = True
            log.warning("no signing key: acks are sent unsigned, and devices with --trust-key ignore them (their "
                        "deltas stay in their outboxes); start with --signing-key")
        msg = wire.AckMessage(delta_id, status, reason[:500], device_id=device)
        return topics.ack(device), wire.encode(msg, signer=self.signer)

    def _on_delta(self, device: str, msg: wire.DeltaMessage, payload: bytes) -> list[Publication]:
        if msg.device_id != device:
            self._reject("device_mismatch", f"delta names device {msg.device_id} on {device}'s topic")
            return []
        seen = self.ledger.known(msg.delta_id)
        if seen is not None:
            self._count("duplicate")
            return [self._ack(device, msg.delta_id, "duplicate", seen)]
        verdict = self.merger.check(msg)
        if not verdict.ok:
            self._reject(verdict.reason, f"{msg.delta_id} from {device}: {verdict.detail}", msg.delta_id, device,
                         len(payload))
            return [self._ack(device, msg.delta_id, "rejected", f"{verdict.reason}: {verdict.detail}")]
        stored = self.ledger.store_delta(msg.delta_id, device, payload)
        self.ledger.touch_device(device, online=1)
        self._count("stored" if stored else "duplicate")
        return [self._ack(device, msg.delta_id, "stored" if stored else "duplicate")]

    def _on_profile(self, device: str, msg: wire.ProfileMessage) -> list[Publication]:
        known = self.ledger.device(device)
        self.ledger.touch_device(device, online=1, bundle=msg.bundle, modules=msg.modules,
                                 importance=msg.importance, trainable=int(msg.trainable), profile=msg.profile_name)
        # Drift signal (METHOD.md section 4): the measured importance has moved away from the one the
        # device's sub-model was derived for (or from what we last derived for it).
        reference = json.loads(known["last_derived"]) if known and known.get("last_derived") else msg.derived_for
        moved = False
        if msg.measured and reference is not None:
            try:
                shift = sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum())
                            for a, b in zip(msg.importance, reference, strict=True)) / max(1, len(reference))
                moved = shift > self.settings.derive_threshold
            except ValueError:
                moved = True
        if not (msg.want_bundle or moved) or not msg.profile_name:
            return []
        return self.derive_for(device, msg.profile_name, msg.importance,
                               "requested" if msg.want_bundle else "importance profile moved")

    def derive_for(self, device: str, profile_name: str, importance: list[list[float]], reason: str
                   ) -> list[Publication]:
        """Re-derive the device's sub-model from the current bank and publish it as a signed bundle."""
        from exporter.export import ExportRequest, export_bundle
        from exporter.importance import write_importance_file

        if self.signer is None:
            log.warning("no signing key: cannot send %s a bundle (start with --signing-key)", device)
            return []
        work = Path(tempfile.mkdtemp(prefix="eclm-derive-"))
        try:
            imp_file = work / "importance.json"
            write_importance_file(imp_file, [np.asarray(r) for r in importance], samples=0)
            out = work / "bundle"
            export_bundle(ExportRequest(bank_dir=self.settings.bank_dir, profile=profile_name, out_dir=out,
                                        importance_file=imp_file, measure=False,
                                        signing_key=self.settings.signing_key, device_id=device))
            archive = tar_bundle(out)
            digest = bundle_digest(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.ledger.touch_device(device, last_derived=json.dumps(importance))
        msg = wire.BundleUpdateMessage(uuid.uuid4().hex, self.merger.bank_id, digest, archive, reason)
        data = wire.encode(msg, signer=self.signer)
        self._count("bundles_sent")
        return [(topics.update(device), part) for part in wire.chunk(data, self.settings.chunk_bytes)]

    def due(self) -> bool:
        n = self.ledger.pending_count()
        waited = time.time() - self.last_round
        return n >= self.settings.round_deltas or (n > 0 and waited >= self.settings.round_seconds)

    def run_round(self) -> tuple[RoundResult | None, list[Publication]]:
        """Merge pending deltas and address module updates to the devices that hold changed modules."""
        self.last_round = time.time()
        result = self.merger.run_round()
        if result is None or not result.versions:
            return result, []
        return result, self.module_updates(result.versions)

    def module_updates(self, versions: dict[str, int]) -> list[Publication]:
        out: list[Publication] = []
        if self.signer is None:
            log.warning("no signing key: merged modules are not sent to devices (start with --signing-key)")
            return out
        for dev in self.ledger.devices():
            held = set(dev["modules"]) & set(versions)
            if not held:
                continue
            if not dev["trainable"]:
                if dev["profile"]:
                    out += self.derive_for(dev["device_id"], dev["profile"], dev["importance"], "modules merged")
                continue
            # Float tensors only: integer buffers (BatchNorm's num_batches_tracked) are not in the exported graphs.
            parts = {pid: sorted(n for n, a in self.merger.params[pid].items() if a.dtype.kind == "f")
                     for pid in sorted(held)}
            tensors = {n: self.merger.params[pid][n] for pid, names in parts.items() for n in names}
            msg = wire.ModuleUpdateMessage(uuid.uuid4().hex, self.merger.bank_id,
                                           {pid: versions[pid] for pid in held}, parts, tensors,
                                           device_id=dev["device_id"])
            data = wire.encode(msg, codec=self.settings.update_codec, signer=self.signer)
            out += [(topics.update(dev["device_id"]), p) for p in wire.chunk(data, self.settings.chunk_bytes)]
            self._count("module_updates_sent")
        return out

    def close(self) -> None:
        self.ledger.close()


class SyncDaemon:
    """The MQTT side: subscribes, feeds :class:`SyncCore`, publishes what it returns, runs rounds."""

    def __init__(self, settings: SyncSettings, signer: Signer | None) -> None:
        self.core = SyncCore(settings, signer)
        self.settings = settings
        self.broker = BrokerUrl.parse(settings.broker)
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.client: Any = None

    def _publish(self, pubs: list[Publication]) -> None:
        for topic, data in pubs:
            self.client.publish(topic, data, qos=1)

    def run(self) -> None:
        from eclm.mqtt import make_client

        client = make_client(self.settings.client_id, self.broker)
        self.client = client

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if getattr(reason, "is_failure", False):
                log.error("broker %s refused the connection: %s", self.broker, reason)
                return
            for t in topics.CLOUD_SUBSCRIPTIONS:
                c.subscribe(t, qos=1)
            self.connected.set()
            log.info("connected to %s", self.broker)

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self.connected.clear()
            log.warning("disconnected from %s (%s); reconnecting", self.broker, reason)

        def on_message(_c: Any, _u: Any, m: Any) -> None:
            # Handled here, in the network thread, so that the broker's PUBACK follows the ledger commit.
            try:
                self._publish(self.core.handle(m.topic, bytes(m.payload)))
            except Exception:  # never let a message kill the network loop
                log.exception("message on %s failed", m.topic)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        try:
            client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            from eclm.errors import BrokerError

            raise BrokerError(f"cannot reach broker {self.broker}: {exc}",
                              hint="start the broker or fix --broker") from exc
        client.loop_start()
        try:
            while not self.stop.wait(0.5):
                if self.core.due():
                    result, pubs = self.core.run_round()
                    if result is not None:
                        log.info("round %d: %d merged, %d held, versions %s", result.round, len(result.merged),
                                 len(result.held), result.versions)
                    self._publish(pubs)
        finally:
            client.loop_stop()
            client.disconnect()
            self.core.close()

"""The merger daemon's decisions without a broker: bytes in, publications out, rounds, derivation jobs."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.derive import DeriveJob, DeriveQueue, Publication, importance_moved
from cloud_sync.lines import behind, of_environment, view
from cloud_sync.merger import Merger, MergeSettings, RoundResult
from cloud_sync.ports import SyncHooks
from cloud_sync.redistribute import module_update, support_note
from cloud_sync.validation import check_profile, profile_known
from eclm import topics, wire
from eclm.errors import DataError, EclmError
from eclm.mqtt import DEFAULT_BROKER
from eclm.parts import line_key
from eclm.reassembly import ChunkRefused
from eclm.signing import Signer
from module_bank import LEDGER_FILE, ClaimLost, JobQueue, open_bank
from module_bank.work import claim, release

log = logging.getLogger("eclm.sync")
LEDGER = LEDGER_FILE  # the SQLite ledger in a directory bank
MERGE_CLAIM = "merge"  # the claim a worker holds while it merges and sends the round's updates
PUBLISHED = "updates_published_round"  # the last round whose module updates went out
# Device events counted by kind; any other kind is counted as "other" (labels stay bounded).
EVENT_KINDS = frozenset({"rollback", "variant", "drift", "paused", "resumed", "update", "installed"})


@dataclass(frozen=True)
class SyncSettings:
    """What the daemon is told."""

    bank_dir: Path | str  # a bank directory or a postgresql:// URL (module_bank.open_bank)
    broker: str = DEFAULT_BROKER
    round_deltas: int = 5  # merge once this many deltas are pending ...
    round_seconds: float = 30.0  # ... or when the oldest pending delta is this old
    max_payload: int = 4 * 2**20  # bigger messages are rejected (chunks are limited separately)
    chunk_bytes: int = 256 * 2**10  # outgoing messages above this are chunked
    update_codec: str = "fp32+zlib"
    derive_threshold: float = 0.5  # mean per-layer L1 change of importance that warrants a new bundle
    derive_interval: float = 60.0  # at most one bundle derivation per device per this many seconds
    merge: MergeSettings = field(default_factory=MergeSettings)
    signing_key: Path | None = None
    tls_dir: Path | None = None  # for mqtts://: the cloud identity's cert.pem, key.pem, ca.pem
    client_id: str = ""  # empty: eclm-sync-<random suffix kept with the bank>
    share_group: str = ""  # non-empty: subscribe as $share/<group>/... (MQTT 5) beside other workers
    claim_seconds: float = 120.0  # a worker's hold on the merge round lapses after this (a killed worker's too)
    ingest_batch: int = 500  # at most this many messages are stored in one transaction


@dataclass(frozen=True)
class _Delta:
    """A decoded delta from its device's topic, waiting to be checked and stored with its batch."""

    device: str
    msg: wire.DeltaMessage
    payload: bytes


class SyncCore:
    """Everything the daemon decides, without a broker: bytes in, publications out.

    Bundle derivations are queued (:attr:`derivations`) and run by one worker, never in the caller;
    what they produce goes to ``publish`` (by default kept in :attr:`published`). The bank, the gate's
    evaluation and the derivation come in ``hooks`` (:class:`cloud_sync.ports.SyncHooks`, built by the CLI).
    """

    def __init__(self, settings: SyncSettings, signer: Signer | None, hooks: SyncHooks) -> None:
        self.settings = settings
        self.signer = signer
        self.hooks = hooks
        self.bank = open_bank(settings.bank_dir)
        self.ledger = self.bank.ledger
        self.merger = Merger(self.bank.store, self.ledger, settings.merge, hooks.evaluator)
        self.reassembler = wire.Reassembler()
        self.last_round = time.time()
        self.counters: dict[str, int] = {}
        self.published: list[Publication] = []
        self.owner = "local"  # who holds the merge claim: the daemon sets its client id
        self._claimed = False  # whether this worker holds the merge claim (until round_published)
        self._handed = 0  # the last round whose module updates this core returned to its caller
        self.ledger.set_meta_once(PUBLISHED, str(self.ledger.next_round() - 1))
        self.derivations = DeriveQueue(self._derive, self.published.extend, self._derive_failed,
                                       settings.derive_interval, JobQueue(self.bank.db), self.owner)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def handle(self, topic: str, payload: bytes) -> list[Publication]:
        """Process one incoming message; never raises (a bad one is refused, counted and logged)."""
        return self.handle_many([(topic, payload)])

    def handle_many(self, items: list[tuple[str, bytes]]) -> list[Publication]:
        """Process messages in arrival order; the valid deltas among them are stored in one transaction.

        Never raises: a bad message is refused, counted and logged; a failure to store the batch is logged
        and its deltas are not acknowledged (their devices send them again).
        """
        out: list[Publication] = []
        deltas: list[_Delta] = []
        for topic, payload in items:
            try:
                out += self._handle(topic, payload, deltas)
            except Exception as exc:  # one bad message never stops the daemon
                log.exception("handling a message on %s failed", topic[:200])
                self._quarantine("message", topic[:200], f"{type(exc).__name__}: {str(exc)[:300]}")
        if deltas:
            try:
                out += self._store_deltas(deltas)
            except Exception as exc:
                log.exception("storing %d deltas failed; they are not acknowledged", len(deltas))
                self._count("store_failed")
                self._quarantine("message", f"batch of {len(deltas)} deltas", f"{type(exc).__name__}: "
                                 f"{str(exc)[:300]}")
        return out

    def _handle(self, topic: str, payload: bytes, deltas: list[_Delta]) -> list[Publication]:
        try:
            device = topics.device_of(topic)
        except DataError:
            self._reject("bad_topic", f"unexpected topic {topic[:200]}")
            return []
        if not topics.is_device_id(device):
            self._reject("bad_device_id", f"device id of {len(device)} characters on {topic[:80]}...")
            return []
        try:
            msg = wire.decode(payload, max_bytes=self.settings.max_payload)
            if isinstance(msg, wire.ChunkMessage):
                whole = self.reassembler.add(msg, device)
                if whole is None:
                    return []
                payload = whole
                msg = wire.decode(whole, max_bytes=self.settings.max_payload * 64)
        except ChunkRefused as exc:  # over a cap: counted apart; a corrupt message is only malformed
            capped = exc.reason in ("sender_cap", "total_cap", "message_cap")
            self._reject(f"chunk_{exc.reason}" if capped else "malformed", f"from {device}: {exc.message}")
            return []
        except DataError as exc:
            reason = "oversized" if "exceeds the limit" in exc.message else "malformed"
            self._reject(reason, f"from {device}: {exc.message}")
            return []
        except Exception as exc:  # whatever a payload does to the parser, it is only a bad message
            self._reject("malformed", f"from {device}: {type(exc).__name__}: {exc}")
            return []
        try:
            if isinstance(msg, wire.DeltaMessage):
                if msg.device_id != device:
                    self._reject("device_mismatch", f"delta names device {str(msg.device_id)[:64]} on {device}'s "
                                 "topic")
                else:
                    deltas.append(_Delta(device, msg, payload))
                return []
            if isinstance(msg, wire.ProfileMessage):
                return self._on_profile(device, msg)
            if isinstance(msg, wire.StatusMessage):
                self._on_status(device, msg)
                return []
            self._reject("unexpected_type", f"{msg.TYPE} from {device} on {topic}")
        except EclmError as exc:
            self._reject("error", f"{device}: {exc.message}")
        return []

    def _reject(self, reason: str, detail: str, delta_id: str | None = None, device: str = "", size: int = 0) -> None:
        log.warning("rejected (%s): %s", reason, detail)
        self._count(f"rejected_{reason}")
        self.ledger.reject(reason, detail, delta_id, device, size)

    def _quarantine(self, kind: str, subject: str, reason: str) -> None:
        log.error("quarantined %s %s: %s", kind, subject, reason)
        self._count(f"quarantined_{kind}")
        self.ledger.record_quarantine(kind, subject, reason)

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

    def _on_status(self, device: str, msg: wire.StatusMessage) -> None:
        if msg.device_id != device:
            self._reject("device_mismatch", f"status names device {str(msg.device_id)[:64]!r} on {device}'s topic")
            return
        fields: dict[str, Any] = {"online": int(bool(msg.online)), "bundle": str(msg.bundle)[:128]}
        if msg.event:
            kind = msg.event if msg.event in EVENT_KINDS else "other"
            log.info("device %s reports %s", device, str(msg.event)[:64])
            fields["last_event"] = json.dumps({"event": str(msg.event)[:64], **msg.detail}, default=str)[:4096]
            self._count(f"event_{kind}")
        self.ledger.touch_device(device, **fields)

    def _store_deltas(self, deltas: list[_Delta]) -> list[Publication]:
        """Check a batch of deltas against the bank, store the valid ones in one transaction, and ack each."""
        out: list[Publication] = []
        seen = self.ledger.statuses([d.msg.delta_id for d in deltas])
        known = self.ledger.known_devices(sorted({d.device for d in deltas}))
        valid: list[_Delta] = []
        for d in deltas:
            delta_id = d.msg.delta_id
            if delta_id in seen:
                self._count("duplicate")
                out.append(self._ack(d.device, delta_id, "duplicate", seen[delta_id]))
                continue
            verdict = self.merger.check(d.msg)
            if verdict.ok and d.device not in known:
                verdict = type(verdict)(False, "unknown_device",
                                        f"{d.device} sent no profile for this bank and no bundle was derived for it")
            if not verdict.ok:
                self._reject(verdict.reason, f"{delta_id} from {d.device}: {verdict.detail}", delta_id, d.device,
                             len(d.payload))
                seen[delta_id] = "rejected"
                out.append(self._ack(d.device, delta_id, "rejected", f"{verdict.reason}: {verdict.detail}"))
                continue
            seen[delta_id] = "pending"
            valid.append(d)
        if not valid:
            return out
        stored = self.ledger.store_deltas([(d.msg.delta_id, d.device, d.payload, list(d.msg.parts)) for d in valid])
        support = (self.ledger.support_counts([p for d in valid for p in d.msg.parts])
                   if self.settings.merge.min_devices > 1 else {})
        for d, new in zip(valid, stored, strict=True):
            self._count("stored" if new else "duplicate")
            note = support_note(list(d.msg.parts), support, self.settings.merge.min_devices) if new else ""
            out.append(self._ack(d.device, d.msg.delta_id, "stored" if new else "duplicate", note))
        return out

    def _on_profile(self, device: str, msg: wire.ProfileMessage) -> list[Publication]:
        lines = self.settings.merge.environments
        versions = self.merger.versions()
        verdict = check_profile(msg, device, self.merger.bank_id, view(versions, msg.line if lines else ""),
                                self.merger.layer_sizes, profile_known, self.settings.merge.limits)
        if not verdict.ok:
            self._reject(verdict.reason, f"profile from {device}: {verdict.detail}")
            return []
        known = self.ledger.device(device)
        self.ledger.touch_device(device, online=1, bundle=msg.bundle[:128], modules=msg.modules,
                                 importance=msg.importance, trainable=int(bool(msg.trainable)),
                                 profile=msg.profile_name, profiled=1, environment=msg.environment,
                                 line_env=msg.line)
        # Drift signal (METHOD.md section 4): the measured importance has moved away from the one the
        # device's sub-model was derived for (or from what we last derived for it).
        reference = json.loads(known["last_derived"]) if known and known.get("last_derived") else msg.derived_for
        moved = msg.measured and reference is not None and \
            importance_moved(msg.importance, reference, self.settings.derive_threshold)
        if (msg.want_bundle or moved) and msg.profile_name:
            self.request_bundle(device, msg.profile_name, msg.importance,
                                "requested" if msg.want_bundle else "importance profile moved")
        if not msg.trainable or self.signer is None:
            return []
        # A device that connects gets the newest versions of its modules now, in one update: those of its
        # environment's lines when it has just entered one (trained by the devices there before it; docs/method.md,
        # "Environment lines"), else what merged while it was away (round updates go to online devices only).
        env = msg.environment if lines else ""
        lacking = behind(versions, env, msg.modules, msg.line if lines else "", (known or {}).get("sent") or {})
        if not lacking:
            return []
        entered = bool(env) and (known is None or known.get("environment") != env)
        self._count("line_pushes" if entered else "catch_up_updates")
        sent: dict[str, dict[str, int]] = {}
        out = self._update_for({"device_id": device, "modules": msg.modules, "trainable": 1, "environment": env},
                               lacking, {}, sent)
        self.ledger.note_sent(sent)
        return out

    def request_bundle(self, device: str, profile_name: str, importance: list[list[float]], reason: str) -> None:
        """Queue a re-derivation of the device's sub-model (one waiting job per device; the newest wins)."""
        if self.signer is None:
            log.warning("no signing key: cannot send %s a bundle (start with --signing-key)", device)
            return
        if self.hooks.derive is None:
            log.warning("no bundle derivation was given: cannot send %s a bundle", device)
            return
        log.info("queueing a bundle derivation for %s (%s)", device, reason)
        self.derivations.submit(DeriveJob(device, profile_name, importance, reason))

    def _derive_failed(self, job: DeriveJob, reason: str) -> None:
        self._quarantine("derivation", job.device, f"{job.profile}: {reason}")

    def _derive(self, job: DeriveJob) -> list[Publication]:
        """Re-derive the device's sub-model from the current bank as a signed bundle (runs in the worker)."""
        if self.signer is None or self.hooks.derive is None:
            raise EclmError("a derivation needs a signing key and a derivation function",
                            hint="start the daemon with `eclm-cloud sync --signing-key KEY`")
        archive, digest = self.hooks.derive(job.device, job.profile, job.importance)
        self.ledger.touch_device(job.device, last_derived=json.dumps(job.importance))
        msg = wire.BundleUpdateMessage(uuid.uuid4().hex, self.merger.bank_id, digest, archive, job.reason)
        data = wire.encode(msg, signer=self.signer)
        self._count("bundles_sent")
        return [(topics.update(job.device), part) for part in wire.chunk(data, self.settings.chunk_bytes)]

    def due(self) -> bool:
        """Enough new deltas, or anything pending (new or waiting for support) and the round interval passed."""
        waited = time.time() - self.last_round
        return self.ledger.ready_count() >= self.settings.round_deltas or (
            waited >= self.settings.round_seconds and self.ledger.pending_count() > 0)

    def run_round(self) -> tuple[RoundResult | None, list[Publication]]:
        """Claim the merge round, merge pending deltas and address module updates to the devices that hold
        changed modules (with any a worker that died left unsent).

        Only the holder of the ``merge`` claim merges, and its commit is fenced by the claim, so of several
        workers one merges at a time and each delta is merged once. The claim is held until
        :meth:`round_published` says the updates went out. Deltas that cannot be merged are quarantined by
        the merger; a fault of the bank raises.
        """
        self.last_round = time.time()
        if not claim(self.bank.db, MERGE_CLAIM, self.owner, self.settings.claim_seconds):
            return None, []
        self._claimed = True
        self.ledger.fence = (MERGE_CLAIM, self.owner)
        self.merger.refresh()
        # Updates of rounds whose holder died before it recorded sending them (not the ones this core returned).
        unsent = self.ledger.versions_since_round(max(int(self.ledger.meta(PUBLISHED) or 0), self._handed))
        try:
            result = self.merger.run_round()
        except ClaimLost as exc:  # paused past the claim: another worker merges these deltas
            log.warning("%s", exc.message)
            self._claimed = False
            return None, []
        if result is None:
            self._handed = max(self._handed, self.ledger.next_round() - 1)
            return None, self.module_updates(unsent) if unsent else []
        for _ in result.quarantined:
            self._count("quarantined_delta")
        for _ in result.expired:
            self._count("expired_delta")
        for _ in result.dropped:
            self._count("dropped_delta")
        changed = {**unsent, **result.versions}
        self._handed = self.ledger.next_round() - 1
        return result, self.module_updates(changed) if changed else []

    def round_published(self) -> None:
        """The round's updates were handed to the broker: record it and let another worker merge."""
        if not self._claimed:
            return
        self._claimed = False
        try:
            self.ledger.set_meta(PUBLISHED, str(self.ledger.next_round() - 1), fenced=True)
        except ClaimLost as exc:
            log.warning("%s", exc.message)
            return
        release(self.bank.db, MERGE_CLAIM, self.owner)

    def module_updates(self, versions: dict[str, int]) -> list[Publication]:
        out: list[Publication] = []
        if self.signer is None:
            log.warning("no signing key: merged modules are not sent to devices (start with --signing-key)")
            return out
        bodies: dict[tuple[str, ...], tuple[bytes, dict[str, Any]]] = {}  # compressed once per set of parts
        sent: dict[str, dict[str, int]] = {}  # what each device is sent, kept in one transaction
        for dev in self.ledger.devices():
            if dev["trainable"] and not dev.get("online"):  # it catches up when it next connects (_on_profile)
                self._count("module_updates_deferred")
                continue
            try:
                out += self._update_for(dev, versions, bodies, sent)
            except Exception as exc:  # one device's update never stops the others (or the daemon)
                self._quarantine("update", str(dev["device_id"]), f"{type(exc).__name__}: {str(exc)[:300]}")
        self.ledger.note_sent(sent)
        return out

    def _update_for(self, dev: dict[str, Any], versions: dict[str, int],
                    bodies: dict[tuple[str, ...], tuple[bytes, dict[str, Any]]],
                    sent: dict[str, dict[str, int]]) -> list[Publication]:
        """The update of what ``versions`` (part or line keys) holds for the device's environment, noted in ``sent``."""
        env = str(dev.get("environment") or "") if self.settings.merge.environments else ""
        mine = of_environment(versions, env)
        held = set(dev["modules"]) & set(mine)
        if not held:
            return []
        if not dev["trainable"]:
            if dev["profile"]:
                self.request_bundle(dev["device_id"], dev["profile"], dev["importance"], "modules merged")
            return []
        assert self.signer is not None  # module_updates sends nothing without one
        out = module_update(dev["device_id"], held, mine, view(self.merger.params, env), self.merger.bank_id,
                            self.signer, self.settings.update_codec, self.settings.chunk_bytes, bodies, env)
        self._count("module_updates_sent")  # only once built: an update that failed is not remembered as sent
        sent.setdefault(str(dev["device_id"]), {}).update({line_key(pid, env): mine[pid] for pid in held})
        return out

    def close(self) -> None:
        self.derivations.close()
        self.ledger.close()

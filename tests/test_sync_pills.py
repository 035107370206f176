"""Messages that must not stop the merger or lose a delta: refused at the edge, or quarantined, never fatal.

Core-level (no broker): a real copy of the digits bank, the real ledger, real exports.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sync_harness import wait_until
from sync_hooks import exporter_hooks
from sync_messages import make_delta, make_profile

from cloud_sync.core import SyncCore, SyncSettings
from cloud_sync.daemon import client_id_for
from cloud_sync.derive import DeriveJob, DeriveQueue
from cloud_sync.merger import MergeSettings
from eclm import topics, wire
from eclm.signing import generate_keys, load_signer


@pytest.fixture
def bank(digits_bank: Any, tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))


@pytest.fixture
def core(bank: Path, tmp_path: Path) -> Iterator[SyncCore]:
    priv, _ = generate_keys(tmp_path / "keys")
    # One device's delta merges alone here (min devices 1): these tests are about pills, not support
    # (tests/test_robust_merge.py tests that).
    c = SyncCore(SyncSettings(bank_dir=bank, signing_key=priv, round_deltas=1, merge=MergeSettings(min_devices=1)),
                 load_signer(priv), exporter_hooks(bank, priv))
    yield c
    c.close()


def send(core: SyncCore, msg: Any, device: str | None = None) -> list[tuple[str, bytes]]:
    kind = "delta" if isinstance(msg, wire.DeltaMessage) else "profile"
    topic = f"{topics.PREFIX}/devices/{device or msg.device_id}/{kind}"
    return core.handle(topic, wire.encode(msg))


def ack_of(pubs: list[tuple[str, bytes]]) -> wire.AckMessage:
    assert len(pubs) == 1, pubs
    ack = wire.decode(pubs[0][1])
    assert isinstance(ack, wire.AckMessage)
    return ack


def status(core: SyncCore, delta_id: str) -> str:
    return str(core.ledger.known(delta_id))


def honest(core: SyncCore, bank: Path, device: str = "honest", seed: int = 1) -> wire.DeltaMessage:
    assert send(core, make_profile(bank, device)) == []
    msg = make_delta(bank, device, seed=seed)
    assert ack_of(send(core, msg)).status == "stored"
    return msg


# -- refused at the edge, with a reason in the ledger and the counters ------------------------------------------

DELTA_PILLS = [
    ("overflowing_sample_count", "bad_number", {"sample_count": 10**400}),
    ("nan_importance", "bad_importance", {"importance": [[float("nan")] * 8] * 3}),
    ("huge_importance", "bad_importance", {"importance": [[1e300] * 8] * 3}),
    ("short_importance", "bad_importance", {"importance": [[0.5]]}),
]


@pytest.mark.parametrize(("case", "reason", "fields"), DELTA_PILLS, ids=[p[0] for p in DELTA_PILLS])
def test_forged_delta_header_is_refused(core: SyncCore, bank: Path, case: str, reason: str,
                                        fields: dict[str, Any]) -> None:
    assert send(core, make_profile(bank, "pill")) == []
    msg = make_delta(bank, "pill", **fields)
    ack = ack_of(send(core, msg))
    assert (ack.status, ack.reason.split(":")[0]) == ("rejected", reason), ack
    assert core.ledger.summary()["rejected_by_reason"] == {reason: 1}
    assert core.counters[f"rejected_{reason}"] == 1
    assert core.ledger.pending_count() == 0


PROFILE_PILLS = [
    ("unknown_profile", "unknown_profile", {"profile_name": "no-such-board", "trainable": False}),
    ("path_as_profile", "unknown_profile", {"profile_name": "../../etc/passwd"}),
    ("unknown_module", "unknown_module", {"modules": {"L9M9": 1}}),
    ("future_version", "bad_base_version", {"modules": {"head": 99}}),
    ("other_bank", "unknown_bank", {"bank_id": "0123456789abcdef"}),
    ("inf_importance", "bad_importance", {"importance": [[float("inf")] * 8] * 3}),
    ("negative_samples", "bad_number", {"sample_count": -1}),
]


@pytest.mark.parametrize(("case", "reason", "fields"), PROFILE_PILLS, ids=[p[0] for p in PROFILE_PILLS])
def test_forged_profile_is_refused(core: SyncCore, bank: Path, case: str, reason: str,
                                   fields: dict[str, Any]) -> None:
    assert send(core, make_profile(bank, "fake", **fields)) == []
    assert core.ledger.summary()["rejected_by_reason"] == {reason: 1}
    assert not core.ledger.known_device("fake")
    # A merge of head afterwards derives nothing for the fake device and does not fail.
    honest(core, bank)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    assert len(core.derivations) == 0


def test_device_id_longer_than_the_topic_grammar_is_refused(core: SyncCore, bank: Path) -> None:
    long_id = "d" * 200
    assert send(core, make_profile(bank, long_id, trainable=False, modules={"head": 1})) == []
    assert core.ledger.summary()["rejected_by_reason"] == {"bad_device_id": 1}
    assert core.ledger.devices() == []


def test_delta_from_an_unknown_device_is_refused(core: SyncCore, bank: Path) -> None:
    msg = make_delta(bank, "stranger")
    ack = ack_of(send(core, msg))
    assert (ack.status, ack.reason.split(":")[0]) == ("rejected", "unknown_device")
    assert core.ledger.pending_count() == 0


# -- quarantined, never fatal ----------------------------------------------------------------------------------

def test_overflow_delta_left_pending_is_quarantined_and_the_honest_one_merged(core: SyncCore, bank: Path) -> None:
    """A pill a daemon without the edge checks had stored: the round quarantines it and merges the rest."""
    pill = make_delta(bank, "pill", sample_count=10**400)
    assert core.ledger.store_delta(pill.delta_id, "pill", wire.encode(pill))
    assert core.ledger.store_delta("junk", "pill", b"ECLMW1 not a message")
    good = honest(core, bank)
    result, _ = core.run_round()
    assert result is not None
    assert result.merged == [good.delta_id] and result.versions == {"head": 2}
    assert set(result.quarantined) == {pill.delta_id, "junk"}
    assert status(core, pill.delta_id) == status(core, "junk") == "quarantined"
    assert {q["subject"] for q in core.ledger.quarantined()} == {pill.delta_id, "junk"}
    assert core.counters["quarantined_delta"] == 2
    assert core.run_round() == (None, [])


def test_delta_that_makes_its_round_fail_is_quarantined(core: SyncCore, bank: Path) -> None:
    """A failure after the per-delta checks: each delta is tried alone; the one that fails alone is set aside."""
    good = honest(core, bank, "good", seed=1)
    bad = honest(core, bank, "bad", seed=2)
    merge = core.merger._merge

    def failing(contribs: dict[str, Any], t0: float, **kw: Any) -> Any:
        if bad.delta_id in contribs:
            raise FloatingPointError("this delta breaks the strategy")
        return merge(contribs, t0, **kw)

    core.merger._merge = failing  # type: ignore[method-assign]
    result, _ = core.run_round()
    assert result is not None and result.merged == [good.delta_id]
    assert list(result.quarantined) == [bad.delta_id]
    assert status(core, bad.delta_id) == "quarantined" and status(core, good.delta_id) == "merged"


def test_stored_bad_profile_makes_a_quarantined_derivation_not_an_exit(core: SyncCore, bank: Path) -> None:
    """A profile a daemon without the edge checks had stored: its derivation fails alone, in the worker."""
    core.ledger.touch_device("fake", profile="no-such-board", modules={"head": 1}, trainable=0, profiled=1,
                             importance=[[0.5] * 8] * 3)
    core.ledger.touch_device("x" * 200, modules={"head": 1}, trainable=1, profiled=1, online=1)
    honest(core, bank)
    result, pubs = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    assert len(core.derivations) == 1
    assert core.derivations.run_once()
    assert core.published == []
    kinds = {(q["kind"], q["subject"][:4]) for q in core.ledger.quarantined()}
    assert kinds == {("derivation", "fake"), ("update", "xxxx")}
    assert core.counters["quarantined_derivation"] == 1


# -- derivations run in one worker, coalesced and rate-limited --------------------------------------------------

def test_bundle_request_is_queued_not_exported_in_the_handler(core: SyncCore, bank: Path) -> None:
    # A profile that does not train on the device: its bundle has no training step to export (this test is
    # about queueing; tests/test_sync_integration.py derives trainable bundles).
    ask = make_profile(bank, "board", trainable=False, want_bundle=True, profile_name="pi-zero-2w")
    for _ in range(5):
        assert send(core, ask) == []  # the network thread only queues
    assert len(core.derivations) == 1
    assert core.derivations.jobs.counts() == {"queued": 1, "running": 0}  # in the bank, seen by every worker
    assert core.derivations.run_once()
    whole = wire.Reassembler()
    bundle = None
    for topic, data in core.published:
        assert topic == topics.update("board")
        piece = wire.decode(data)
        bundle = whole.add(piece) if isinstance(piece, wire.ChunkMessage) else data
    assert bundle is not None and isinstance(wire.decode(bundle), wire.BundleUpdateMessage)
    assert send(core, ask) == [] and len(core.derivations) == 1
    assert not core.derivations.run_once()  # at most one per device per interval: it waits
    assert core.derivations.run_once(now=time.time() + core.settings.derive_interval + 1)


def test_derivations_never_overlap() -> None:
    running = 0
    overlap = 0
    done: list[str] = []
    lock = threading.Lock()

    def export(job: DeriveJob) -> list[tuple[str, bytes]]:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap = max(overlap, running)
        time.sleep(0.01)
        with lock:
            running -= 1
            done.append(job.device)
        return []

    q = DeriveQueue(export, lambda pubs: None, lambda job, why: None, min_interval=0)
    q.start()
    try:
        senders = [threading.Thread(target=lambda i=i: [q.submit(DeriveJob(f"d{i}-{k}", "pi4", [], "r"))
                                                       for k in range(5)]) for i in range(6)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        wait_until(lambda: len(done) == 30, 60, "every job to run")
    finally:
        q.close()
    assert overlap == 1 and q.error is None


# -- bounded labels, no-op deltas and staleness -------------------------------------------------------------------

def test_status_events_do_not_grow_the_metrics(core: SyncCore) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cloud_sync.metrics import SyncCollector

    for i in range(300):
        msg = wire.StatusMessage("dev", True, event=f"evt-{i}-" + "x" * 200, detail={"k": "v" * 100})
        core.handle(topics.status("dev"), wire.encode(msg))
    registry = CollectorRegistry()
    registry.register(SyncCollector(core))
    text = generate_latest(registry).decode()
    assert 'eclm_sync_events_total{kind="event_other"} 300.0' in text
    assert len(text) < 8000, len(text)


def test_zero_deltas_do_not_bump_versions_or_make_honest_ones_stale(core: SyncCore, bank: Path) -> None:
    base = make_delta(bank, "honest", seed=3)  # made against version 1, sent last
    for i in range(15):  # more than --max-staleness
        dev = f"zero-{i}"
        assert send(core, make_profile(bank, dev)) == []
        zero = make_delta(bank, dev, tensors={k: np.zeros_like(v) for k, v in base.tensors.items()})
        assert ack_of(send(core, zero)).status == "stored"
        result, _ = core.run_round()
        assert result is not None and result.versions == {} and result.merged == [zero.delta_id]
    assert core.ledger.versions()["head"] == 1
    assert send(core, make_profile(bank, "honest")) == []
    assert ack_of(send(core, base)).status == "stored"
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}


# -- the gate's reference is the best released accuracy --------------------------------------------------------

def test_gate_stops_slow_decay_against_the_best_released(bank: Path, tmp_path: Path) -> None:
    """Each delta lowers accuracy by 0.009 (by construction): within 0.02 of the previous round every time,
    but the third falls below the best released (0.954) minus 0.02 and is held back."""
    priv, _ = generate_keys(tmp_path / "keys")
    c = SyncCore(SyncSettings(bank_dir=bank, signing_key=priv, merge=MergeSettings(gate_margin=0.02, min_devices=1)),
                 load_signer(priv), exporter_hooks(bank, priv))
    try:
        start = float(c.merger.params["head"]["head.fc.bias"].astype(np.float64).sum())

        def accuracy(params: dict[str, dict[str, np.ndarray]]) -> float:
            steps = (float(params["head"]["head.fc.bias"].astype(np.float64).sum()) - start) / 0.01
            return 0.954 - 0.009 * round(steps)

        c.merger.validation_accuracy = accuracy  # type: ignore[method-assign]
        seen = []
        for i in range(3):
            dev = f"decay-{i}"
            assert send(c, make_profile(bank, dev)) == []
            current = c.merger.params["head"]
            tensors = {n: np.zeros_like(a, dtype=np.float32) for n, a in current.items() if a.dtype.kind == "f"}
            tensors["head.fc.bias"][0] = 0.01  # one step of harm
            msg = make_delta(bank, dev, tensors=tensors, parts={"head": sorted(tensors)},
                             base_versions={"head": c.ledger.versions()["head"]})
            assert ack_of(send(c, msg)).status == "stored"
            result, _ = c.run_round()
            assert result is not None
            seen.append((round(result.val_after, 3), result.versions))
        assert seen[:2] == [(0.945, {"head": 2}), (0.936, {"head": 3})]
        assert seen[2][1] == {}, seen  # 0.927 < 0.954 - 0.02
        assert c.ledger.best_released() == pytest.approx(0.954)
    finally:
        c.close()


def test_client_id_is_random_per_install_and_stable(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = client_id_for(a)
    assert first.startswith("eclm-sync-") and first != "eclm-sync"
    assert client_id_for(a) == first
    assert client_id_for(b) != first


def test_dead_worker_stops_acks_and_the_loop_exits(bank: Path, tmp_path: Path) -> None:
    from cloud_sync.daemon import SyncDaemon
    from eclm.errors import EclmError

    class Recorder:  # stands in for the paho client: what would be published
        def __init__(self) -> None:
            self.sent: list[str] = []

        def publish(self, topic: str, data: bytes, qos: int = 0) -> None:
            self.sent.append(topic)

        def ack(self, mid: int, qos: int) -> None:  # the broker's PUBACK, sent after the batch is stored
            self.sent.append(f"puback {mid}")

    class Incoming:
        def __init__(self, topic: str, payload: bytes, mid: int) -> None:
            self.topic, self.payload, self.mid, self.qos = topic, payload, mid, 1

    priv, _ = generate_keys(tmp_path / "keys")
    d = SyncDaemon(SyncSettings(bank_dir=bank, signing_key=priv, client_id="eclm-sync-test"), load_signer(priv),
                   exporter_hooks(bank, priv))
    d.client = Recorder()
    try:
        d._on_message(None, None, Incoming(topics.profile("honest"), wire.encode(make_profile(bank, "honest")), 1))
        first = make_delta(bank, "honest", seed=1)
        d._on_message(None, None, Incoming(topics.delta("honest"), wire.encode(first), 2))
        assert d.ingest.drain() == 2
        assert d.client.sent == [topics.ack("honest"), "puback 1", "puback 2"]
        d.core.derivations.start()
        d.core.derivations.error = RuntimeError("the worker died")  # as if its loop had raised
        with pytest.raises(EclmError, match="derivation worker died"):
            d._loop()
        assert d.dead.is_set()
        d._on_message(None, None, Incoming(topics.delta("honest"), wire.encode(make_delta(bank, "honest", seed=2)),
                                           3))
        assert d.ingest.drain() == 0  # not even queued
        assert d.client.sent == [topics.ack("honest"), "puback 1", "puback 2"]  # nothing acknowledged after
        assert d.core.ledger.pending_count() == 1
    finally:
        d.core.close()


def test_a_full_client_queue_delays_publications_and_never_drops_them(bank: Path, tmp_path: Path) -> None:
    """paho refuses a publish while 65,535 messages are unacknowledged (MQTT_ERR_QUEUE_SIZE); the daemon waits
    and sends again instead of losing the ack or update (before: the refusal was ignored)."""
    from cloud_sync.daemon import QUEUE_FULL, SyncDaemon

    class Info:
        def __init__(self, rc: int) -> None:
            self.rc = rc

    class FullThenFree:
        def __init__(self) -> None:
            self.refusals = 5
            self.sent: list[str] = []

        def publish(self, topic: str, data: bytes, qos: int = 0) -> Info:
            if self.refusals:
                self.refusals -= 1
                return Info(QUEUE_FULL)
            self.sent.append(topic)
            return Info(0)

    priv, _ = generate_keys(tmp_path / "keys")
    d = SyncDaemon(SyncSettings(bank_dir=bank, signing_key=priv, client_id="eclm-sync-test"), load_signer(priv),
                   exporter_hooks(bank, priv))
    d.client = FullThenFree()
    try:
        d._publish([(topics.ack("a"), b"1"), (topics.ack("b"), b"2")])
        assert d.client.sent == [topics.ack("a"), topics.ack("b")]
    finally:
        d.core.close()

"""The cloud sync core without a broker: deltas in, acks and signed module updates out, rounds, crash safety.

Everything is real: a copy of the trained digits bank, the SQLite ledger beside it, the validation gate's
torch forward passes and Ed25519 signatures.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sync_hooks import exporter_hooks
from sync_messages import make_delta, make_profile

from cloud_sync.daemon import LEDGER, SyncCore, SyncSettings
from cloud_sync.merger import MergeSettings, module_weight
from cloud_sync.validation import Limits
from cloud_sync.weights import held_importance, relative_importance
from eclm import topics, wire
from eclm.errors import BundleError, ConfigError
from eclm.hashing import sha256_file
from eclm.signing import Signer, Verifier, generate_keys, load_signer, load_verifier
from module_bank import BANK_FILE, DirectoryBank

DEV_A, DEV_B, DEV_C, DEV_N = "dev-a", "dev-b", "dev-c", "dev-n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Signer, Verifier]:
    priv, pub = generate_keys(tmp_path_factory.mktemp("sync-keys"))
    return priv, load_signer(priv), load_verifier(pub)


class Env:
    """A private copy of the digits bank and the SyncCores opened on it (closed at teardown)."""

    def __init__(self, bank: Path, keys: tuple[Path, Signer, Verifier]) -> None:
        self.bank = bank
        self.key_path, self.signer, self.verifier = keys
        self.cores: list[SyncCore] = []
        self._ids = random.Random(1234)

    def core(self, **settings: Any) -> SyncCore:
        # One device's delta merges alone here unless a test says otherwise: these tests are about the core's
        # handling of deltas; support from several devices is tested in tests/test_robust_merge.py.
        settings.setdefault("merge", MergeSettings(min_devices=1))
        core = SyncCore(SyncSettings(bank_dir=self.bank, signing_key=self.key_path, **settings), self.signer,
                        exporter_hooks(self.bank, self.key_path))
        self.cores.append(core)
        return core

    def reopen(self, core: SyncCore, **settings: Any) -> SyncCore:
        core.close()
        return self.core(**settings)

    def info(self) -> Any:
        return DirectoryBank(self.bank).info()

    def params(self, part_id: str) -> dict[str, np.ndarray]:
        return DirectoryBank(self.bank).read_part(part_id)

    def delta(self, device: str, part_ids: tuple[str, ...] = ("L0M0", "head"), *, seed: int = 0,
              scale: float = 1e-3, sample_count: int = 32, **overrides: Any) -> wire.DeltaMessage:
        """A valid delta: small seeded perturbations of every float parameter of ``part_ids``."""
        fields: dict[str, Any] = dict(delta_id=f"{self._ids.getrandbits(128):032x}", sample_count=sample_count,
                                      metrics={"loss": 0.25, "epochs": 1})
        fields.update(overrides)
        return make_delta(self.bank, device, part_ids, seed=seed, scale=scale, random_importance=True, **fields)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(str(self.bank / LEDGER))
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()


def bank_env(digits_bank: Any, tmp_path: Path, keys: tuple[Path, Signer, Verifier]) -> Iterator[Env]:
    """A private copy of the digits bank and the cores opened on it, closed afterwards (a fixture's body)."""
    bank_dir, _ = digits_bank
    e = Env(Path(shutil.copytree(bank_dir, tmp_path / "bank")), keys)
    yield e
    for core in e.cores:
        try:
            core.close()
        except Exception:  # already closed
            pass


@pytest.fixture
def env(digits_bank: Any, tmp_path: Path, keys: tuple[Path, Signer, Verifier]) -> Iterator[Env]:
    yield from bank_env(digits_bank, tmp_path, keys)


def register(core: SyncCore, device: str) -> None:
    """Make ``device`` known to the bank the way devices do: a profile for this bank (deltas of others are refused)."""
    if core.ledger.known_device(device):
        return
    msg = make_profile(core.settings.bank_dir, device, profile_name="", modules={})
    assert core.handle(topics.profile(device), wire.encode(msg)) == []
    assert core.ledger.known_device(device)


def deliver(core: SyncCore, msg: wire.DeltaMessage, device: str | None = None, codec: str = "fp32+zlib"
            ) -> tuple[list[tuple[str, bytes]], bytes]:
    payload = wire.encode(msg, codec=codec)
    register(core, device or msg.device_id)
    return core.handle(topics.delta(device or msg.device_id), payload), payload


def as_chunk(data: bytes) -> wire.ChunkMessage:
    msg = wire.decode(data)
    assert isinstance(msg, wire.ChunkMessage)
    return msg


def acks(pubs: list[tuple[str, bytes]]) -> list[tuple[str, wire.AckMessage]]:
    out = []
    for topic, data in pubs:
        msg = wire.decode(data)
        assert isinstance(msg, wire.AckMessage)
        out.append((topic, msg))
    return out


def one_ack(pubs: list[tuple[str, bytes]], device: str, delta_id: str, status: str) -> wire.AckMessage:
    got = acks(pubs)
    assert len(got) == 1, got
    topic, ack = got[0]
    assert topic == topics.ack(device) == f"eclm/v1/devices/{device}/ack"
    assert (ack.delta_id, ack.status) == (delta_id, status), ack
    return ack


def profile(core: SyncCore, env: Env, device: str, modules: list[str], trainable: bool = True,
            profile_name: str = "") -> list[tuple[str, bytes]]:
    info = env.info()
    msg = make_profile(env.bank, device, profile_name=profile_name, trainable=trainable, measured=False,
                       modules={m: info.parts[m].version for m in modules})
    return core.handle(topics.profile(device), wire.encode(msg))


def updates(pubs: list[tuple[str, bytes]], verifier: Verifier) -> dict[str, list[wire.ModuleUpdateMessage]]:
    """Reassemble (if chunked) and verify the update publications, by device."""
    out: dict[str, list[wire.ModuleUpdateMessage]] = {}
    r = wire.Reassembler()
    for topic, data in pubs:
        assert topics.kind_of(topic) == "update"
        msg = wire.decode(data, verifier=verifier)
        if isinstance(msg, wire.ChunkMessage):
            whole = r.add(msg)
            if whole is None:
                continue
            msg = wire.decode(whole, verifier=verifier)
        assert isinstance(msg, wire.ModuleUpdateMessage)
        out.setdefault(topics.device_of(topic), []).append(msg)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Storing deltas


def test_valid_delta_is_stored_and_acked(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_A)
    pubs, payload = deliver(core, msg)
    ack = one_ack(pubs, DEV_A, msg.delta_id, "stored")
    assert ack.reason == ""
    pending = core.ledger.pending()
    assert [(p.delta_id, p.device_id, p.payload) for p in pending] == [(msg.delta_id, DEV_A, payload)]
    assert core.ledger.summary()["deltas"] == {"pending": 1}
    assert core.ledger.summary()["uplink_bytes"] == len(payload)
    assert core.counters.get("stored") == 1

    # The same bytes again (QoS 1 redelivery): a duplicate, still one row.
    again, _ = deliver(core, msg)
    assert one_ack(again, DEV_A, msg.delta_id, "duplicate").reason == "pending"
    assert env.rows("SELECT COUNT(*) FROM deltas WHERE delta_id = ?", msg.delta_id) == [(1,)]
    assert env.rows("SELECT COUNT(*) FROM deltas") == [(1,)]
    assert core.ledger.summary()["deltas"] == {"pending": 1}
    assert core.ledger.summary()["rejected_by_reason"] == {}
    assert [d["device_id"] for d in core.ledger.devices()] == [DEV_A]


@pytest.mark.parametrize("codec", ["fp16+zlib", "int8+lzma", "fp32+top0.5+zlib"])
def test_compressed_deltas_are_stored(env: Env, codec: str) -> None:
    core = env.core()
    msg = env.delta(DEV_A)
    pubs, _ = deliver(core, msg, codec=codec)
    one_ack(pubs, DEV_A, msg.delta_id, "stored")


Mutation = Callable[[wire.DeltaMessage, "Env"], wire.DeltaMessage]


def _huge_like(env: Env, name: str, part: str, factor: float) -> np.ndarray:
    p = env.params(part)[name].astype(np.float64)
    return (p / np.linalg.norm(p) * factor * (np.linalg.norm(p) + 1.0)).astype(np.float32)


def _with_tensor(name: str, value: Callable[[Env], np.ndarray]) -> Mutation:
    def apply(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
        msg.tensors[name] = value(env)
        return msg

    return apply


def _nan(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    msg.tensors["head.fc.bias"][3] = np.nan
    return msg


def _inf(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    msg.tensors["layers.0.mods.m0.conv1.conv.weight"][0, 0, 0, 0] = -np.inf
    return msg


def _unknown_module(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    msg.parts["L7M9"] = ["layers.7.mods.m9.conv1.conv.weight"]
    msg.tensors["layers.7.mods.m9.conv1.conv.weight"] = np.zeros((4, 4), np.float32)
    msg.base_versions["L7M9"] = 1
    return msg


def _unknown_parameter(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    msg.parts["head"].append("head.fc2.weight")
    msg.tensors["head.fc2.weight"] = np.zeros((10, 32), np.float32)
    return msg


def _wrong_part_for_parameter(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    msg.parts["head"].append("layers.0.mods.m0.conv1.bn.bias")
    msg.parts["L0M0"].remove("layers.0.mods.m0.conv1.bn.bias")
    return msg


def _set(**fields: Any) -> Mutation:
    def apply(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
        for k, v in fields.items():
            setattr(msg, k, v)
        return msg

    return apply


def _base(part: str, version: Any) -> Mutation:
    def apply(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
        msg.base_versions[part] = version
        return msg

    return apply


def _drop_base(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    del msg.base_versions["head"]
    return msg


def _unlisted_tensor(msg: wire.DeltaMessage, env: Env) -> wire.DeltaMessage:
    msg.parts["head"].remove("head.fc.bias")
    return msg


REJECTIONS: list[tuple[str, str, Mutation]] = [
    ("unknown_module", "unknown_module", _unknown_module),
    ("unknown_parameter", "unknown_parameter", _unknown_parameter),
    ("parameter_of_another_part", "unknown_parameter", _wrong_part_for_parameter),
    ("wrong_shape", "bad_shape", _with_tensor("head.fc.weight", lambda e: np.zeros((5, 32), np.float32))),
    ("transposed", "bad_shape", _with_tensor("head.fc.weight", lambda e: np.zeros((32, 10), np.float32))),
    ("integer_tensor", "bad_dtype", _with_tensor("head.fc.bias", lambda e: np.zeros(10, np.int32))),
    ("nan", "non_finite", _nan),
    ("inf", "non_finite", _inf),
    ("norm", "norm_bound", _with_tensor("head.fc.weight", lambda e: _huge_like(e, "head.fc.weight", "head", 1.05))),
    ("base_higher_than_current", "bad_base_version", _base("head", 2)),
    ("base_zero", "bad_base_version", _base("L0M0", 0)),
    ("base_not_int", "bad_base_version", _base("head", "1")),
    ("base_missing", "bad_base_version", _drop_base),
    ("wrong_bank", "unknown_bank", _set(bank_id="0123456789abcdef")),
    ("no_samples", "no_samples", _set(sample_count=0)),
    ("no_parts", "empty_or_oversized", _set(parts={}, tensors={}, base_versions={})),
    ("unlisted_tensor", "inconsistent", _unlisted_tensor),
]


@pytest.mark.parametrize(("case", "reason", "mutate"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_invalid_delta_is_rejected(env: Env, case: str, reason: str, mutate: Mutation) -> None:
    core = env.core()
    msg = mutate(env.delta(DEV_A), env)
    pubs, payload = deliver(core, msg)
    ack = one_ack(pubs, DEV_A, msg.delta_id, "rejected")
    assert ack.reason.startswith(f"{reason}:"), ack.reason
    summary = core.ledger.summary()
    assert summary["rejected_by_reason"] == {reason: 1}
    assert summary["deltas"] == {"rejected": 1}
    assert core.ledger.pending() == []
    assert env.rows("SELECT status, reason, payload, bytes FROM deltas") == [("rejected", reason, None, len(payload))]
    # Redelivery is answered from the ledger and not counted twice.
    again, _ = deliver(core, msg)
    assert one_ack(again, DEV_A, msg.delta_id, "duplicate").reason == "rejected"
    assert core.ledger.summary()["rejected_by_reason"] == {reason: 1}


def test_norm_just_inside_the_bound_is_accepted(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_A, ("head",))
    msg.tensors["head.fc.weight"] = _huge_like(env, "head.fc.weight", "head", 0.95)
    pubs, _ = deliver(core, msg)
    one_ack(pubs, DEV_A, msg.delta_id, "stored")


def test_norm_bound_follows_the_limits(env: Env) -> None:
    core = env.core(merge=MergeSettings(limits=Limits(max_relative_norm=0.5), min_devices=1))
    msg = env.delta(DEV_A, ("head",))
    msg.tensors["head.fc.weight"] = _huge_like(env, "head.fc.weight", "head", 0.6)
    pubs, _ = deliver(core, msg)
    assert one_ack(pubs, DEV_A, msg.delta_id, "rejected").reason.startswith("norm_bound:")


def test_stale_base_version(env: Env) -> None:
    core = env.core(merge=MergeSettings(limits=Limits(max_staleness=0), min_devices=1))
    first = env.delta(DEV_A, ("head",), seed=1)
    one_ack(deliver(core, first)[0], DEV_A, first.delta_id, "stored")
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}

    stale = env.delta(DEV_B, ("head",), seed=2, base_versions={"head": 1})
    ack = one_ack(deliver(core, stale)[0], DEV_B, stale.delta_id, "rejected")
    assert ack.reason.startswith("stale:")
    assert core.ledger.summary()["rejected_by_reason"] == {"stale": 1}

    fresh = env.delta(DEV_B, ("head",), seed=3)
    assert fresh.base_versions == {"head": 2}
    one_ack(deliver(core, fresh)[0], DEV_B, fresh.delta_id, "stored")


def test_stale_within_the_default_limit_is_accepted(env: Env) -> None:
    core = env.core()
    first = env.delta(DEV_A, ("head",), seed=1)
    deliver(core, first)
    assert core.run_round()[0] is not None
    late = env.delta(DEV_B, ("head",), seed=2, base_versions={"head": 1})
    one_ack(deliver(core, late)[0], DEV_B, late.delta_id, "stored")


def test_device_id_must_match_the_topic(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_B)
    pubs, _ = deliver(core, msg, device=DEV_A)  # dev-a publishes a delta that names dev-b
    assert pubs == []  # no ack to the impostor's topic
    summary = core.ledger.summary()
    assert summary["rejected_by_reason"] == {"device_mismatch": 1}
    assert summary["deltas"] == {} and core.ledger.pending() == []
    # The id is not burned: the real dev-b can still deliver it.
    one_ack(deliver(core, msg)[0], DEV_B, msg.delta_id, "stored")


def test_malformed_bytes_are_counted_not_raised(env: Env) -> None:
    core = env.core()
    good = wire.encode(env.delta(DEV_A))
    header_len = struct.unpack("<I", good[6:10])[0]
    bad_payloads = [
        b"",
        b"garbage",
        wire.MAGIC,
        wire.MAGIC + b"\x10\x00\x00\x00{not json}......",
        good[: 10 + header_len // 2],  # truncated header
        good[: len(good) - 200],  # truncated tensors
        good[:6] + struct.pack("<I", header_len) + good[10:].replace(b'"sample_count":32', b'"sample_count":"3"'),
        good.replace(b'"schema_version":1', b'"schema_version":9'),
        good.replace(b'"type":"delta"', b'"type":"deltax"'),
    ]
    for payload in bad_payloads:
        assert core.handle(topics.delta(DEV_A), payload) == []
    assert core.ledger.summary()["rejected_by_reason"] == {"malformed": len(bad_payloads)}
    assert core.ledger.summary()["deltas"] == {}
    assert core.counters["rejected_malformed"] == len(bad_payloads)
    # Not a device topic at all.
    assert core.handle("eclm/v1/other", good) == []
    assert core.ledger.summary()["rejected_by_reason"]["bad_topic"] == 1


def test_deeply_nested_header_is_counted_malformed(env: Env) -> None:
    core = env.core()
    header = b"[" * 100_000
    assert core.handle(topics.delta(DEV_A), wire.MAGIC + struct.pack("<I", len(header)) + header) == []
    assert core.ledger.summary()["rejected_by_reason"] == {"malformed": 1}


def test_unexpected_types_and_status(env: Env) -> None:
    core = env.core()
    assert core.handle(topics.status(DEV_A), wire.encode(wire.StatusMessage(DEV_A, True, bundle="b7"))) == []
    dev = {d["device_id"]: d for d in core.ledger.devices()}[DEV_A]
    assert dev["online"] == 1 and dev["bundle"] == "b7"
    assert core.handle(topics.status(DEV_A), wire.encode(wire.StatusMessage(DEV_A, False))) == []
    assert {d["device_id"]: d for d in core.ledger.devices()}[DEV_A]["online"] == 0
    assert core.handle(topics.delta(DEV_A), wire.encode(wire.AckMessage("x", "stored"))) == []
    assert core.ledger.summary()["rejected_by_reason"] == {"unexpected_type": 1}


def test_oversized_payload_is_counted_then_chunks_get_through(env: Env) -> None:
    limit = 16 * 1024
    core = env.core(max_payload=limit)
    register(core, DEV_A)
    assert core.handle(topics.delta(DEV_A), b"\x00" * (limit + 1)) == []
    msg = env.delta(DEV_A, ("L1M0", "head"))
    payload = wire.encode(msg)
    assert len(payload) > limit
    assert core.handle(topics.delta(DEV_A), payload) == []
    summary = core.ledger.summary()
    assert summary["rejected_by_reason"] == {"oversized": 2}
    assert summary["deltas"] == {}

    pieces = wire.chunk(payload, 4096)
    assert len(pieces) > 2 and all(len(p) <= limit for p in pieces)
    random.Random(5).shuffle(pieces)
    results = [core.handle(topics.delta(DEV_A), p) for p in pieces]
    assert all(r == [] for r in results[:-1])
    one_ack(results[-1], DEV_A, msg.delta_id, "stored")
    assert [p.payload for p in core.ledger.pending()] == [payload]  # the whole message is stored, not a chunk
    # The whole thing chunked again (redelivery): a duplicate.
    again = [core.handle(topics.delta(DEV_A), p) for p in wire.chunk(payload, 4096)]
    one_ack(again[-1], DEV_A, msg.delta_id, "duplicate")
    assert env.rows("SELECT COUNT(*) FROM deltas") == [(1,)]


def test_chunks_with_a_bad_checksum_are_malformed(env: Env) -> None:
    core = env.core()
    payload = wire.encode(env.delta(DEV_A, ("L1M0",)))
    chunks = [as_chunk(p) for p in wire.chunk(payload, 8192)]
    bad = bytearray(chunks[0].data)
    bad[-1] ^= 0xFF
    chunks[0] = wire.ChunkMessage(chunks[0].message_id, 0, chunks[0].total, chunks[0].sha256, bytes(bad))
    for c in chunks:
        assert core.handle(topics.delta(DEV_A), wire.encode(c)) == []
    assert core.ledger.summary()["rejected_by_reason"] == {"malformed": 1}
    assert core.ledger.summary()["deltas"] == {}


# ----------------------------------------------------------------------------------------------------------------
# Rounds


def test_round_merges_bumps_versions_and_sends_signed_updates(env: Env) -> None:
    # The method's plain weighted mean (the default 'robust' strategy would clip the longer delta).
    core = env.core(round_deltas=2, chunk_bytes=4096, merge=MergeSettings(min_devices=1, strategy="weighted"))
    before = {pid: env.params(pid) for pid in ("L0M0", "head", "L1M1")}
    bank_json_before = env.info()
    assert profile(core, env, DEV_A, ["L0M0", "head", "L1M1"]) == []
    assert profile(core, env, DEV_C, ["L2M2", "L2M3"]) == []  # holds nothing that changes
    assert profile(core, env, DEV_N, ["head"], trainable=False) == []  # no profile name: nothing to derive

    a = env.delta(DEV_A, ("L0M0", "head"), seed=10, sample_count=30)
    b = env.delta(DEV_B, ("L0M0", "head"), seed=11, sample_count=90)
    one_ack(deliver(core, a)[0], DEV_A, a.delta_id, "stored")
    assert not core.due()
    one_ack(deliver(core, b)[0], DEV_B, b.delta_id, "stored")
    assert core.due()

    result, pubs = core.run_round()
    assert result is not None
    assert result.round == 1 and sorted(result.merged) == sorted([a.delta_id, b.delta_id]) and result.held == []
    assert result.versions == {"L0M0": 2, "head": 2}
    assert result.val_after >= result.val_before - core.settings.merge.gate_margin

    # The merged parameters: weighted by importance x samples for modules, by samples for fixed parts; the
    # importance is what the cloud holds for the device (its profile), never the delta's header.
    held_a, held_b = (held_importance(core.ledger.device(d)) for d in (DEV_A, DEV_B))
    for pid in ("L0M0", "head"):
        wa, wb = module_weight(a, pid, None, held_a), module_weight(b, pid, None, held_b)
        if pid == "head":
            assert (wa, wb) == (30.0, 90.0)
        else:
            assert held_a is not None and held_b is not None
            assert wa == pytest.approx(relative_importance(held_a, pid) * 30)
            assert wb == pytest.approx(relative_importance(held_b, pid) * 90)
        after = env.params(pid)
        for name, p in before[pid].items():
            if name not in a.parts[pid]:
                assert np.array_equal(after[name], p), name  # integer buffers untouched
                continue
            expected = p.astype(np.float64) + (wa * a.tensors[name].astype(np.float64)
                                               + wb * b.tensors[name].astype(np.float64)) / (wa + wb)
            np.testing.assert_allclose(after[name], expected, rtol=0, atol=1e-6, err_msg=name)
            assert after[name].dtype == p.dtype
    assert all(np.array_equal(env.params("L1M1")[n], v) for n, v in before["L1M1"].items())

    # bank.json, part files and the ledger agree.
    info = env.info()
    for pid, rec in info.parts.items():
        want = 2 if pid in ("L0M0", "head") else 1
        assert rec.version == want, pid
        assert rec.sha256 == sha256_file(DirectoryBank(env.bank).part_file(pid, want)), pid
        assert rec.sha256 == (bank_json_before.parts[pid].sha256 if want == 1 else rec.sha256)
    assert core.ledger.versions() == {pid: rec.version for pid, rec in info.parts.items()}
    assert DirectoryBank(env.bank).part_file("head", 1).is_file()  # old versions are kept
    for pid in ("L0M0", "head"):
        lineage = core.ledger.lineage(pid)
        assert [e["version"] for e in lineage] == [1, 2]
        assert lineage[1]["round"] == 1 and sorted(lineage[1]["deltas"]) == sorted([a.delta_id, b.delta_id])
        assert info.parts[pid].lineage[-1] == {"version": 2, "round": 1, "deltas": lineage[1]["deltas"]}
        assert info.parts[pid].lineage[:-1] == bank_json_before.parts[pid].lineage

    # The deltas are merged (payload dropped), the round recorded.
    assert core.ledger.summary()["deltas"] == {"merged": 2}
    assert env.rows("SELECT status, merged_round, payload FROM deltas ORDER BY delta_id") == [("merged", 1, None)] * 2
    recent = core.ledger.summary()["recent_rounds"]
    assert recent[0]["round"] == 1 and recent[0]["outcome"] == "merged" and recent[0]["deltas"] == 2
    assert recent[0]["held_parts"] == []

    # Only dev-a (trainable, holds L0M0 and head) gets a signed update, chunked at 4 KiB and reassembled.
    assert {t for t, _ in pubs} == {topics.update(DEV_A)}
    assert len(pubs) > 1 and all(len(d) <= 4096 for _, d in pubs)
    got = updates(pubs, env.verifier)
    assert list(got) == [DEV_A] and len(got[DEV_A]) == 1
    upd = got[DEV_A][0]
    assert upd.bank_id == info.bank_id
    assert upd.versions == {"L0M0": 2, "head": 2}
    assert upd.parts == {pid: sorted(n for n, v in env.params(pid).items() if v.dtype.kind == "f")
                         for pid in ("L0M0", "head")}
    for pid, names in upd.parts.items():
        current = env.params(pid)
        for n in names:
            assert np.array_equal(upd.tensors[n], current[n]), n
    assert core.counters["module_updates_sent"] == 1

    # Updates are refused under another key; nothing left to merge afterwards.
    other = Verifier(Ed25519PrivateKey.generate().public_key())
    whole = wire.Reassembler()
    signed: bytes | None = None
    for _, piece in pubs:
        signed = whole.add(as_chunk(piece)) or signed
    assert signed is not None
    with pytest.raises(BundleError):
        wire.decode(signed, verifier=other)
    assert core.run_round() == (None, [])
    assert core.ledger.pending_count() == 0


def test_single_small_update_is_not_chunked(env: Env) -> None:
    core = env.core()
    profile(core, env, DEV_A, ["head"])
    d = env.delta(DEV_B, ("head",))
    deliver(core, d)
    result, pubs = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    assert len(pubs) == 1 and pubs[0][0] == topics.update(DEV_A)
    msg = wire.decode(pubs[0][1], verifier=env.verifier)
    assert isinstance(msg, wire.ModuleUpdateMessage) and msg.versions == {"head": 2}
    assert msg.device_id == DEV_A  # a device refuses updates addressed to another


def test_fp16_updates_halve_the_bytes_and_round_the_weights(env: Env) -> None:
    """--update-codec fp16+zlib: the device gets the merged weights rounded to fp16, in about half the bytes."""
    sizes: dict[str, int] = {}
    half = Env(Path(shutil.copytree(env.bank, env.bank.parent / "half")), (env.key_path, env.signer, env.verifier))
    for codec, sub in (("fp32+zlib", env), ("fp16+zlib", half)):
        core = sub.core(update_codec=codec)
        profile(core, sub, DEV_A, ["L0M0", "head"])
        deliver(core, sub.delta(DEV_B, ("L0M0", "head"), seed=3))
        result, pubs = core.run_round()
        assert result is not None and result.versions == {"L0M0": 2, "head": 2}
        sizes[codec] = sum(len(d) for _, d in pubs)
        (upd,) = updates(pubs, sub.verifier)[DEV_A]
        for pid, names in upd.parts.items():
            current = sub.params(pid)
            for n in names:
                want = current[n].astype(np.float16).astype(np.float32) if codec.startswith("fp16") else current[n]
                assert upd.tensors[n].dtype == np.float32 and np.array_equal(upd.tensors[n], want), n
    env.cores.extend(half.cores)  # closed with the fixture's
    assert sizes["fp16+zlib"] < 0.6 * sizes["fp32+zlib"]


def test_an_update_beyond_fp16_range_goes_as_fp32() -> None:
    from cloud_sync.redistribute import codec_for

    small = {"w": np.ones(3, np.float32)}
    assert codec_for(small, "fp16+zlib") == "fp16+zlib" and codec_for(small, "fp32+zlib") == "fp32+zlib"
    assert codec_for({**small, "v": np.array([7e4], np.float32)}, "fp16+lzma") == "fp32+lzma"


@pytest.mark.parametrize("name", ["int8+zlib", "fp32+top0.1+zlib", "fp64", "fp16+gzip"])
def test_update_codecs_that_would_mangle_weights_are_refused(name: str) -> None:
    from cloud_sync.redistribute import update_codec_name

    with pytest.raises(ConfigError, match="--update-codec") as err:
        update_codec_name(name)
    assert "\n" not in err.value.message and err.value.hint
    assert update_codec_name("fp16+zlib") == "fp16+zlib" and update_codec_name("fp32") == "fp32+none"


def test_acks_are_signed_and_name_their_device(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_A)
    pubs, _ = deliver(core, msg)
    assert [t for t, _ in pubs] == [topics.ack(DEV_A)]
    ack = wire.decode(pubs[0][1], verifier=env.verifier)
    assert isinstance(ack, wire.AckMessage)
    assert (ack.delta_id, ack.device_id, ack.status) == (msg.delta_id, DEV_A, "stored")
    with pytest.raises(BundleError, match="not the trusted key"):
        wire.decode(pubs[0][1], verifier=Verifier(Ed25519PrivateKey.generate().public_key()))


def test_without_a_signer_acks_are_unsigned(env: Env) -> None:
    """Only devices without a trust key accept them (and they warn about it)."""
    core = SyncCore(SyncSettings(bank_dir=env.bank), None, exporter_hooks(env.bank))
    env.cores.append(core)
    msg = env.delta(DEV_A)
    pubs, _ = deliver(core, msg)
    assert one_ack(pubs, DEV_A, msg.delta_id, "stored").device_id == DEV_A
    with pytest.raises(BundleError, match="not signed"):
        wire.decode(pubs[0][1], verifier=env.verifier)


def test_chunks_are_reassembled_per_device(env: Env) -> None:
    """Another device cannot complete (or spoil) a device's chunked message."""
    core = env.core()
    register(core, DEV_A)
    msg = env.delta(DEV_A)
    pieces = wire.chunk(wire.encode(msg), 4096)
    assert len(pieces) > 2
    for p in pieces[:-1]:
        assert core.handle(topics.delta(DEV_A), p) == []
    assert core.handle(topics.delta(DEV_B), pieces[-1]) == []
    one_ack(core.handle(topics.delta(DEV_A), pieces[-1]), DEV_A, msg.delta_id, "stored")


def test_without_a_signer_no_updates_are_sent(env: Env) -> None:
    core = SyncCore(SyncSettings(bank_dir=env.bank, merge=MergeSettings(min_devices=1)), None,
                    exporter_hooks(env.bank))
    env.cores.append(core)
    profile(core, env, DEV_A, ["head"])
    deliver(core, env.delta(DEV_B, ("head",)))
    result, pubs = core.run_round()
    assert result is not None and result.versions == {"head": 2} and pubs == []


def test_second_round_bumps_again(env: Env) -> None:
    core = env.core()
    deliver(core, env.delta(DEV_A, ("head",), seed=1))
    core.run_round()
    d2 = env.delta(DEV_A, ("head",), seed=2)
    assert d2.base_versions == {"head": 2}
    deliver(core, d2)
    result, _ = core.run_round()
    assert result is not None and result.round == 2 and result.versions == {"head": 3}
    assert env.info().parts["head"].version == 3
    assert [e["version"] for e in core.ledger.lineage("head")] == [1, 2, 3]
    assert core.ledger.lineage("head")[2]["deltas"] == [d2.delta_id]


def test_gate_holds_back_a_harmful_delta(env: Env) -> None:
    core = env.core()
    head = env.params("head")
    w, b = head["head.fc.weight"].astype(np.float64), head["head.fc.bias"].astype(np.float64)
    wreck = env.delta(DEV_A, ("head",), seed=5)
    wreck.tensors["head.fc.weight"] = (-0.99 * w).astype(np.float32)  # ||d|| = 0.99 ||w|| < ||w|| + 1
    shift = np.zeros_like(b)
    shift[3] = 0.99 * (np.linalg.norm(b) + 1.0)  # one class's bias up, within the bound
    wreck.tensors["head.fc.bias"] = shift.astype(np.float32)
    one_ack(deliver(core, wreck)[0], DEV_A, wreck.delta_id, "stored")  # it passes every check on arrival
    benign = env.delta(DEV_B, ("L0M0",), seed=6)
    one_ack(deliver(core, benign)[0], DEV_B, benign.delta_id, "stored")
    profile(core, env, DEV_C, ["head", "L0M0"])

    result, pubs = core.run_round()
    assert result is not None
    assert result.versions == {"L0M0": 2}  # head is held back, L0M0 goes through
    assert result.held == [wreck.delta_id] and result.merged == [benign.delta_id]
    assert "head" in result.reason and "validation accuracy" in result.reason
    assert result.val_after >= result.val_before - core.settings.merge.gate_margin

    info = env.info()
    assert info.parts["head"].version == 1 and info.parts["L0M0"].version == 2
    assert core.ledger.versions()["head"] == 1
    assert all(np.array_equal(env.params("head")[n], v) for n, v in head.items())
    assert [e["version"] for e in core.ledger.lineage("head")] == [1]
    assert env.rows("SELECT status, reason, merged_round FROM deltas WHERE delta_id = ?", wreck.delta_id) == [
        ("held", "validation_gate", 1)]
    summary = core.ledger.summary()
    assert summary["deltas"] == {"held": 1, "merged": 1}
    assert summary["recent_rounds"][0]["held_parts"] == ["head"]
    assert summary["recent_rounds"][0]["outcome"] == "held"
    assert summary["recent_rounds"][0]["val_after"] == pytest.approx(result.val_after)

    got = updates(pubs, env.verifier)
    assert [u.versions for u in got[DEV_C]] == [{"L0M0": 2}]
    assert core.run_round() == (None, [])  # a held delta is not retried


def test_gate_holds_everything_when_all_parts_hurt(env: Env) -> None:
    core = env.core()
    head = env.params("head")
    wreck = env.delta(DEV_A, ("head",), seed=5)
    wreck.tensors["head.fc.weight"] = (-0.99 * head["head.fc.weight"]).astype(np.float32)
    wreck.tensors["head.fc.bias"] = np.eye(10, dtype=np.float32)[0] * (np.linalg.norm(head["head.fc.bias"]) + 0.99)
    deliver(core, wreck)
    result, pubs = core.run_round()
    assert result is not None and result.versions == {} and result.held == [wreck.delta_id] and pubs == []
    assert env.info().parts["head"].version == 1
    assert core.ledger.summary()["recent_rounds"][0]["outcome"] == "held"


def test_overlapping_parameter_subsets_are_not_double_counted(env: Env) -> None:
    core = env.core()
    head = env.params("head")
    full = env.delta(DEV_A, ("head",), seed=1, sample_count=10)
    partial = env.delta(DEV_B, ("head",), seed=2, sample_count=10)
    d = full.tensors["head.fc.weight"]
    partial.parts = {"head": ["head.fc.weight"]}
    partial.tensors = {"head.fc.weight": d.copy()}  # the very same change to the weight, bias not trained
    deliver(core, full)
    deliver(core, partial)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    # Both devices moved the weight by d: the weighted mean of (d, d) is d, not 2d.
    np.testing.assert_allclose(env.params("head")["head.fc.weight"], head["head.fc.weight"] + d, atol=1e-6)


def test_delta_without_parameters_is_rejected(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_A, ("L0M0",), parts={"L0M0": []}, tensors={})
    ack = one_ack(deliver(core, msg)[0], DEV_A, msg.delta_id, "rejected")
    assert ack.reason.startswith("empty_or_oversized")


# ----------------------------------------------------------------------------------------------------------------
# Crash consistency and restarts


def test_orphan_part_file_without_commit_is_ignored(env: Env) -> None:
    core = env.core()
    bank_json = (env.bank / BANK_FILE).read_bytes()
    head = env.params("head")
    core.close()
    # A round wrote its new part file and died before the ledger commit.
    junk = {n: (v + 5).astype(v.dtype) for n, v in head.items()}
    DirectoryBank(env.bank).write_part_version("head", 2, junk)

    core = env.core()
    assert core.merger.versions()["head"] == 1
    assert (env.bank / BANK_FILE).read_bytes() == bank_json
    assert env.info().parts["head"].version == 1
    assert all(np.array_equal(core.merger.params["head"][n], v) for n, v in head.items())

    # The next real round overwrites the orphan with the merged parameters.
    d = env.delta(DEV_A, ("head",))
    deliver(core, d)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    merged = env.params("head")  # checks the recorded sha256 of v2
    for n, v in head.items():
        expected = v + d.tensors[n] if n in d.tensors else v
        np.testing.assert_allclose(merged[n], expected, atol=1e-6)


def test_bank_json_is_reconciled_to_the_ledger(env: Env) -> None:
    core = env.core()
    d = env.delta(DEV_A, ("head", "L1M1"))
    deliver(core, d)
    old_bank_json = (env.bank / BANK_FILE).read_bytes()
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2, "L1M1": 2}
    merged = {pid: env.params(pid) for pid in ("head", "L1M1")}
    core.close()

    # Crash after the ledger commit but before bank.json was rewritten.
    (env.bank / BANK_FILE).write_bytes(old_bank_json)
    assert env.info().parts["head"].version == 1

    core = env.core()
    info = env.info()
    assert {pid: rec.version for pid, rec in info.parts.items()} == core.ledger.versions()
    assert info.parts["head"].version == 2 and info.parts["L1M1"].version == 2 and info.parts["L0M0"].version == 1
    for pid in ("head", "L1M1"):
        assert info.parts[pid].sha256 == sha256_file(DirectoryBank(env.bank).part_file(pid, 2))
        assert any(d.delta_id in entry["deltas"] for entry in info.parts[pid].lineage)
        current = env.params(pid)
        for n, v in merged[pid].items():
            assert np.array_equal(current[n], v) and np.array_equal(core.merger.params[pid][n], v)
    # Reconciling again changes nothing.
    reconciled = (env.bank / BANK_FILE).read_bytes()
    env.reopen(core)
    assert (env.bank / BANK_FILE).read_bytes() == reconciled


def test_duplicate_across_restart(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_A)
    payload = wire.encode(msg)
    register(core, DEV_A)
    one_ack(core.handle(topics.delta(DEV_A), payload), DEV_A, msg.delta_id, "stored")
    core = env.reopen(core)
    ack = one_ack(core.handle(topics.delta(DEV_A), payload), DEV_A, msg.delta_id, "duplicate")
    assert ack.reason == "pending"
    assert env.rows("SELECT COUNT(*) FROM deltas") == [(1,)]

    # Still a duplicate once merged, and after another restart.
    result, _ = core.run_round()
    assert result is not None and result.merged == [msg.delta_id]
    core = env.reopen(core)
    ack = one_ack(core.handle(topics.delta(DEV_A), payload), DEV_A, msg.delta_id, "duplicate")
    assert ack.reason == "merged"
    assert core.ledger.pending_count() == 0
    assert core.run_round() == (None, [])


def test_rejections_survive_restart(env: Env) -> None:
    core = env.core()
    msg = env.delta(DEV_A, sample_count=0)
    deliver(core, msg)
    core = env.reopen(core)
    assert one_ack(deliver(core, msg)[0], DEV_A, msg.delta_id, "duplicate").reason == "rejected"
    assert core.ledger.summary()["rejected_by_reason"] == {"no_samples": 1}


def test_due_by_count_and_by_age(env: Env) -> None:
    core = env.core(round_deltas=3, round_seconds=3600)
    assert not core.due()
    for i in range(2):
        deliver(core, env.delta(f"dev-{i}", ("head",), seed=i))
    assert not core.due()
    core.last_round -= 7200  # the oldest pending delta has waited long enough
    assert core.due()
    core.last_round += 7200
    deliver(core, env.delta("dev-9", ("head",), seed=9))
    assert core.due()


def test_payload_digest_is_stable(env: Env) -> None:
    # The ledger stores the exact bytes received: what is merged is what was validated.
    core = env.core()
    msg = env.delta(DEV_A)
    payload = wire.encode(msg)
    register(core, DEV_A)
    core.handle(topics.delta(DEV_A), payload)
    (stored,) = env.rows("SELECT payload FROM deltas")
    assert hashlib.sha256(stored[0]).digest() == hashlib.sha256(payload).digest()

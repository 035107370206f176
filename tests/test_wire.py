"""The wire codec: every message type round-trips, malformed input is refused, updates are signed, chunks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from eclm import wire
from eclm.errors import BundleError, DataError, EclmError
from eclm.signing import Signer, Verifier

SEED = 20240611
CODECS = ("fp32+none", "fp16+zlib", "int8+lzma")


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def verifier(signer: Signer) -> Verifier:
    return Verifier(signer.private.public_key())


# ----------------------------------------------------------------------------------------------------------------
# Seeded builders: one per message type, every field set (to a non-default value where it has a default).


def _hex(rng: np.random.Generator, n: int = 16) -> str:
    return rng.bytes(n // 2).hex()


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> list[list[float]]:
    return [[float(v) for v in rng.uniform(0, 1, cols)] for _ in range(rows)]


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "layers.0.mods.m1.conv1.conv.weight": rng.normal(0, 0.1, (8, 16, 3, 3)).astype(np.float32),
        "layers.0.mods.m1.conv1.bn.bias": rng.normal(0, 1, (8,)).astype(np.float32),
        "head.fc.weight": rng.normal(0, 2, (10, 32)).astype(np.float32),
        "layers.0.mods.m1.conv1.bn.num_batches_tracked": np.array([int(rng.integers(1, 10**9))], dtype=np.int64),
    }


def build_profile(rng: np.random.Generator) -> wire.ProfileMessage:
    return wire.ProfileMessage(
        device_id=f"dev-{_hex(rng, 8)}", bank_id=_hex(rng), bundle=_hex(rng), importance=_matrix(rng, 3, 8),
        sample_count=int(rng.integers(1, 10_000)), profile_name=f"pi{int(rng.integers(3, 6))}",
        modules={f"L{int(rng.integers(0, 3))}M{i}": int(rng.integers(1, 9)) for i in range(4)},
        trainable=False, want_bundle=True, measured=True, derived_for=_matrix(rng, 3, 8),
        resources={"memory_mb": float(rng.uniform(100, 4000)), "cpu_load": float(rng.uniform())},
        environment=f"line-{int(rng.integers(1, 9))}", line=f"site.{_hex(rng, 4)}",
        created=float(rng.uniform(1.6e9, 1.8e9)),
    )


def build_delta(rng: np.random.Generator) -> wire.DeltaMessage:
    tensors = _tensors(rng)
    return wire.DeltaMessage(
        delta_id=_hex(rng, 32), device_id=f"dev-{_hex(rng, 8)}", bank_id=_hex(rng), bundle=_hex(rng),
        base_versions={"L0M1": int(rng.integers(1, 50)), "head": int(rng.integers(1, 50))},
        parts={"L0M1": sorted(n for n in tensors if n.startswith("layers.")), "head": ["head.fc.weight"]},
        tensors=tensors, sample_count=int(rng.integers(1, 10_000)), importance=_matrix(rng, 3, 8),
        metrics={"loss": float(rng.uniform()), "epochs": int(rng.integers(1, 9)), "note": _hex(rng),
                 "nested": {"acc": [float(rng.uniform()), float(rng.uniform())]}},
        accepted_locally=False, environment=f"line_{_hex(rng, 6)}", base_environment=f"cam-{_hex(rng, 4)}",
        created=float(rng.uniform(1.6e9, 1.8e9)),
    )


def build_ack(rng: np.random.Generator) -> wire.AckMessage:
    return wire.AckMessage(delta_id=_hex(rng, 32), status=str(rng.choice(["stored", "duplicate", "rejected"])),
                           reason=f"norm_bound: {_hex(rng)}", device_id=f"dev-{_hex(rng, 8)}",
                           created=float(rng.uniform(1.6e9, 1.8e9)))


def build_module_update(rng: np.random.Generator) -> wire.ModuleUpdateMessage:
    tensors = _tensors(rng)
    return wire.ModuleUpdateMessage(
        update_id=_hex(rng, 32), bank_id=_hex(rng),
        versions={"L0M1": int(rng.integers(1, 50)), "head": int(rng.integers(1, 50))},
        parts={"L0M1": sorted(n for n in tensors if n.startswith("layers.")), "head": ["head.fc.weight"]},
        tensors=tensors, device_id=f"dev-{_hex(rng, 8)}", environment=f"line-{int(rng.integers(1, 9))}",
        created=float(rng.uniform(1.6e9, 1.8e9)),
    )


def build_bundle_update(rng: np.random.Generator) -> wire.BundleUpdateMessage:
    archive = rng.bytes(int(rng.integers(1000, 5000)))
    return wire.BundleUpdateMessage(update_id=_hex(rng, 32), bank_id=_hex(rng), digest=_hex(rng), archive=archive,
                                    reason="importance profile moved", created=float(rng.uniform(1.6e9, 1.8e9)))


def build_status(rng: np.random.Generator) -> wire.StatusMessage:
    return wire.StatusMessage(device_id=f"dev-{_hex(rng, 8)}", online=bool(rng.integers(0, 2)), bundle=_hex(rng),
                              generation=int(rng.integers(1, 1000)),
                              event=str(rng.choice(["rollback", "variant", "drift"])),
                              detail={"level": int(rng.integers(0, 3)), "reason": _hex(rng, 6)},
                              created=float(rng.uniform(1.6e9, 1.8e9)))


def build_request(rng: np.random.Generator) -> wire.RequestMessage:
    return wire.RequestMessage(kind=str(rng.choice(["profile", "status", "bundle"])),
                               created=float(rng.uniform(1.6e9, 1.8e9)))


def build_chunk(rng: np.random.Generator) -> wire.ChunkMessage:
    data = rng.bytes(int(rng.integers(100, 3000)))
    total = int(rng.integers(2, 50))
    return wire.ChunkMessage(message_id=_hex(rng, 32), index=int(rng.integers(0, total)), total=total,
                             sha256=hashlib.sha256(data).hexdigest(), data=data)


BUILDERS: dict[str, Callable[[np.random.Generator], Any]] = {
    "profile": build_profile,
    "delta": build_delta,
    "ack": build_ack,
    "module_update": build_module_update,
    "bundle_update": build_bundle_update,
    "status": build_status,
    "request": build_request,
    "chunk": build_chunk,
}


def _build(type_name: str, seed: int = SEED) -> Any:
    return BUILDERS[type_name](np.random.default_rng([seed, sorted(wire.TYPES).index(type_name)]))


def _assert_tensors_close(original: dict[str, np.ndarray], decoded: dict[str, np.ndarray], codec: str) -> None:
    assert sorted(decoded) == sorted(original)
    for name, a in original.items():
        b = decoded[name]
        assert b.shape == a.shape, name
        if a.dtype.kind != "f":
            assert b.dtype == a.dtype and np.array_equal(a, b), name
            continue
        assert b.dtype == np.float32, name
        x = a.astype(np.float32)
        if codec.startswith("fp32"):
            assert np.array_equal(b, x), name
        elif codec.startswith("fp16"):
            np.testing.assert_allclose(b, x, rtol=1e-3, atol=1e-7, err_msg=name)
        else:  # int8: half a quantisation step of the per-tensor scale
            bound = float(np.max(np.abs(x))) / 127.0 / 2 * (1 + 1e-5) + 1e-12
            assert float(np.max(np.abs(b - x))) <= bound, name


def _assert_same(original: Any, decoded: Any, codec: str) -> None:
    assert type(decoded) is type(original)
    for f in dataclasses.fields(original):
        a, b = getattr(original, f.name), getattr(decoded, f.name)
        if f.name == "tensors":
            _assert_tensors_close(a, b, codec)
        else:
            assert b == a, f.name
            assert type(b) is type(a), f.name


def _encode(msg: Any, signer: Signer, codec: str = "fp32+zlib") -> bytes:
    return wire.encode(msg, codec=codec, signer=signer if isinstance(msg, wire.SIGNABLE) else None)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", data[6:10])
    return json.loads(data[10 : 10 + n]), data[10 + n :]


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw + body


# ----------------------------------------------------------------------------------------------------------------
# Round trips


def test_every_message_type_has_a_round_trip_case() -> None:
    assert set(BUILDERS) == set(wire.TYPES), "add a builder for every type in eclm.wire.TYPES"
    for name, cls in wire.TYPES.items():
        msg = _build(name)
        assert type(msg) is cls and cls.TYPE == name
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert getattr(msg, f.name) != f.default, f"{name}.{f.name} keeps its default"
            elif f.default_factory is not dataclasses.MISSING and f.default_factory in (dict, list):
                assert getattr(msg, f.name) != f.default_factory(), f"{name}.{f.name} keeps its default"


def test_builders_are_seeded(signer: Signer) -> None:
    for name in wire.TYPES:
        assert _encode(_build(name), signer) == _encode(_build(name), signer), name
        assert _encode(_build(name), signer) != _encode(_build(name, SEED + 1), signer), name


@pytest.mark.parametrize("type_name", sorted(wire.TYPES))
def test_round_trip(type_name: str, signer: Signer, verifier: Verifier) -> None:
    msg = _build(type_name)
    data = _encode(msg, signer)
    assert data.startswith(wire.MAGIC)
    _assert_same(msg, wire.decode(data, verifier=verifier), "fp32")
    _assert_same(msg, wire.decode(data), "fp32")  # verification is the receiver's choice


@pytest.mark.parametrize("codec", ["fp32+none", "fp32+zlib", "fp32+lzma", "fp16+none", "fp16+zlib", "int8+none",
                                   "int8+zlib", "int8+lzma"])
@pytest.mark.parametrize("type_name", sorted(n for n, c in wire.TYPES.items()
                                             if "tensors" in {f.name for f in dataclasses.fields(c)}))
def test_tensor_round_trip_per_codec(type_name: str, codec: str, signer: Signer, verifier: Verifier) -> None:
    msg = _build(type_name)
    decoded = wire.decode(_encode(msg, signer, codec), verifier=verifier)
    _assert_same(msg, decoded, codec)


def test_lossy_codecs_really_compress(signer: Signer) -> None:
    msg = _build("delta")
    sizes = {c: len(_encode(msg, signer, c)) for c in CODECS}
    assert sizes["int8+lzma"] < sizes["fp16+zlib"] < sizes["fp32+none"]


# ----------------------------------------------------------------------------------------------------------------
# Malformed input


def test_unknown_schema_version_says_upgrade(signer: Signer) -> None:
    header, body = _split(_encode(_build("status"), signer))
    header["schema_version"] = wire.SCHEMA_VERSION + 1
    with pytest.raises(DataError) as exc:
        wire.decode(_frame(header, body))
    assert "upgrade" in str(exc.value)
    assert str(wire.SCHEMA_VERSION + 1) in exc.value.message


def test_missing_schema_version_is_refused(signer: Signer) -> None:
    header, body = _split(_encode(_build("ack"), signer))
    del header["schema_version"]
    with pytest.raises(DataError, match="schema version"):
        wire.decode(_frame(header, body))


def test_unknown_type(signer: Signer) -> None:
    header, body = _split(_encode(_build("ack"), signer))
    header["type"] = "telemetry"
    with pytest.raises(DataError, match="unknown message type 'telemetry'"):
        wire.decode(_frame(header, body))


@pytest.mark.parametrize("data", [b"", b"ECLMW", b"ECLMW1\x00", b"ECLMW2" + b"\x00" * 20, b"garbage" * 10,
                                  b"eclmw1\x02\x00\x00\x00{}"])
def test_bad_magic(data: bytes) -> None:
    with pytest.raises(DataError, match="bad magic"):
        wire.decode(data)


def test_bad_magic_on_a_real_message(signer: Signer) -> None:
    data = bytearray(_encode(_build("profile"), signer))
    data[0] ^= 0x20
    with pytest.raises(DataError, match="bad magic"):
        wire.decode(bytes(data))


def test_truncated_header(signer: Signer) -> None:
    data = _encode(_build("profile"), signer)
    (n,) = struct.unpack("<I", data[6:10])
    for cut in (11, 10 + n // 2, 10 + n - 1):
        with pytest.raises(DataError, match="truncated"):
            wire.decode(data[:cut])
    with pytest.raises(DataError, match="truncated or oversized"):
        wire.decode(wire.MAGIC + struct.pack("<I", wire.MAX_HEADER + 1) + b"{}")


@pytest.mark.parametrize("header", [b"not json", b"\xff\xfe\xfd", b"[1, 2]", b'"text"', b'{"type": "ack"'])
def test_header_not_a_json_object(header: bytes) -> None:
    with pytest.raises(DataError):
        wire.decode(wire.MAGIC + struct.pack("<I", len(header)) + header)


def test_truncated_body(signer: Signer) -> None:
    # (Cutting only the zlib trailer, <= 6 bytes, is accepted: the decoder does not require end of stream.)
    data = _encode(_build("delta"), signer, "fp32+zlib")
    for cut in (100, 1000, len(_split(data)[1]) - 1):
        with pytest.raises(DataError):
            wire.decode(data[:-cut])


WRONG_FIELDS = [
    ("profile", "sample_count", "3"),
    ("profile", "sample_count", 3.0),
    ("profile", "sample_count", True),
    ("profile", "trainable", 1),
    ("profile", "importance", [["0.5"]]),
    ("profile", "importance", [[True, 0.2]]),
    ("profile", "importance", [0.1, 0.2]),
    ("profile", "modules", ["L0M1"]),
    ("profile", "device_id", 7),
    ("delta", "sample_count", "3"),
    ("delta", "parts", [["L0M1"]]),
    ("delta", "importance", "high"),
    ("delta", "base_versions", None),
    ("ack", "status", None),
    ("ack", "created", "yesterday"),
    ("status", "online", "yes"),
    ("status", "generation", 1.5),
    ("request", "kind", ["profile"]),
    ("chunk", "index", "0"),
    ("module_update", "versions", 2),
]


@pytest.mark.parametrize(("type_name", "field_name", "value"), WRONG_FIELDS)
def test_wrong_field_types(type_name: str, field_name: str, value: Any, signer: Signer) -> None:
    header, body = _split(_encode(_build(type_name), signer))
    header["fields"][field_name] = value
    with pytest.raises(DataError, match=field_name):
        wire.decode(_frame(header, body))


def test_missing_and_unknown_fields(signer: Signer) -> None:
    header, body = _split(_encode(_build("profile"), signer))
    missing = json.loads(json.dumps(header))
    del missing["fields"]["device_id"]
    with pytest.raises(DataError, match="device_id"):
        wire.decode(_frame(missing, body))
    extra = json.loads(json.dumps(header))
    extra["fields"]["color"] = "red"
    with pytest.raises(DataError, match="unknown fields"):
        wire.decode(_frame(extra, body))
    nofields = json.loads(json.dumps(header))
    del nofields["fields"]
    with pytest.raises(DataError, match="no fields"):
        wire.decode(_frame(nofields, body))


def test_tensor_message_without_tensors(signer: Signer) -> None:
    header, body = _split(_encode(_build("delta"), signer))
    del header["tensors"]
    with pytest.raises(DataError, match="lacks its tensors"):
        wire.decode(_frame(header, body))
    header, body = _split(_encode(_build("delta"), signer))
    header["tensors"]["shapes"]["head.fc.weight"] = [3, 3]
    with pytest.raises(DataError, match="malformed tensor payload"):
        wire.decode(_frame(header, body))


def test_max_bytes(signer: Signer) -> None:
    data = _encode(_build("delta"), signer)
    assert isinstance(wire.decode(data, max_bytes=len(data)), wire.DeltaMessage)
    limit = len(data) - 1
    with pytest.raises(DataError) as exc:
        wire.decode(data, max_bytes=limit)
    assert str(limit) in exc.value.message and "limit" in exc.value.message
    assert "chunk" in (exc.value.hint or "")


def test_deeply_nested_header_is_a_data_error() -> None:
    header = b"[" * 100_000
    with pytest.raises(DataError):
        wire.decode(wire.MAGIC + struct.pack("<I", len(header)) + header)


# ----------------------------------------------------------------------------------------------------------------
# Signatures


def test_signed_types_are_the_update_messages_and_acks() -> None:
    assert set(wire.SIGNED) == {wire.ModuleUpdateMessage, wire.BundleUpdateMessage}
    assert set(wire.SIGNABLE) == {*wire.SIGNED, wire.AckMessage}


def test_acks_may_be_unsigned_but_a_verifier_requires_the_signature(signer: Signer, verifier: Verifier) -> None:
    ack = _build("ack")
    plain = wire.encode(ack)  # a daemon without a signing key
    assert "signature" not in _split(plain)[0]
    assert wire.decode(plain) == ack
    with pytest.raises(BundleError, match="not signed"):
        wire.decode(plain, verifier=verifier)
    assert wire.decode(wire.encode(ack, signer=signer), verifier=verifier) == ack


@pytest.mark.parametrize("cls", wire.SIGNED, ids=lambda c: c.TYPE)
def test_update_messages_need_a_signer(cls: Any) -> None:
    with pytest.raises(DataError, match="must be signed"):
        wire.encode(_build(cls.TYPE))


@pytest.mark.parametrize("type_name", sorted(n for n, c in wire.TYPES.items() if c not in wire.SIGNABLE))
def test_other_messages_are_not_signed(type_name: str) -> None:
    header, _ = _split(wire.encode(_build(type_name)))
    assert "signature" not in header


@pytest.mark.parametrize("cls", wire.SIGNABLE, ids=lambda c: c.TYPE)
def test_signed_messages_verify(cls: Any, signer: Signer, verifier: Verifier) -> None:
    msg = _build(cls.TYPE)
    data = wire.encode(msg, signer=signer)
    header, _ = _split(data)
    assert header["signature"]["alg"] == "ed25519" and header["signature"]["key_id"] == signer.key_id
    _assert_same(msg, wire.decode(data, verifier=verifier), "fp32")


@pytest.mark.parametrize("cls", wire.SIGNABLE, ids=lambda c: c.TYPE)
def test_flipped_header_byte_is_refused(cls: Any, signer: Signer, verifier: Verifier) -> None:
    msg = _build(cls.TYPE)
    data = bytearray(wire.encode(msg, signer=signer))
    (n,) = struct.unpack("<I", data[6:10])
    header_bytes = bytes(data[10 : 10 + n])
    values = (msg.reason, msg.device_id) if isinstance(msg, wire.AckMessage) else (msg.bank_id, msg.update_id)
    for value in values:  # a flip inside a string keeps the header valid JSON
        pos = 10 + header_bytes.index(f'"{value}"'.encode()) + 1
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        with pytest.raises(BundleError, match="invalid signature"):
            wire.decode(bytes(tampered), verifier=verifier)


@pytest.mark.parametrize("cls", wire.SIGNED, ids=lambda c: c.TYPE)
def test_flipped_body_byte_is_refused(cls: Any, signer: Signer, verifier: Verifier) -> None:
    data = wire.encode(_build(cls.TYPE), signer=signer)
    (n,) = struct.unpack("<I", data[6:10])
    for pos in (10 + n, 10 + n + (len(data) - 10 - n) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        with pytest.raises(BundleError, match="invalid signature"):
            wire.decode(bytes(tampered), verifier=verifier)


@pytest.mark.parametrize("cls", wire.SIGNABLE, ids=lambda c: c.TYPE)
def test_every_single_byte_flip_is_refused(cls: Any, signer: Signer, verifier: Verifier) -> None:
    rng = np.random.default_rng(SEED)
    msg = _build(cls.TYPE)
    if isinstance(msg, wire.ModuleUpdateMessage):  # keep the sweep small
        msg.tensors = {"head.fc.bias": rng.normal(size=10).astype(np.float32)}
        msg.parts = {"head": ["head.fc.bias"]}
    elif isinstance(msg, wire.BundleUpdateMessage):
        msg.archive = rng.bytes(300)
    data = wire.encode(msg, signer=signer)
    accepted = []
    for pos in range(len(data)):
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        try:
            decoded = wire.decode(bytes(tampered), verifier=verifier)
        except (BundleError, DataError):
            continue
        # The signature covers the parsed header: a flip may only pass if it parses to the very same message,
        # e.g. the last digit of a float literal beyond double precision.
        _assert_same(msg, decoded, "fp32")
        accepted.append(pos)
    assert len(accepted) <= 2, accepted


@pytest.mark.parametrize("cls", wire.SIGNABLE, ids=lambda c: c.TYPE)
def test_other_key_is_refused(cls: Any, signer: Signer) -> None:
    other = Verifier(Ed25519PrivateKey.generate().public_key())
    data = wire.encode(_build(cls.TYPE), signer=signer)
    with pytest.raises(BundleError, match="not the trusted key"):
        wire.decode(data, verifier=other)
    # A forger who copies the trusted key id still fails.
    forged = wire.encode(_build(cls.TYPE), signer=Signer(Ed25519PrivateKey.generate()))
    header, body = _split(forged)
    header["signature"]["key_id"] = signer.key_id
    with pytest.raises(BundleError, match="invalid signature"):
        wire.decode(_frame(header, body), verifier=Verifier(signer.private.public_key()))


@pytest.mark.parametrize("cls", wire.SIGNABLE, ids=lambda c: c.TYPE)
def test_stripped_signature_is_refused(cls: Any, signer: Signer, verifier: Verifier) -> None:
    header, body = _split(wire.encode(_build(cls.TYPE), signer=signer))
    del header["signature"]
    with pytest.raises(BundleError, match="not signed"):
        wire.decode(_frame(header, body), verifier=verifier)
    header["signature"] = {}
    with pytest.raises(BundleError, match="not signed"):
        wire.decode(_frame(header, body), verifier=verifier)


@pytest.mark.parametrize("bad", ["deadbeef", [1, 2], 5, {"alg": "ed25519", "key_id": "<trusted>", "sig": 123}])
def test_malformed_signature_is_a_bundle_error(bad: Any, signer: Signer, verifier: Verifier) -> None:
    header, body = _split(wire.encode(_build("module_update"), signer=signer))
    if isinstance(bad, dict):
        bad = {**bad, "key_id": signer.key_id}
    header["signature"] = bad
    with pytest.raises(BundleError):
        wire.decode(_frame(header, body), verifier=verifier)


# ----------------------------------------------------------------------------------------------------------------
# Chunks


def _as_chunk(data: bytes) -> wire.ChunkMessage:
    msg = wire.decode(data)
    assert isinstance(msg, wire.ChunkMessage)
    return msg


def _big_payload(signer: Signer) -> bytes:
    rng = np.random.default_rng(SEED)
    msg = _build("delta")
    msg.tensors = {"w": rng.normal(size=20_000).astype(np.float32)}
    msg.parts = {"L0M1": ["w"]}
    return _encode(msg, signer, "fp32+none")


def test_payload_under_the_limit_is_returned_as_is(signer: Signer) -> None:
    data = _encode(_build("ack"), signer)
    out = wire.chunk(data, len(data))
    assert out == [data] and out[0] is data
    assert wire.chunk(data, 10 * len(data)) == [data]


@pytest.mark.parametrize("limit", [600, 4096, 30_000])
def test_chunks_reassemble_out_of_order(limit: int, signer: Signer) -> None:
    data = _big_payload(signer)
    pieces = wire.chunk(data, limit)
    assert len(pieces) > 1
    assert all(len(p) <= limit for p in pieces)
    random.Random(SEED).shuffle(pieces)
    r = wire.Reassembler()
    results = []
    for p in pieces:
        c = wire.decode(p)
        assert isinstance(c, wire.ChunkMessage)
        results.append(r.add(c))
    assert all(x is None for x in results[:-1])
    assert results[-1] == data
    assert isinstance(wire.decode(results[-1]), wire.DeltaMessage)


def test_interleaved_messages_and_duplicate_chunks(signer: Signer) -> None:
    a = _big_payload(signer)
    b = _encode(_build("module_update"), signer, "fp32+none")
    pa, pb = wire.chunk(a, 4096), wire.chunk(b, 4096)
    r = wire.Reassembler()
    done = []
    order = [pa[0], pb[0], pa[0]] + pb[1:] + pa[1:]  # pa[0] delivered twice (QoS 1 redelivery)
    for p in order:
        whole = r.add(_as_chunk(p))
        if whole is not None:
            done.append(whole)
    assert done == [b, a]


def test_reassembly_rejects_a_mismatched_sha256(signer: Signer) -> None:
    data = _big_payload(signer)
    chunks = [_as_chunk(p) for p in wire.chunk(data, 4096)]
    tampered = bytearray(chunks[1].data)
    tampered[0] ^= 0xFF
    chunks[1] = dataclasses.replace(chunks[1], data=bytes(tampered))
    r = wire.Reassembler()
    for c in chunks[:-1]:
        assert r.add(c) is None
    with pytest.raises(DataError, match="sha256"):
        r.add(chunks[-1])


def test_reassembly_rejects_disagreeing_chunks(signer: Signer) -> None:
    chunks = [_as_chunk(p) for p in wire.chunk(_big_payload(signer), 4096)]
    r = wire.Reassembler()
    r.add(chunks[0])
    with pytest.raises(DataError, match="disagree"):
        r.add(dataclasses.replace(chunks[1], sha256="0" * 64))
    with pytest.raises(DataError, match="disagree"):
        r.add(dataclasses.replace(chunks[1], total=chunks[1].total + 1))


@pytest.mark.parametrize(("index", "total"), [(-1, 3), (3, 3), (0, 0), (0, 100_001)])
def test_chunk_index_out_of_range(index: int, total: int) -> None:
    with pytest.raises(DataError, match="out of range"):
        wire.Reassembler().add(wire.ChunkMessage("m", index, total, "0" * 64, b"x"))


def test_chunk_messages_themselves_round_trip() -> None:
    data = np.random.default_rng(SEED).bytes(5000)
    pieces = wire.chunk(data, 1024)
    assert len(pieces) == 10
    for p in pieces:
        c = wire.decode(p)
        assert isinstance(c, wire.ChunkMessage) and c.sha256 == hashlib.sha256(data).hexdigest()


def test_errors_are_eclm_errors(signer: Signer) -> None:
    for bad in (b"", b"x" * 100, wire.MAGIC + b"\xff\xff\xff\xff"):
        with pytest.raises(EclmError):
            wire.decode(bad)


# ----------------------------------------------------------------------------------------------------------------
# Bounded reassembly


def _pieces(data: bytes, limit: int, sender_tag: int = 0) -> list[wire.ChunkMessage]:
    return [_as_chunk(p) for p in wire.chunk(data, limit)]


def test_reassembly_holds_at_most_its_caps_under_a_flood() -> None:
    """Many incomplete messages from many senders: the bytes held never pass the caps, honest data completes."""
    r = wire.Reassembler(max_total_bytes=4 * 2**20, max_sender_bytes=2**20, max_message_bytes=2**20)
    rng = np.random.default_rng(SEED)
    piece = rng.bytes(200_000)
    refused: dict[str, int] = {}
    for i in range(600):  # 600 x 200 kB = 120 MB offered, never completed
        sender = f"dev-{i % 13}"
        c = wire.ChunkMessage(f"m{i}", 0, 5, "0" * 64, piece)
        try:
            assert r.add(c, sender) is None
        except wire.ChunkRefused as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
        assert r.held_bytes <= 4 * 2**20
        assert max(r.held_by(f"dev-{k}") for k in range(13)) <= 2**20
    assert r.held_bytes == sum(len(p) for k in r._parts.values() for p in k.pieces.values())
    honest = rng.bytes(600_000)
    out = [r.add(c, "honest") for c in _pieces(honest, 100_000)]
    assert out[-1] == honest and r.held_by("honest") == 0


def test_reassembly_refuses_a_declared_size_over_the_cap() -> None:
    r = wire.Reassembler(max_total_bytes=2**20)
    with pytest.raises(wire.ChunkRefused, match="exceeds the limit") as info:
        r.add(wire.ChunkMessage("m", 0, 100_000, "0" * 64, b"x" * 1000), "dev")
    assert info.value.reason == "message_cap" and r.held_bytes == 0
    assert isinstance(info.value, DataError)


def test_reassembly_refuses_a_message_that_grows_past_its_cap() -> None:
    """Pieces of varying sizes cannot sneak past the declared-size check."""
    r = wire.Reassembler(max_total_bytes=2**20, max_message_bytes=10_000)
    for i in range(9):  # each piece passes the declared-size check (10 x 1111 <= cap + 1111) ...
        assert r.add(wire.ChunkMessage("m", i, 10, "0" * 64, b"x" * 1111), "dev") is None
    with pytest.raises(wire.ChunkRefused) as info:  # ... but together they grow past it
        r.add(wire.ChunkMessage("m", 9, 10, "0" * 64, b"x" * 1111), "dev")
    assert info.value.reason == "message_cap" and r.held_bytes == 0


def test_reassembly_expires_incomplete_messages() -> None:
    now = [1000.0]
    r = wire.Reassembler(ttl_s=60, clock=lambda: now[0])
    r.add(wire.ChunkMessage("old", 0, 2, "0" * 64, b"x" * 500), "dev")
    assert r.held_bytes == 500
    now[0] += 61
    r.add(wire.ChunkMessage("new", 0, 2, "0" * 64, b"y" * 100), "dev")
    assert r.held_bytes == 100 and len(r) == 1 and r.evicted == 1


def test_reassembly_evicts_the_senders_oldest_message_first() -> None:
    now = [0.0]
    r = wire.Reassembler(max_total_bytes=10_000, max_sender_bytes=3000, clock=lambda: now[0])
    r.add(wire.ChunkMessage("a", 0, 2, "0" * 64, b"a" * 1000), "other")
    for name in ("x1", "x2"):
        now[0] += 1
        r.add(wire.ChunkMessage(name, 0, 2, "0" * 64, b"x" * 1400), "dev")
    now[0] += 1
    data = b"z" * 2000
    pieces = _pieces(data, 1512)
    assert r.add(pieces[0], "dev") is None  # evicts x1 (dev's oldest), not "other"'s older message
    assert r.held_by("other") == 1000 and r.held_by("dev") <= 3000
    assert r.add(pieces[1], "dev") == data


def test_reassembly_keeps_senders_apart() -> None:
    """A chunk with another sender's message id does not join (or disturb) that message."""
    data = np.random.default_rng(SEED).bytes(5000)
    pieces = _pieces(data, 1024)
    r = wire.Reassembler()
    for c in pieces[:-1]:
        assert r.add(c, "dev") is None
    assert r.add(pieces[-1], "intruder") is None
    assert r.add(pieces[-1], "dev") == data


@pytest.mark.parametrize("bad", ["*", "x**", "", "a/b", "../x", "x" * 65, "a b", "[a]", "a?", "d.e"])
def test_acks_name_exactly_one_delta_id(bad: str) -> None:
    data = wire.encode(wire.AckMessage(bad, "rejected", device_id="dev1"))
    with pytest.raises(DataError, match="delta id"):
        wire.decode(data)


def test_ack_status_is_one_of_the_known_ones() -> None:
    with pytest.raises(DataError, match="ack status"):
        wire.decode(wire.encode(wire.AckMessage("d1", "deleted", device_id="dev1")))

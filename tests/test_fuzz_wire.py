"""Property-based fuzzing (Hypothesis) of everything that parses bytes from outside: arbitrary bytes and
mutated valid encodings either decode or raise the project's error family, never anything else, never hang.

Covered: the wire codec (:func:`eclm.wire.decode`, with and without a verifier), chunk reassembly, the
safetensors and compressed tensor payloads, codec names, the bundle manifest (bytes, fields and a whole
bundle folder), bundle archives, strict JSON, delta ids, part ids, topics and broker URLs. Examples are
bounded and derandomized, so the run is reproducible and short.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eclm import compress, jsonsafe, parts, topics, wire
from eclm.archive import untar_bundle
from eclm.errors import EclmError
from eclm.ids import check_delta_id
from eclm.manifest import MANIFEST, BundleManifest, parse_manifest, verify_bundle, write_manifest
from eclm.mqtt import BrokerUrl
from eclm.reassembly import Reassembler
from eclm.signing import Signer, Verifier
from eclm.tensors import decode_tensors, encode_tensors

# Reproducible (derandomized, no example database) and bounded: all fuzz tests together stay well under a minute.
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SLOW_CALL_S = 5.0  # one decode of a few KB taking longer than this counts as a hang

SIGNER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
VERIFIER = Verifier(SIGNER.private.public_key())
OTHER = Verifier(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))).public_key())


def refuses_or_decodes(fn: Callable[..., Any], *args: Any, family: tuple[type[BaseException], ...] = (EclmError,),
                       **kwargs: Any) -> Any:
    """``fn(*args)``'s result, or None when it raised one of ``family``; anything else (or a hang) fails."""
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except family:
        return None
    finally:
        assert time.perf_counter() - start < SLOW_CALL_S, f"{fn.__name__} took {time.perf_counter() - start:.1f} s"


# --- valid encodings to mutate ----------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_TENSORS: dict[str, np.ndarray] = {"net.head.weight": _RNG.normal(size=(3, 4)).astype(np.float32),
            "net.head.bias": _RNG.normal(size=(3,)).astype(np.float32),
            "counter": np.arange(4, dtype=np.int64)}
MESSAGES: list[wire.Message] = [
    wire.ProfileMessage("dev-1", "bank1", "abc", [[0.5, 0.5], [1.0, 0.0]], 12, modules={"L0M1": 2},
                        derived_for=[[0.4, 0.6]], resources={"free_mb": 100.0}),
    wire.DeltaMessage("d" * 32, "dev-1", "bank1", "abc", {"head": 1}, {"head": ["net.head.weight", "net.head.bias"]},
                      _TENSORS, 40, importance=[[0.5, 0.5]], metrics={"loss": 0.5}),
    wire.AckMessage("d" * 32, "stored", device_id="dev-1"),
    wire.ModuleUpdateMessage("u1", "bank1", {"head": 2}, {"head": ["net.head.weight"]},
                             {"net.head.weight": _TENSORS["net.head.weight"]}, device_id="dev-1"),
    wire.BundleUpdateMessage("u2", "bank1", "digest", b"not really a tar archive", reason="drift"),
    wire.StatusMessage("dev-1", True, bundle="abc", generation=3, event="rollback", detail={"why": "worse"}),
    wire.RequestMessage("profile"),
    wire.ChunkMessage("m" * 32, 0, 2, "0" * 64, b"piece"),
]
CODECS = ["fp32+none", "fp16+zlib", "int8+zlib", "int8+top0.5+lzma", "fp32+top0.25+zlib"]
ENCODED = [wire.encode(m, codec=CODECS[i % len(CODECS)], signer=SIGNER) for i, m in enumerate(MESSAGES)]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """One of ``seeds`` with a few random edits: flipped, inserted or deleted bytes, truncation, a splice."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "length"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))):]
        elif op == "length" and len(data) >= 10:  # the envelope's header length
            data[6:10] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4),
                    max_leaves=12)


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", data[6:10])
    return json.loads(data[10:10 + n]), data[10 + n:]


def _envelope(header: Any, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw + body


@st.composite
def header_mutated(draw: st.DrawFn) -> bytes:
    """A valid message whose JSON header has one value replaced by arbitrary JSON, or one key dropped or added."""
    header, body = _header(draw(st.sampled_from(ENCODED)))
    where = header["fields"] if draw(st.booleans()) else header
    key = draw(st.sampled_from(sorted(where)))
    op = draw(st.sampled_from(["replace", "drop", "add"]))
    if op == "replace":
        where[key] = draw(JSON)
    elif op == "drop":
        del where[key]
    else:
        where[draw(st.text(max_size=8))] = draw(JSON)
    return _envelope(header, body)


# --- the wire codec ---------------------------------------------------------------------------------


def test_the_seeds_decode() -> None:
    for data, msg in zip(ENCODED, MESSAGES, strict=True):
        assert type(wire.decode(data, VERIFIER)) is type(msg)


@FUZZ
@given(st.binary(max_size=512) | st.binary(max_size=512).map(lambda b: wire.MAGIC + b))
def test_wire_decode_of_arbitrary_bytes(data: bytes) -> None:
    refuses_or_decodes(wire.decode, data)
    refuses_or_decodes(wire.decode, data, VERIFIER, max_bytes=256)


@FUZZ
@given(mutated(ENCODED))
def test_wire_decode_of_mutated_messages(data: bytes) -> None:
    msg = refuses_or_decodes(wire.decode, data)
    verified = refuses_or_decodes(wire.decode, data, VERIFIER)
    if isinstance(verified, wire.SIGNABLE) and data not in ENCODED:
        # a signed message that still verifies after the edit: the edit touched no signed byte
        assert wire.encode(verified, codec="fp32+none", signer=SIGNER)
    assert refuses_or_decodes(wire.decode, data, OTHER) is None or not isinstance(msg, wire.SIGNABLE)


@FUZZ
@given(header_mutated())
def test_wire_decode_of_messages_with_hostile_header_values(data: bytes) -> None:
    msg = refuses_or_decodes(wire.decode, data)
    if msg is not None:  # what decodes has the declared types
        wire._check_types(msg)
    refuses_or_decodes(wire.decode, data, VERIFIER)


# --- chunks -----------------------------------------------------------------------------------------

CHUNKS = st.builds(wire.ChunkMessage, st.sampled_from(["a", "b", "c"]), st.integers(-3, 6), st.integers(-1, 6),
                   st.sampled_from(["0" * 64, "1" * 64]), st.binary(max_size=64))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["s1", "s2"]), CHUNKS), max_size=30))
def test_reassembly_of_arbitrary_chunk_sequences_stays_within_its_caps(
        seq: list[tuple[str, wire.ChunkMessage]]) -> None:
    r = Reassembler(max_pending=3, max_total_bytes=256, max_sender_bytes=160, max_message_bytes=128)
    for sender, c in seq:
        refuses_or_decodes(r.add, c, sender)
        assert 0 <= r.held_bytes <= r.max_total_bytes
        assert r.held_bytes == sum(p.held for p in r._parts.values())
        assert all(r.held_by(s) <= r.max_sender_bytes for s in ("s1", "s2"))
        assert len(r) <= r.max_pending


@FUZZ
@given(st.binary(min_size=1, max_size=2000), st.integers(50, 700), st.randoms(use_true_random=False))
def test_chunks_reassemble_in_any_order(payload: bytes, limit: int, rnd: Any) -> None:
    pieces = [wire.decode(c) for c in wire.chunk(payload, limit)] if len(payload) > limit else []
    rnd.shuffle(pieces)
    r = Reassembler()
    out = [r.add(p, "s") for p in pieces]  # type: ignore[arg-type]
    assert not pieces or [o for o in out if o is not None] == [payload]


# --- tensor payloads --------------------------------------------------------------------------------

SAFETENSORS = [encode_tensors(_TENSORS), encode_tensors({"x": np.zeros((0,), np.float32)})]


@FUZZ
@given(st.binary(max_size=256) | mutated(SAFETENSORS))
def test_safetensors_decode_of_arbitrary_and_mutated_bytes(data: bytes) -> None:
    refuses_or_decodes(decode_tensors, data)


COMPRESSED = [compress.encode(_TENSORS, compress.Codec.parse(c)) for c in CODECS]


@st.composite
def compressed_mutated(draw: st.DrawFn) -> tuple[bytes, Any]:
    body, header = draw(st.sampled_from(COMPRESSED))
    header = json.loads(json.dumps(header))
    if draw(st.booleans()):
        body = draw(mutated([body]))
    if draw(st.booleans()):
        section = draw(st.sampled_from(["codec", "shapes", "dtypes"]))
        if section == "codec":
            header["codec"] = draw(st.sampled_from(CODECS) | st.text(max_size=20))
        elif header[section]:
            name = draw(st.sampled_from(sorted(header[section])))
            header[section][name] = draw(JSON | st.lists(st.integers(-2**40, 2**40), max_size=4)
                                         | st.sampled_from(["<f4", "<i8", "|b1", "<U3", "O", "<c8", "V8"]))
    if draw(st.integers(0, 9)) == 0:
        header = draw(JSON)
    return body, header


@FUZZ
@given(compressed_mutated())
def test_compressed_tensor_decode_of_mutated_payloads_and_headers(case: tuple[bytes, Any]) -> None:
    body, header = case
    out = refuses_or_decodes(compress.decode, body, header)
    if out is not None:
        assert all(isinstance(v, np.ndarray) for v in out.values())


@FUZZ
@given(st.text(max_size=30))
def test_codec_names(name: str) -> None:
    codec = refuses_or_decodes(compress.Codec.parse, name)
    if codec is not None:
        assert compress.Codec.parse(codec.name) == codec


# --- the bundle manifest, a bundle folder, a bundle archive -----------------------------------------

MANIFEST_DICT = BundleManifest(
    bank_id="bank1", config="{}", profile={"name": "pi4"}, selection=[[0, 1]], modules=[{"id": "L0M0"}],
    fixed_parts=[{"id": "head"}], input={"shape": [1, 8, 8]}, output={"classes": 3}, labels=["1", "4", "7"],
    derived_for={"classes": [1, 4, 7]}, importance=[[0.5, 0.5]], costs={}, training={"available": False},
    selector={"file": "selector.onnx"}, device_id="dev-1", issued_at=1.0).to_dict()


@st.composite
def manifest_mutated(draw: st.DrawFn) -> bytes:
    data = json.loads(json.dumps(MANIFEST_DICT))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(data)))
        if draw(st.booleans()):
            data[key] = draw(JSON)
        else:
            data.pop(key)
    raw = json.dumps(data).encode()
    return draw(mutated([raw])) if draw(st.integers(0, 3)) == 0 else raw


@FUZZ
@given(st.binary(max_size=256) | manifest_mutated())
def test_manifest_parse_of_arbitrary_and_mutated_bytes(raw: bytes) -> None:
    man = refuses_or_decodes(parse_manifest, raw, Path("bundle"))
    if man is not None:
        assert isinstance(man, BundleManifest)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-bundle") / "b"
    root.mkdir()
    for name in ("model.onnx", "selector.onnx"):
        (root / name).write_bytes(name.encode() * 10)
    (root / "training").mkdir()
    (root / "training" / "train_step.onnx").write_bytes(b"step")
    write_manifest(root, BundleManifest.from_dict(MANIFEST_DICT), SIGNER)
    verify_bundle(root, VERIFIER)
    return root


@st.composite
def files_mutated(draw: st.DrawFn) -> dict[str, Any]:
    keys = st.sampled_from(["model.onnx", "selector.onnx", "training/train_step.onnx", "../etc/passwd", "/abs",
                            "a/../model.onnx", "./model.onnx", "model.onnx/", "training", "x\x00y", ""]) \
        | st.text(max_size=12)
    return draw(st.dictionaries(keys, st.text(max_size=64) | JSON, max_size=5))


@settings(FUZZ, max_examples=60)
@given(files_mutated(), st.sampled_from(["files", "selector", "variants", "training", "signature"]), JSON)
def test_verify_bundle_with_hostile_manifest_fields(bundle_dir: Path, files: dict[str, Any], key: str,
                                                   value: Any) -> None:
    data = json.loads((bundle_dir / MANIFEST).read_text())
    original = (bundle_dir / MANIFEST).read_bytes()
    data[key] = files if key == "files" else value
    try:
        (bundle_dir / MANIFEST).write_text(json.dumps(data))
        refuses_or_decodes(verify_bundle, bundle_dir, VERIFIER)
        refuses_or_decodes(verify_bundle, bundle_dir)
    finally:
        (bundle_dir / MANIFEST).write_bytes(original)


def _tar(entries: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            info.linkname = "../../x" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


ARCHIVES = [_tar([("manifest.json", tarfile.REGTYPE, b"{}"), ("model.onnx", tarfile.REGTYPE, b"x" * 100)])]
TAR_ENTRIES = st.lists(st.tuples(
    st.sampled_from(["manifest.json", "model.onnx", "../up", "/abs", "a/b", "a", "", "a/../../b"])
    | st.text(max_size=8),
    st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                     tarfile.FIFOTYPE, tarfile.CHRTYPE]),
    st.binary(max_size=32)), max_size=5)


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=256) | mutated(ARCHIVES) | TAR_ENTRIES.map(_tar), st.integers(0, 10**6))
def test_untar_bundle_of_arbitrary_and_hostile_archives(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                                        seq: int) -> None:
    target = tmp_path_factory.mktemp("untar") / "t"
    refuses_or_decodes(untar_bundle, data, target, max_bytes=10_000)
    if target.exists():  # whatever was written stays inside the target, regular files only
        for p in target.rglob("*"):
            assert p.resolve().is_relative_to(target.resolve()) and not p.is_symlink()


# --- strict JSON, ids, topics, URLs -----------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode())
       | st.text(alphabet="[]{}\"\\,:0123456789.eE+-natrufl ", max_size=200).map(str.encode))
def test_strict_json_raises_value_errors_only(raw: bytes) -> None:
    value = refuses_or_decodes(jsonsafe.loads, raw, family=(ValueError,))
    if value is not None:
        json.dumps(value, allow_nan=False)


@FUZZ
@given(st.text(max_size=80) | JSON)
def test_id_grammars(value: Any) -> None:
    refuses_or_decodes(check_delta_id, value)
    for fn in (parts.check_part_id, parts.parse_module_id, parts.parse_gate_id, parts.part_of):
        if isinstance(value, str) or fn is not parts.part_of:
            refuses_or_decodes(fn, value)
    if isinstance(value, str):
        refuses_or_decodes(topics.device_of, value)
        refuses_or_decodes(topics.delta, value)
        refuses_or_decodes(BrokerUrl.parse, value)
        refuses_or_decodes(BrokerUrl.parse, "mqtt://" + value)


@FUZZ
@given(JSON, st.binary(max_size=64))
def test_signature_checks_of_arbitrary_signature_objects(signature: Any, data: bytes) -> None:
    refuses_or_decodes(VERIFIER.verify, data, signature, "the message")


# --- what the fuzzing found, kept as explicit examples ----------------------------------------------


@pytest.mark.parametrize("url", ["mqtt://[", "mqtt://]", "mqtt://[::1", "["])
def test_a_broker_url_with_an_unclosed_ipv6_bracket_is_a_config_error(url: str) -> None:
    from eclm.errors import ConfigError

    with pytest.raises(ConfigError, match="broker URL"):
        BrokerUrl.parse(url)


@pytest.mark.parametrize("shape", [[2**31], [2**16, 2**16], [-4, -1], [3, -4]])
def test_a_top_k_payload_cannot_declare_a_huge_or_negative_shape(shape: list[int]) -> None:
    from eclm.errors import DataError

    body, header = compress.encode({"w": np.ones(8, np.float32)}, compress.Codec.parse("fp32+top0.5+zlib"))
    header["shapes"]["w"] = shape  # before: expanded to np.zeros(prod(shape)), 8 GiB for [2**31]
    with pytest.raises(DataError, match="declares shapes"):
        compress.decode(body, header)

"""Wire messages of ECLM, one typed dataclass each, and their single codec.

Envelope: ``ECLMW1`` + u32 header length + JSON header + body. The header names the message type
and schema version and holds its plain fields; tensors (and archives) travel in the body through
:mod:`eclm.compress` (safetensors, never pickle). Update messages carry an Ed25519 signature over
the header (without the signature) and the body; acks carry one too when the cloud has a key (a
device with a trust key accepts only signed acks). Payloads over a size limit are sent as chunks
and reassembled with bounded memory (:mod:`eclm.reassembly`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from eclm import compress
from eclm.errors import DataError
from eclm.hashing import canonical_json
from eclm.ids import check_delta_id, check_environment
from eclm.reassembly import ChunkRefused, Reassembler
from eclm.signing import Signer, Verifier

__all__ = ["ChunkRefused", "Reassembler"]  # re-exported: chunking and reassembly belong together

MAGIC = b"ECLMW1"
SCHEMA_VERSION = 1
MAX_HEADER = 4 * 2**20


@dataclass
class ProfileMessage:
    """Device -> cloud: where the device's data routes (importance per module) and its resources."""

    TYPE: ClassVar[str] = "profile"
    device_id: str
    bank_id: str
    bundle: str
    importance: list[list[float]]
    sample_count: int
    profile_name: str = ""
    modules: dict[str, int] = field(default_factory=dict)
    trainable: bool = True
    want_bundle: bool = False
    measured: bool = False  # importance measured on local samples (else: the bundle's own)
    derived_for: list[list[float]] | None = None  # the importance the serving bundle was derived for
    resources: dict[str, float] = field(default_factory=dict)
    environment: str = ""  # where the device works now ("": the shared line; eclm.ids)
    line: str = ""  # the environment whose line ``modules``' versions come from
    created: float = field(default_factory=time.time)


@dataclass
class DeltaMessage:
    """Device -> cloud: what one training run changed, per module, against the named base versions."""

    TYPE: ClassVar[str] = "delta"
    delta_id: str
    device_id: str
    bank_id: str
    bundle: str
    base_versions: dict[str, int]
    parts: dict[str, list[str]]
    tensors: dict[str, np.ndarray]
    sample_count: int
    importance: list[list[float]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    accepted_locally: bool = True
    environment: str = ""  # the environment the training samples came from: the line this delta merges into
    base_environment: str = ""  # the environment whose line ``base_versions`` count in
    created: float = field(default_factory=time.time)


@dataclass
class AckMessage:
    """Cloud -> device: the delta is stored (or a duplicate, or rejected with the reason).

    It names exactly one delta (the delta id grammar of :mod:`eclm.ids`, checked on decode) and the
    device it is for, and is signed by the cloud's key when the cloud has one.
    """

    TYPE: ClassVar[str] = "ack"
    delta_id: str
    status: str  # "stored", "duplicate", "rejected"
    reason: str = ""
    device_id: str = ""
    created: float = field(default_factory=time.time)

    STATUSES: ClassVar[tuple[str, ...]] = ("stored", "duplicate", "rejected")


@dataclass
class ModuleUpdateMessage:
    """Cloud -> device: new versions of modules (full parameters), signed."""

    TYPE: ClassVar[str] = "module_update"
    update_id: str
    bank_id: str
    versions: dict[str, int]
    parts: dict[str, list[str]]
    tensors: dict[str, np.ndarray]
    device_id: str = ""  # the device it is addressed to; a device refuses updates for another
    environment: str = ""  # the environment line these versions belong to; a device in another refuses them
    created: float = field(default_factory=time.time)


@dataclass
class BundleUpdateMessage:
    """Cloud -> device: a whole re-derived bundle as a tar archive, signed."""

    TYPE: ClassVar[str] = "bundle_update"
    update_id: str
    bank_id: str
    digest: str
    archive: bytes
    reason: str = ""
    created: float = field(default_factory=time.time)


@dataclass
class StatusMessage:
    """Device -> cloud: online or offline (the offline one is the device's MQTT last will)."""

    TYPE: ClassVar[str] = "status"
    device_id: str
    online: bool
    bundle: str = ""
    generation: int = 0
    event: str = ""  # e.g. "rollback", "variant", "drift"
    detail: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


@dataclass
class RequestMessage:
    """Cloud -> device: ask for something, e.g. ``profile``."""

    TYPE: ClassVar[str] = "request"
    kind: str
    created: float = field(default_factory=time.time)


@dataclass
class ChunkMessage:
    """One piece of an oversized payload; reassembled by ``message_id``."""

    TYPE: ClassVar[str] = "chunk"
    message_id: str
    index: int
    total: int
    sha256: str
    data: bytes


Message = (ProfileMessage | DeltaMessage | AckMessage | ModuleUpdateMessage | BundleUpdateMessage
           | StatusMessage | RequestMessage | ChunkMessage)
TYPES: dict[str, Any] = {c.TYPE: c for c in (ProfileMessage, DeltaMessage, AckMessage, ModuleUpdateMessage,
                                              BundleUpdateMessage, StatusMessage, RequestMessage, ChunkMessage)}
SIGNED = (ModuleUpdateMessage, BundleUpdateMessage)  # must be signed
SIGNABLE = (*SIGNED, AckMessage)  # signed when a signer is given; verified whenever a verifier is given
_BYTES_FIELDS = {"archive", "data"}


def _split_fields(msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, bytes | None]:
    fields: dict[str, Any] = {}
    tensors = None
    blob = None
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name == "tensors":
            tensors = value
        elif f.name in _BYTES_FIELDS:
            blob = bytes(value)
        else:
            fields[f.name] = value
    return fields, tensors, blob


def encode_tensors(tensors: dict[str, np.ndarray], codec: str = "fp32+zlib") -> tuple[bytes, dict[str, Any]]:
    """A message body of ``tensors`` and its header entries, for :func:`encode` to reuse across messages."""
    return compress.encode(tensors, compress.Codec.parse(codec))


def encode(msg: Message, codec: str = "fp32+zlib", signer: Signer | None = None,
           body_of_tensors: tuple[bytes, dict[str, Any]] | None = None) -> bytes:
    """Serialise a message; update messages must be given a signer.

    ``body_of_tensors`` is :func:`encode_tensors` of the message's own tensors, made once when the same
    tensors go to many devices (a round's module updates); it is not checked against them.
    """
    fields, tensors, blob = _split_fields(msg)
    header: dict[str, Any] = {"type": msg.TYPE, "schema_version": SCHEMA_VERSION, "fields": fields}
    body = b""
    if tensors is not None:
        body, header["tensors"] = body_of_tensors or compress.encode(tensors, compress.Codec.parse(codec))
    elif blob is not None:
        body = blob
    if isinstance(msg, SIGNED) and signer is None:
        raise DataError(f"{msg.TYPE} messages must be signed", hint="pass the cloud's signer")
    if isinstance(msg, SIGNABLE) and signer is not None:
        header["signature"] = signer.sign(_signed_bytes(header, body))
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + body


def _signed_bytes(header: dict[str, Any], body: bytes) -> bytes:
    h = {k: v for k, v in header.items() if k != "signature"}
    return hashlib.sha256(canonical_json(h)).digest() + hashlib.sha256(body).digest()


def decode(data: bytes, verifier: Verifier | None = None, max_bytes: int | None = None) -> Message:
    """Parse and check a message; anything malformed raises :class:`DataError` (signatures: BundleError)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}",
                        hint="send it in chunks (eclm.wire.chunk) or raise the limit")
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise DataError("not an ECLM wire message (bad magic)", hint="send messages made by eclm.wire.encode")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(data):
        raise DataError("truncated or oversized message header", hint="resend the message")
    try:
        header = json.loads(data[start : start + n])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"message header is not JSON: {exc}", hint="resend the message") from exc
    body = data[start + n :]
    if not isinstance(header, dict):
        raise DataError("message header is not an object", hint="resend the message")
    cls = TYPES.get(str(header.get("type")))
    if cls is None:
        raise DataError(f"unknown message type {header.get('type')!r}", hint=f"known: {sorted(TYPES)}")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{cls.TYPE} message has schema version {header.get('schema_version')!r}; this side reads "
            f"{SCHEMA_VERSION}", hint="upgrade the older side so both speak the same schema version")
    if cls in SIGNABLE and verifier is not None:
        verifier.verify(_signed_bytes(header, body), header.get("signature"), f"{cls.TYPE} message")
    fields = header.get("fields")
    if not isinstance(fields, dict):
        raise DataError("message has no fields object", hint="resend the message")
    names = {f.name for f in dataclasses.fields(cls)}
    if "tensors" in names:
        if "tensors" not in header:
            raise DataError(f"{cls.TYPE} message lacks its tensors", hint="resend the message")
        fields = {**fields, "tensors": compress.decode(body, header["tensors"])}
    for blob_name in _BYTES_FIELDS & names:
        fields = {**fields, blob_name: body}
    unknown = set(fields) - names
    try:
        msg: Message = cls(**{k: v for k, v in fields.items() if k in names})
    except TypeError as exc:
        raise DataError(f"{cls.TYPE} message fields are wrong: {exc}", hint="resend the message") from exc
    _check_types(msg)
    for name in ("environment", "base_environment", "line"):
        if name in names:
            check_environment(getattr(msg, name))
    if isinstance(msg, AckMessage):
        check_delta_id(msg.delta_id)
        if msg.status not in AckMessage.STATUSES:
            raise DataError(f"ack status {msg.status[:40]!r} is not one of {list(AckMessage.STATUSES)}",
                            hint="resend the message")
    if unknown:
        raise DataError(f"{cls.TYPE} message has unknown fields {sorted(unknown)}", hint="check schema versions")
    return msg


def _check_types(msg: Any) -> None:
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        t = str(f.type)
        ok = True
        if t == "str":
            ok = isinstance(v, str)
        elif t == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif t == "float":
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        elif t == "bool":
            ok = isinstance(v, bool)
        elif t.startswith("dict"):
            ok = isinstance(v, dict)
        elif t.startswith("list[list[float]]"):
            ok = (v is None and "None" in t) or (
                isinstance(v, list) and all(isinstance(r, list) and all(
                    isinstance(x, int | float) and not isinstance(x, bool) for x in r) for r in v))
        if not ok:
            raise DataError(f"{type(msg).TYPE} field {f.name} has type {type(v).__name__}, expected {t}",
                            hint="resend the message with the right types")


def chunk(data: bytes, limit: int) -> list[bytes]:
    """The payload itself if it fits in ``limit`` bytes, else chunk messages that each fit."""
    if len(data) <= limit:
        return [data]
    piece = max(1, limit - 512)  # room for the chunk's own header
    total = (len(data) + piece - 1) // piece
    mid = uuid.uuid4().hex
    digest = hashlib.sha256(data).hexdigest()
    return [encode(ChunkMessage(mid, i, total, digest, data[i * piece : (i + 1) * piece])) for i in range(total)]

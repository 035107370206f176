"""Fuzzed MQTT messages for the attack suite: a pure generator of ``(kind, topic, payload)`` from a seeded rng.

Every topic under ``eclm/v1/``: the device -> cloud topics the daemon reads (delta, profile, status),
the cloud -> device topics an edge reads (ack, update, request), and malformed topics. Payloads mix
random bytes, random headers behind the right magic, valid messages mutated (bit flips, truncation,
extension, splices, header fields replaced by values of the wrong type or range), oversize
messages, and chunked messages (complete, incomplete, corrupted, out of range). The hostile pills of
:mod:`bench.pills` are fired too. Nothing here touches the network.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench import pills as pillbox
from eclm import topics, wire

Fuzzed = tuple[str, str, bytes]  # kind of fuzz, topic, payload
DEVICE_KINDS = ("delta", "profile", "status")  # the daemon reads these
CLOUD_KINDS = ("ack", "update", "request")  # an edge reads these
ODD_VALUES: tuple[Any, ...] = (None, -1, 0, 2**63, 10**400 // 10**380, 1e308, -1e308, "", "x" * 5000, [], {},
                               [[1e308]], {"a": {"b": [None]}}, True, "NaN", "../../etc/passwd", "*", "\u0000")


@dataclass
class FuzzContext:
    """What the fuzzer knows: the bank id, a module's shapes, honest device ids (their topics are fuzzed too)."""

    bank_id: str
    module: str
    shapes: dict[str, tuple[int, ...]]
    honest: list[str]
    importance: list[list[float]]
    max_payload: int = 4 * 2**20
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    templates: list[bytes] = field(default_factory=list)
    pills: pillbox.PillContext | None = None

    def __post_init__(self) -> None:
        if not self.templates:
            self.templates = self._templates()
        if self.pills is None:
            self.pills = pillbox.PillContext(self.bank_id, self.module, self.shapes, {self.module: 1},
                                             self.honest, rng=self.rng, importance=self.importance)

    def _templates(self) -> list[bytes]:
        """One valid encoded message of each type (updates signed by nobody: an attacker has no key)."""
        dev = "fuzz-template"
        small = {k: self.rng.normal(0, 1e-3, s).astype(np.float32) for k, s in self.shapes.items()}
        msgs: list[Any] = [
            wire.DeltaMessage(uuid.uuid4().hex, dev, self.bank_id, "fuzz", {self.module: 1},
                              {self.module: sorted(small)}, small, 10, importance=self.importance),
            wire.ProfileMessage(dev, self.bank_id, "fuzz", self.importance, 10, "pi4", {self.module: 1}),
            wire.StatusMessage(dev, True, event="drift"),
            wire.AckMessage(uuid.uuid4().hex, "stored", "", device_id=dev),
            wire.RequestMessage("profile"),
            wire.ChunkMessage(uuid.uuid4().hex, 0, 2, "0" * 64, b"x" * 100),
        ]
        out = [wire.encode(m) for m in msgs]
        out.append(wire.encode(msgs[0], codec="int8+top0.1+lzma"))
        return out


def _device_id(ctx: FuzzContext) -> str:
    r = ctx.rng.random()
    if r < 0.35:
        return ctx.honest[int(ctx.rng.integers(len(ctx.honest)))]
    if r < 0.75:
        return f"fuzz-{int(ctx.rng.integers(50))}"
    if r < 0.85:
        return "f" * int(ctx.rng.integers(129, 300))  # longer than the grammar allows
    if r < 0.95:  # any characters a topic may carry; C0/C1 controls make mosquitto drop the publisher instead
        chars = [int(c) for c in ctx.rng.integers(0x21, 0x2FFF, size=int(ctx.rng.integers(1, 20)))]
        return "".join(chr(c) for c in chars if not 0x7F <= c <= 0x9F and chr(c) not in "/+#") or "x"
    return ""


def topic(ctx: FuzzContext) -> str:
    """A topic under ``eclm/v1/``: mostly device topics of every kind, some malformed ones."""
    r = ctx.rng.random()
    if r < 0.9:
        kinds = DEVICE_KINDS if ctx.rng.random() < 0.7 else CLOUD_KINDS
        return pillbox.device_topic(_device_id(ctx), kinds[int(ctx.rng.integers(len(kinds)))])
    odd = (f"{topics.PREFIX}/devices/x", f"{topics.PREFIX}/devices/x/delta/extra", f"{topics.PREFIX}/other",
           f"{topics.PREFIX}/devices//delta", f"{topics.PREFIX}/devices/fuzz-1/unknown-kind", f"{topics.PREFIX}/")
    return odd[int(ctx.rng.integers(len(odd)))]


def _bytes(ctx: FuzzContext, hi: int = 2048) -> bytes:
    return ctx.rng.bytes(int(ctx.rng.integers(0, hi)))


def random_bytes(ctx: FuzzContext) -> bytes:
    """Random bytes (mostly short)."""
    return _bytes(ctx, 4096 if ctx.rng.random() < 0.9 else 65_536)


def random_header(ctx: FuzzContext) -> bytes:
    """The right magic, then a random header length and random or half-JSON header bytes."""
    header = ctx.rng.bytes(int(ctx.rng.integers(0, 300)))
    if ctx.rng.random() < 0.5:
        header = json.dumps({"type": str(ctx.rng.choice(["delta", "profile", "status", "chunk", "ack", "x"])),
                             "schema_version": int(ctx.rng.integers(0, 3)),
                             "fields": ODD_VALUES[int(ctx.rng.integers(len(ODD_VALUES)))]},
                            default=str).encode()
    declared = len(header) if ctx.rng.random() < 0.7 else int(ctx.rng.integers(0, 2**32))
    return wire.MAGIC + struct.pack("<I", declared) + header + _bytes(ctx, 512)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", data[len(wire.MAGIC) : len(wire.MAGIC) + 4])
    start = len(wire.MAGIC) + 4
    return json.loads(data[start : start + n]), data[start + n :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, default=str).encode()
    return wire.MAGIC + struct.pack("<I", len(raw)) + raw + body


def mutate_bytes(ctx: FuzzContext) -> bytes:
    """A valid message with a few bytes flipped, cut short, extended, or spliced with another."""
    data = bytearray(ctx.templates[int(ctx.rng.integers(len(ctx.templates)))])
    op = int(ctx.rng.integers(4))
    if op == 0:
        for pos in ctx.rng.integers(0, len(data), size=int(ctx.rng.integers(1, 9))):
            data[int(pos)] ^= 1 << int(ctx.rng.integers(8))
    elif op == 1:
        data = data[: int(ctx.rng.integers(0, len(data)))]
    elif op == 2:
        data += _bytes(ctx, 4096)
    else:
        other = ctx.templates[int(ctx.rng.integers(len(ctx.templates)))]
        cut = int(ctx.rng.integers(0, min(len(data), len(other))))
        data = data[:cut] + other[cut:]
    return bytes(data)


def mutate_fields(ctx: FuzzContext) -> bytes:
    """A valid message whose header has a field (or the tensor spec) replaced by an odd value."""
    header, body = _split(ctx.templates[int(ctx.rng.integers(len(ctx.templates)))])
    odd = ODD_VALUES[int(ctx.rng.integers(len(ODD_VALUES)))]
    where = int(ctx.rng.integers(3))
    fields = header.get("fields", {})
    if where == 0 and fields:
        fields[sorted(fields)[int(ctx.rng.integers(len(fields)))]] = odd
    elif where == 1 and "tensors" in header:
        spec = header["tensors"]
        key = sorted(spec)[int(ctx.rng.integers(len(spec)))] if isinstance(spec, dict) and spec else None
        if key is not None:
            spec[key] = odd
        else:
            header["tensors"] = odd
    else:
        header[str(ctx.rng.choice(["type", "schema_version", "fields", "signature", "tensors"]))] = odd
    return _join(header, body)


def oversize(ctx: FuzzContext) -> bytes:
    """More bytes than the daemon accepts in one message."""
    return wire.MAGIC + ctx.rng.bytes(ctx.max_payload + int(ctx.rng.integers(1, 4096)))


def chunked(ctx: FuzzContext) -> list[bytes]:
    """A valid message in chunks: all of them, some, shuffled, one corrupted, or a declared count out of range."""
    data = ctx.templates[int(ctx.rng.integers(len(ctx.templates)))] + _bytes(ctx, 8192)
    pieces = wire.chunk(data, max(600, len(data) // int(ctx.rng.integers(2, 6))))
    op = int(ctx.rng.integers(4))
    if op == 1:
        pieces = pieces[: max(1, len(pieces) - 1)]
    elif op == 2:
        pieces = [pieces[int(i)] for i in ctx.rng.permutation(len(pieces))]
        pieces[0] = pieces[0][:-3] + b"zzz"
    elif op == 3:
        pieces = [wire.encode(wire.ChunkMessage(uuid.uuid4().hex, int(ctx.rng.integers(-5, 10**9)),
                                                int(ctx.rng.integers(-5, 10**9)), "ab" * 32, _bytes(ctx, 2048)))]
    return pieces


def pill(ctx: FuzzContext) -> list[pillbox.Publication]:
    """One firing of a hostile message of :mod:`bench.pills` (not the bulky chunk floods)."""
    light = [p for p in pillbox.PILLS if not p.name.startswith("chunk_flood") and p.name != "export_race"]
    assert ctx.pills is not None
    return pillbox.build(light[int(ctx.rng.integers(len(light)))], ctx.pills)


SINGLE: dict[str, tuple[float, Callable[[FuzzContext], bytes]]] = {
    "random_bytes": (0.25, random_bytes),
    "random_header": (0.15, random_header),
    "mutate_bytes": (0.25, mutate_bytes),
    "mutate_fields": (0.2, mutate_fields),
    "oversize": (0.0005, oversize),
}
MULTI: dict[str, float] = {"chunked": 0.1, "pill": 0.0495}
KINDS = (*SINGLE, *MULTI)


def next_messages(ctx: FuzzContext) -> list[Fuzzed]:
    """One draw: usually one message, several for chunked messages and some pills."""
    names = list(KINDS)
    weights = np.array([SINGLE[n][0] if n in SINGLE else MULTI[n] for n in names])
    kind = names[int(ctx.rng.choice(len(names), p=weights / weights.sum()))]
    if kind in SINGLE:
        return [(kind, topic(ctx), SINGLE[kind][1](ctx))]
    if kind == "chunked":
        t = topic(ctx)
        return [(kind, t, p) for p in chunked(ctx)]
    return [(kind, t, p) for t, p in pill(ctx)]

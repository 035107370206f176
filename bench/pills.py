"""Hostile messages for the soak benchmark, each a pure function from the run's context to publications.

Every pill is one finding of an attack on a daemon and edges over a broker without credentials: a
small message that once stopped the merger, lost a delta, disabled an edge or grew memory without
bound. The soak (``bench/soak.py``) sends them, plus random garbage, while honest devices train.
Nothing here touches the network: :func:`build` returns ``(topic, payload)`` pairs, so a test can
check that every pill builds, and a change of the wire messages is adapted here only.

Device ids that :mod:`eclm.topics` would refuse are put into topics by hand (:func:`device_topic`):
an attacker does not ask our topic helpers for permission.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from eclm import topics, wire

Publication = tuple[str, bytes]


@dataclass
class PillContext:
    """What an attacker on the broker knows: the bank id, one module's parameter shapes, the current
    module versions (readable from any device's update topic), and the honest devices' ids.
    """

    bank_id: str
    module: str  # a module every bundle holds (``head``)
    shapes: dict[str, tuple[int, ...]]  # its float parameters
    versions: dict[str, int]  # updated by the soak from the module updates it overhears
    honest: list[str]  # honest device ids: [0] gets forged "*" acks, [1] pattern acks, [-1] a chunk flood
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    export_profile: str = "pi-zero-2w"  # a real profile without on-device training
    importance: list[list[float]] = field(default_factory=lambda: [[1.0]])  # of the bank's shape, so exports run
    sent: dict[str, int] = field(default_factory=dict)  # per pill, how many times it was built


def device_topic(device_id: str, kind: str) -> str:
    """A device topic for any id, even one :mod:`eclm.topics` refuses."""
    return f"{topics.PREFIX}/devices/{device_id}/{kind}"


def _delta(ctx: PillContext, device: str, tensors: dict[str, np.ndarray], sample_count: int) -> bytes:
    base = ctx.versions.get(ctx.module, 1)
    msg = wire.DeltaMessage(delta_id=uuid.uuid4().hex, device_id=device, bank_id=ctx.bank_id, bundle="soak",
                            base_versions={ctx.module: base}, parts={ctx.module: sorted(tensors)},
                            tensors=tensors, sample_count=sample_count)
    return wire.encode(msg, codec="fp32+zlib")


def _small(ctx: PillContext) -> dict[str, np.ndarray]:
    return {k: (ctx.rng.normal(0, 1e-3, s)).astype(np.float32) for k, s in ctx.shapes.items()}


def _profile(device: str, ctx: PillContext, profile_name: str, want_bundle: bool) -> bytes:
    msg = wire.ProfileMessage(device_id=device, bank_id=ctx.bank_id, bundle="soak", importance=ctx.importance,
                              sample_count=10, profile_name=profile_name, modules={ctx.module: 1},
                              trainable=False, want_bundle=want_bundle)
    return wire.encode(msg)


def overflow(ctx: PillContext, n: int) -> list[Publication]:
    """A valid delta whose sample count overflows a float (10**400)."""
    dev = f"soak-overflow-{n}"
    return [(device_topic(dev, "delta"), _delta(ctx, dev, _small(ctx), 10**400))]


def profile_unknown_board(ctx: PillContext, n: int) -> list[Publication]:
    """A non-trainable device of a profile that does not exist, holding the module, asking for a bundle."""
    dev = f"soak-noboard-{n}"
    return [(device_topic(dev, "profile"), _profile(dev, ctx, "no-such-board", True))]


def long_device_id(ctx: PillContext, n: int) -> list[Publication]:
    """The same from a 200-character device id (longer than a topic may carry), with a real profile."""
    dev = (f"soak-long-{n}-" + "x" * 200)[:200]
    return [(device_topic(dev, "profile"), _profile(dev, ctx, ctx.export_profile, True))]


def export_race(ctx: PillContext, n: int) -> list[Publication]:
    """A non-trainable device that asks for a bundle again and again (exports must not overlap)."""
    dev = "soak-nontrainable"
    return [(device_topic(dev, "profile"), _profile(dev, ctx, ctx.export_profile, True))]


def forged_ack_wildcard(ctx: PillContext, n: int) -> list[Publication]:
    """An unsigned ack for delta id "*" on an honest device's ack topic (must not empty its outbox)."""
    return [(device_topic(ctx.honest[0], "ack"), wire.encode(wire.AckMessage("*", "rejected", "soak")))]


def ack_pattern(ctx: PillContext, n: int) -> list[Publication]:
    """An ack for delta id "x**" (a glob pattern that is not even valid) on an honest device's ack topic."""
    dev = ctx.honest[1 % len(ctx.honest)]
    return [(device_topic(dev, "ack"), wire.encode(wire.AckMessage("x**", "rejected", "soak")))]


def _chunks(ctx: PillContext, count: int, size: int, message_id: str) -> list[bytes]:
    digest = hashlib.sha256(message_id.encode()).hexdigest()  # never matches: the message never completes
    data = ctx.rng.bytes(size)
    return [wire.encode(wire.ChunkMessage(message_id, int(i), 100_000, digest, data))
            for i in ctx.rng.choice(100_000, size=count, replace=False)]


DAEMON_CHUNK = (4, 3_900_000)  # per firing: pieces and bytes (under the daemon's 4 MiB payload limit)
EDGE_CHUNK = (20, 500_000)  # under the edge's 512 KiB limit for one incoming message


def chunk_flood_daemon(ctx: PillContext, n: int) -> list[Publication]:
    """Pieces of one never-completed message on a fake device's delta topic (reassembly must be capped)."""
    count, size = DAEMON_CHUNK
    return [(device_topic("soak-flood", "delta"), c) for c in _chunks(ctx, count, size, "soak-flood-daemon")]


def chunk_flood_edge(ctx: PillContext, n: int) -> list[Publication]:
    """The same on an honest device's update topic."""
    count, size = EDGE_CHUNK
    return [(device_topic(ctx.honest[-1], "update"), c) for c in _chunks(ctx, count, size, "soak-flood-edge")]


def status_events(ctx: PillContext, n: int) -> list[Publication]:
    """Status messages with distinct, long event names (every label set must be bounded); 10 a firing."""
    dev = "soak-events"
    out = []
    for k in range(10):
        event = f"soak-{n}-{k}-" + "e" * 64_000
        out.append((device_topic(dev, "status"), wire.encode(wire.StatusMessage(dev, True, event=event))))
    return out


def zero_deltas(ctx: PillContext, n: int) -> list[Publication]:
    """All-zero deltas from fake device ids to which no bundle was ever issued (must not bump versions)."""
    out = []
    for k in range(2):
        dev = f"soak-zero-{n}-{k}"
        zeros = {name: np.zeros(s, np.float32) for name, s in ctx.shapes.items()}
        out.append((device_topic(dev, "delta"), _delta(ctx, dev, zeros, 100)))
    return out


KINDS = ("delta", "profile", "status", "ack", "update", "request")


def garbage(ctx: PillContext, n: int) -> list[Publication]:
    """Random bytes, and random headers behind the right magic, on random device topics."""
    out = []
    devices = [*ctx.honest, "soak-garbage", "soak-nontrainable"]
    for _ in range(8):
        dev = devices[int(ctx.rng.integers(len(devices)))]
        kind = KINDS[int(ctx.rng.integers(len(KINDS)))]
        body = ctx.rng.bytes(int(ctx.rng.integers(0, 65_536)))
        if ctx.rng.random() < 0.5:
            header = ctx.rng.bytes(int(ctx.rng.integers(1, 256)))
            body = wire.MAGIC + len(header).to_bytes(4, "little") + header + body
        out.append((device_topic(dev, kind), body))
    return out


@dataclass(frozen=True)
class Pill:
    """A name, how often it is sent during the soak (seconds), and how to build one firing."""

    name: str
    every: float
    build: Callable[[PillContext, int], list[Publication]]

    @property
    def doc(self) -> str:
        return (self.build.__doc__ or "").strip()


PILLS: tuple[Pill, ...] = (
    Pill("overflow", 10.0, overflow),
    Pill("profile_unknown_board", 10.0, profile_unknown_board),
    Pill("long_device_id", 10.0, long_device_id),
    Pill("export_race", 1.0, export_race),
    Pill("forged_ack_wildcard", 0.5, forged_ack_wildcard),
    Pill("ack_pattern", 5.0, ack_pattern),
    Pill("chunk_flood_daemon", 2.0, chunk_flood_daemon),
    Pill("chunk_flood_edge", 2.0, chunk_flood_edge),
    Pill("status_events", 1.0, status_events),
    Pill("zero_deltas", 1.0, zero_deltas),
    Pill("garbage", 0.5, garbage),
)
BY_NAME = {p.name: p for p in PILLS}


def select(names: str) -> list[Pill]:
    """Pills by comma-separated names; "all" for every one, "none" for an honest-only run."""
    from eclm.errors import ConfigError

    if names.strip() == "all":
        return list(PILLS)
    if names.strip() == "none":
        return []
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"unknown pill(s) {', '.join(unknown)}",
                          hint=f"use all, none, or some of {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in chosen]


def build(pill: Pill, ctx: PillContext) -> list[Publication]:
    """One firing of ``pill``; counts it in ``ctx.sent``."""
    n = ctx.sent.get(pill.name, 0)
    ctx.sent[pill.name] = n + 1
    return pill.build(ctx, n)

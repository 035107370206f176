"""The soak benchmark's pills build, and each is the hostile message it claims to be (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import pills
from eclm import wire
from eclm.errors import ConfigError, DataError


def _ctx() -> pills.PillContext:
    return pills.PillContext("bank-x", "head", {"head.weight": (10, 8), "head.bias": (10,)}, {"head": 3},
                             ["honest-0", "honest-1", "honest-2"], np.random.default_rng(1),
                             importance=[[0.5, 0.5], [1.0, 0.0]])


def _decoded(pubs: list[pills.Publication]) -> list[wire.Message]:
    return [wire.decode(payload) for _, payload in pubs]


def _fields(payload: bytes) -> dict[str, object]:
    """The header fields as sent, unchecked (a decoder may rightly refuse what a pill carries)."""
    n = int.from_bytes(payload[len(wire.MAGIC) : len(wire.MAGIC) + 4], "little")
    header = json.loads(payload[len(wire.MAGIC) + 4 : len(wire.MAGIC) + 4 + n])
    return dict(header["fields"], type=header["type"])


def test_every_pill_builds_messages_on_device_topics() -> None:
    ctx = _ctx()
    for pill in pills.PILLS:
        pubs = pills.build(pill, ctx)
        assert pubs, pill.name
        assert all(t.startswith("eclm/v1/devices/") and t.count("/") == 4 for t, _ in pubs), pill.name
        assert pill.doc and pill.every > 0
    assert ctx.sent == {p.name: 1 for p in pills.PILLS}


def test_the_pills_are_what_they_say() -> None:
    ctx = _ctx()
    build = {p.name: (lambda p=p: pills.build(p, ctx)) for p in pills.PILLS}
    (over,) = _decoded(build["overflow"]())
    assert isinstance(over, wire.DeltaMessage) and over.sample_count == 10**400
    assert over.base_versions == {"head": 3} and set(over.tensors) == {"head.weight", "head.bias"}
    (board,) = _decoded(build["profile_unknown_board"]())
    assert isinstance(board, wire.ProfileMessage)
    assert (board.profile_name, board.trainable, board.modules, board.want_bundle) == ("no-such-board", False,
                                                                                       {"head": 1}, True)
    assert board.importance == ctx.importance
    ((topic, payload),) = build["long_device_id"]()
    long_id = topic.split("/")[3]
    assert len(long_id) == 200 and wire.decode(payload).device_id == long_id  # type: ignore[union-attr]
    (race,) = _decoded(build["export_race"]())
    assert isinstance(race, wire.ProfileMessage) and race.want_bundle and not race.trainable
    ((star_topic, star),) = build["forged_ack_wildcard"]()
    assert star_topic.endswith("/honest-0/ack") and _fields(star)["delta_id"] == "*"
    assert _fields(star)["type"] == "ack"
    ((pat_topic, pat),) = build["ack_pattern"]()
    assert pat_topic.endswith("/honest-1/ack") and _fields(pat)["delta_id"] == "x**"
    flood = _decoded(build["chunk_flood_daemon"]())
    assert all(isinstance(c, wire.ChunkMessage) and c.total == 100_000 for c in flood)
    assert len({c.message_id for c in flood}) == 1 and len({c.index for c in flood}) == len(flood)  # type: ignore[union-attr]
    assert all(t.endswith("/honest-2/update") for t, _ in build["chunk_flood_edge"]())
    events = _decoded(build["status_events"]() + build["status_events"]())
    assert len({e.event for e in events}) == len(events) == 20  # type: ignore[union-attr]
    zeros = _decoded(build["zero_deltas"]())
    assert all(isinstance(z, wire.DeltaMessage) and not any(t.any() for t in z.tensors.values()) for z in zeros)
    assert len({z.device_id for z in zeros}) == len(zeros)  # type: ignore[union-attr]
    for _, payload in build["garbage"]():
        with pytest.raises(DataError):
            wire.decode(payload)


def test_select() -> None:
    assert [p.name for p in pills.select("all")] == [p.name for p in pills.PILLS]
    assert pills.select("none") == []
    assert [p.name for p in pills.select("overflow, garbage")] == ["overflow", "garbage"]
    with pytest.raises(ConfigError, match="unknown pill"):
        pills.select("overflow,nope")

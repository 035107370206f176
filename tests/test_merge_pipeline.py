"""The merge round's pure steps (cloud_sync/pipeline.py) on plain numpy data: no bank, no ledger, no torch."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from cloud_sync.pipeline import NO_CHANGE_NORM, GateResult, aggregate, check, decide, gather, weight
from cloud_sync.strategies import Contribution
from eclm import wire
from module_bank import StoredDelta

PARAMS = {"a": {"a.w": np.zeros(3, np.float32)}, "b": {"b.w": np.ones(2, np.float32)},
          "c": {"c.w": np.zeros(2, np.float32)}}


def delta(device: str, tensors: dict[str, list[float]], samples: int = 10, base: int = 1) -> wire.DeltaMessage:
    parts: dict[str, list[str]] = {}
    for name in tensors:
        parts.setdefault(name.split(".")[0], []).append(name)
    return wire.DeltaMessage(uuid.uuid4().hex, device, "bank", "b0", {p: base for p in parts}, parts,
                             {n: np.asarray(v, np.float32) for n, v in tensors.items()}, samples)


def stored(msg: wire.DeltaMessage, done: dict[str, str] | None = None) -> StoredDelta:
    return StoredDelta(msg.delta_id, msg.device_id, wire.encode(msg), 1.0, done or {})


def contribution(delta_id: str, device: str, vec: list[float], w: float = 1.0, name: str = "a.w") -> Contribution:
    return Contribution(delta_id, {name: np.asarray(vec, np.float32)}, w, device)


# -- gather and weight ------------------------------------------------------------------------------------------

def test_gather_decodes_and_reports_the_bad_ones_without_raising() -> None:
    good = delta("d1", {"a.w": [1, 2, 3]})
    junk = StoredDelta("junk", "d3", b"\x00not a message")
    status = StoredDelta("status", "d2", wire.encode(wire.StatusMessage("d2", True)))
    out = gather([stored(good), junk, status])
    assert [d.msg.delta_id for d in out.decoded] == [good.delta_id]
    assert set(out.bad) == {"junk", "status"} and "is not a delta" in out.bad["status"]
    assert all(why.startswith("cannot be merged: ") for why in out.bad.values())


def test_weight_uses_held_importance_samples_and_staleness_and_skips_done_parts() -> None:
    fresh = delta("d1", {"a.w": [1, 1, 1], "b.w": [1, 1]}, samples=10, base=3)
    stale = delta("d2", {"a.w": [1, 1, 1]}, samples=10, base=1)
    unknown = delta("d3", {"z.w": [1.0]})
    decoded = gather([stored(fresh, done={"b": "merged"}), stored(stale), stored(unknown)]).decoded
    out = weight(decoded, set(PARAMS), {"a": 3, "b": 1}, {"d1": None, "d2": None})
    assert set(out.bad) == {unknown.delta_id} and "not in the bank" in out.bad[unknown.delta_id]
    by_id = {w.delta_id: w for w in out.waiting}
    assert set(by_id[fresh.delta_id].parts) == {"a"}  # part b was merged by an earlier round
    assert by_id[fresh.delta_id].parts["a"][0].weight == pytest.approx(10.0)
    assert by_id[stale.delta_id].parts["a"][0].weight == pytest.approx(10.0 / 3)  # two versions behind
    assert by_id[stale.delta_id].staleness == {"a": 2}


def test_weight_reports_a_forged_sample_count() -> None:
    forged = delta("d1", {"a.w": [1, 1, 1]}, samples=10**12)
    out = weight(gather([stored(forged)]).decoded, set(PARAMS), {"a": 1}, {})
    assert out.waiting == [] and "out of range" in out.bad[forged.delta_id]


# -- aggregate --------------------------------------------------------------------------------------------------

def test_aggregate_merges_per_part_caps_shares_and_finds_no_change() -> None:
    ready = {"x": {"a": [contribution("x", "A", [3, 0, 0], w=1000.0)]},
             "y": {"a": [contribution("y", "B", [1, 0, 0], w=1.0)]},
             "z": {"c": [contribution("z", "C", [0, 0], name="c.w")]}}
    out = aggregate(ready, PARAMS, "weighted", max_share=0.5, server_lr=1.0)
    # A's 1000x weight is capped at half: the plain mean of 3 and 1.
    np.testing.assert_allclose(out.updated["a"]["a.w"], [2, 0, 0])
    assert out.unchanged == ["c"] and "c" not in out.updated
    assert out.candidates == ["a"] and out.lineage == {"a": ["x", "y"], "c": ["z"]}
    np.testing.assert_array_equal(PARAMS["a"]["a.w"], [0, 0, 0])  # the input is not touched
    half = aggregate(ready, PARAMS, "weighted", max_share=0.5, server_lr=0.5)
    np.testing.assert_allclose(half.updated["a"]["a.w"], [1, 0, 0])
    assert NO_CHANGE_NORM < 1e-3


def test_aggregate_reports_what_the_robust_strategy_drops() -> None:
    ready = {d: {"a": [contribution(d, d.upper(), v)]}
             for d, v in (("p", [1.0, 0.9, 1.1]), ("q", [0.9, 1.1, 1.0]), ("x", [-10.0, -10.0, -10.0]))}
    out = aggregate(ready, PARAMS, "robust", max_share=1 / 3, server_lr=1.0)
    assert out.dropped["a"] == {"x"} and out.lineage["a"] == ["p", "q"]


# -- check (the gate) and decide -------------------------------------------------------------------------------

def scored(scores: dict[frozenset[str], float]):  # type: ignore[no-untyped-def]
    """An evaluation that scores the set of parts that differ from PARAMS."""
    def evaluate(params: dict[str, dict[str, np.ndarray]]) -> float:
        changed = frozenset(p for p, t in params.items() if any(not np.array_equal(a, PARAMS[p][n])
                                                                 for n, a in t.items()))
        return scores[changed]
    return evaluate


UPDATED = {"a": {"a.w": np.full(3, 1, np.float32)}, "b": {"b.w": np.full(2, 2, np.float32)}}


def test_check_holds_a_part_that_harms_alone() -> None:
    evaluate = scored({frozenset(): 0.90, frozenset("a"): 0.91, frozenset("b"): 0.80, frozenset("ab"): 0.85})
    gate = check(PARAMS, UPDATED, ["a", "b"], evaluate, margin=0.02, recorded_best=None)
    assert gate.kept == ["a"] and gate.before == 0.90 and gate.after == 0.91 and gate.best == 0.90
    assert gate.harms == pytest.approx({"a": -0.01, "b": 0.10})


def test_check_holds_the_worst_part_when_they_harm_together_and_uses_the_recorded_best() -> None:
    evaluate = scored({frozenset(): 0.90, frozenset("a"): 0.89, frozenset("b"): 0.885, frozenset("ab"): 0.86})
    gate = check(PARAMS, UPDATED, ["a", "b"], evaluate, margin=0.02, recorded_best=None)
    assert gate.kept == ["a"] and gate.after == 0.89
    # Against a best released of 0.93 (floor 0.91) neither part passes alone.
    assert check(PARAMS, UPDATED, ["a", "b"], evaluate, 0.02, recorded_best=0.93).kept == []


def test_check_without_an_evaluation_keeps_every_part() -> None:
    gate = check(PARAMS, UPDATED, ["a", "b"], None, margin=0.02, recorded_best=0.5)
    assert gate.kept == ["a", "b"] and gate.before != gate.before and gate.best == 0.5


def test_decide_gives_each_contribution_its_outcome_and_says_why_parts_are_held() -> None:
    ready = {"x": {"a": [contribution("x", "A", [1, 1, 1])], "b": [contribution("x", "A", [1, 1], name="b.w")]},
             "y": {"c": [contribution("y", "B", [0, 0], name="c.w")]}}
    agg = aggregate(ready, PARAMS, "weighted", max_share=1.0, server_lr=1.0)
    gate = GateResult(kept=["a"], before=0.9, after=0.92, harms={"a": -0.02, "b": 0.3}, best=0.9)
    out = decide(agg, gate, margin=0.02)
    assert out.outcomes == {"x": {"a": "merged", "b": "held"}, "y": {"c": "merged"}}  # c changed nothing
    assert out.held_parts == ["b"] and "held back ['b']" in out.reason and "b: 0.300" in out.reason
    assert out.released == 0.92 and out.dropped == []

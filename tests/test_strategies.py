"""Merge strategies: pure functions from per-module deltas to one merged delta."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cloud_sync.strategies import (
    STRATEGIES,
    Contribution,
    coordinate_median,
    robust_mean,
    trimmed_mean,
    weighted_mean,
)


def _c(delta_id: str, weight: float, **tensors: Any) -> Contribution:
    return Contribution(delta_id, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, weight)


def test_registry() -> None:
    assert STRATEGIES == {"robust": robust_mean, "weighted": weighted_mean, "trimmed": trimmed_mean,
                          "median": coordinate_median}


def test_weighted_mean_is_the_hand_computed_average() -> None:
    contribs = [_c("a", 1.0, w=[1.0, 2.0], b=[[0.0, 6.0]]),
                _c("b", 2.0, w=[3.0, 4.0], b=[[3.0, 0.0]]),
                _c("c", 3.0, w=[5.0, 6.0], b=[[-1.0, 1.0]])]
    m = weighted_mean(contribs)
    # (1*1 + 2*3 + 3*5) / 6 = 22/6 and (1*2 + 2*4 + 3*6) / 6 = 28/6
    np.testing.assert_allclose(m.tensors["w"], [22 / 6, 28 / 6], rtol=1e-6)
    # (1*0 + 2*3 + 3*-1) / 6 = 0.5 and (1*6 + 0 + 3*1) / 6 = 1.5
    np.testing.assert_allclose(m.tensors["b"], [[0.5, 1.5]], rtol=1e-6)
    assert m.tensors["b"].shape == (1, 2)
    assert all(t.dtype == np.float32 for t in m.tensors.values())
    assert m.contributors == 3 and m.total_weight == 6.0
    expected_norm = np.sqrt((22 / 6) ** 2 + (28 / 6) ** 2 + 0.5**2 + 1.5**2)
    assert m.delta_norm == pytest.approx(expected_norm, rel=1e-9)


def test_weighted_mean_scale_invariance_of_weights() -> None:
    rng = np.random.default_rng(0)
    base = [Contribution(str(i), {"w": rng.normal(size=(4, 3)).astype(np.float32)}, float(i + 1)) for i in range(4)]
    scaled = [Contribution(c.delta_id, c.tensors, c.weight * 1000) for c in base]
    np.testing.assert_allclose(weighted_mean(base).tensors["w"], weighted_mean(scaled).tensors["w"], rtol=1e-6)


def test_zero_weights_mean_equal_weights() -> None:
    contribs = [_c("a", 0.0, w=[1.0, 10.0]), _c("b", 0.0, w=[3.0, 20.0]), _c("c", 0.0, w=[5.0, 0.0])]
    m = weighted_mean(contribs)
    np.testing.assert_allclose(m.tensors["w"], [3.0, 10.0], rtol=1e-6)
    assert m.total_weight == 0.0


def test_negative_weights_count_as_zero() -> None:
    m = weighted_mean([_c("a", -5.0, w=[100.0]), _c("b", 2.0, w=[1.0]), _c("c", 2.0, w=[3.0])])
    np.testing.assert_allclose(m.tensors["w"], [2.0], rtol=1e-6)
    m = weighted_mean([_c("a", -1.0, w=[1.0]), _c("b", -2.0, w=[3.0])])
    np.testing.assert_allclose(m.tensors["w"], [2.0], rtol=1e-6)


def test_single_contribution_is_returned_unchanged() -> None:
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    for strategy in STRATEGIES.values():
        out = strategy([Contribution("only", {"w": x}, 4.0)]).tensors["w"]
        np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-7)


def test_trimmed_mean_ignores_one_huge_outlier() -> None:
    rng = np.random.default_rng(2)
    honest = [rng.normal(0, 0.01, (6, 4)) for _ in range(4)]
    for sign in (1.0, -1.0):
        outlier = np.full((6, 4), sign * 1e6)
        contribs = [Contribution(f"d{i}", {"w": t.astype(np.float32)}, 1.0) for i, t in enumerate(honest)]
        contribs.insert(2, Contribution("evil", {"w": outlier.astype(np.float32)}, 1.0))
        m = trimmed_mean(contribs)  # trim 0.2 of 5: drop the lowest and the highest value per coordinate
        stacked = np.sort(np.stack([c.tensors["w"].astype(np.float64) for c in contribs]), axis=0)
        np.testing.assert_allclose(m.tensors["w"], stacked[1:4].mean(axis=0), rtol=1e-5, atol=1e-9)
        assert float(np.max(np.abs(m.tensors["w"]))) < 0.1
        assert float(np.max(np.abs(weighted_mean(contribs).tensors["w"]))) > 1e5  # the plain mean is ruined


def test_trimmed_mean_without_trimming_is_the_mean() -> None:
    contribs = [_c("a", 1.0, w=[1.0]), _c("b", 1.0, w=[2.0]), _c("c", 9.0, w=[6.0])]
    np.testing.assert_allclose(trimmed_mean(contribs, trim=0.0).tensors["w"], [3.0])  # unweighted
    np.testing.assert_allclose(trimmed_mean(contribs).tensors["w"], [3.0])  # floor(0.2 * 3) = 0 trimmed


def test_trimmed_mean_falls_back_to_the_median() -> None:
    contribs = [_c("a", 1.0, w=[1.0]), _c("b", 1.0, w=[2.0]), _c("c", 1.0, w=[100.0]), _c("d", 1.0, w=[4.0])]
    np.testing.assert_allclose(trimmed_mean(contribs, trim=0.5).tensors["w"], [3.0])


def test_coordinate_median() -> None:
    odd = [_c("a", 1.0, w=[1.0, -5.0]), _c("b", 50.0, w=[7.0, 2.0]), _c("c", 1.0, w=[3.0, 1e9])]
    np.testing.assert_allclose(coordinate_median(odd).tensors["w"], [3.0, 2.0])
    even = [*odd, _c("d", 1.0, w=[5.0, 0.0])]
    np.testing.assert_allclose(coordinate_median(even).tensors["w"], [4.0, 1.0])
    m = coordinate_median(odd)
    assert m.contributors == 3 and m.total_weight == 52.0


def test_coordinate_median_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(7)]
    m = coordinate_median([Contribution(str(i), {"w": x}, 1.0) for i, x in enumerate(xs)])
    np.testing.assert_allclose(m.tensors["w"], np.median(np.stack(xs), axis=0), rtol=1e-6)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_mismatched_parameter_names(strategy: str) -> None:
    contribs = [_c("a", 1.0, w=[1.0], b=[0.0]), _c("b", 1.0, w=[2.0], c=[0.0])]
    with pytest.raises(ValueError, match="delta b has parameters"):
        STRATEGIES[strategy](contribs)
    with pytest.raises(ValueError):
        STRATEGIES[strategy]([_c("a", 1.0, w=[1.0]), _c("b", 1.0, w=[2.0], b=[0.0])])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_empty_raises(strategy: str) -> None:
    with pytest.raises(ValueError, match="nothing to merge"):
        STRATEGIES[strategy]([])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_inputs_are_not_modified(strategy: str) -> None:
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=8).astype(np.float32) for _ in range(5)]
    copies = [x.copy() for x in xs]
    STRATEGIES[strategy]([Contribution(str(i), {"w": x}, float(i)) for i, x in enumerate(xs)])
    assert all(np.array_equal(a, b) for a, b in zip(xs, copies, strict=True))

"""The modular network, its routing, sub-models, and the enhancing stage's class grouping and mask LP."""

from __future__ import annotations

import itertools
import math
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from exporter.config import get_config
from exporter.enhance import group_classes, solve_mask
from exporter.modular import ModularNet, SubModel, count_params, cv_squared, topk_softmax


def _net(name: str, seed: int = 0) -> ModularNet:
    torch.manual_seed(seed)
    return ModularNet(get_config(name)).eval()


@pytest.fixture(scope="module")
def digits_net() -> ModularNet:
    return _net("digits")


@pytest.fixture(scope="module")
def resnet_net() -> ModularNet:
    return _net("resnet18")


def _x(cfg_name: str, batch: int, seed: int = 1) -> torch.Tensor:
    cfg = get_config(cfg_name)
    return torch.randn((batch, *cfg.input_shape), generator=torch.Generator().manual_seed(seed))


# --- forward shapes and routing -----------------------------------------------------------------


def test_digits_forward_shape(digits_net: ModularNet) -> None:
    cfg = digits_net.cfg
    with torch.no_grad():
        out = digits_net(_x("digits", 5))
    assert out.shape == (5, cfg.num_classes) and torch.isfinite(out).all()
    assert [layer_spec.num_modules for layer_spec in cfg.layers] == [8, 8, 8]


def test_resnet18_forward_shape(resnet_net: ModularNet) -> None:
    cfg = resnet_net.cfg
    with torch.no_grad():
        out = resnet_net(_x("resnet18", 2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert len(cfg.layers) == 4 and all(ls.num_modules == 16 for ls in cfg.layers)


def test_training_forward_gives_finite_balance_loss() -> None:
    net = _net("digits").train()
    logits, gates = net.forward_with_gates(_x("digits", 8))
    assert logits.shape == (8, 10)
    assert gates.balance_loss.ndim == 0 and torch.isfinite(gates.balance_loss)
    (logits.sum() + gates.balance_loss).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", ["digits", "resnet18"])
def test_eval_routing_is_top_k_sparse(name: str, digits_net: ModularNet, resnet_net: ModularNet) -> None:
    net = digits_net if name == "digits" else resnet_net
    with torch.no_grad():
        gates = net.selector(_x(name, 16, seed=3))
    assert len(gates.probs) == len(net.cfg.layers)
    for p, ls in zip(gates.probs, net.cfg.layers, strict=True):
        assert p.shape == (16, ls.num_modules)
        nonzero = (p > 0).sum(dim=1)
        assert (nonzero == net.cfg.top_k).all(), nonzero
        assert torch.allclose(p.sum(dim=1), torch.ones(16), atol=1e-6)
        assert (p >= 0).all()
    for clean, ls in zip(gates.clean, net.cfg.layers, strict=True):
        assert clean.shape == (16, ls.num_modules) and (clean > 0).all()


def test_eval_routing_picks_the_largest_logits(digits_net: ModularNet) -> None:
    x = _x("digits", 8, seed=4)
    with torch.no_grad():
        gates = digits_net.selector(x)
        e = digits_net.selector.embed(x)
        for layer, p in enumerate(gates.probs):
            logits = digits_net.selector.gates[layer](e)
            top = torch.topk(logits, digits_net.cfg.top_k, dim=1).indices
            chosen = torch.nonzero(p > 0)[:, 1].reshape(8, -1)
            assert torch.equal(chosen.sort(dim=1).values, top.sort(dim=1).values)


# --- sub-models --------------------------------------------------------------------------------


def test_submodel_output_shape_with_a_selection(digits_net: ModularNet) -> None:
    selection = [[0, 6], [3], [1, 2, 7]]
    sub = SubModel(digits_net, selection).eval()
    with torch.no_grad():
        out = sub(_x("digits", 4))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert sub.selection == [[0, 6], [3], [1, 2, 7]]
    assert [g.out_features for g in sub.selector.gates] == [2, 1, 3]
    assert count_params(sub) < count_params(digits_net)


def test_submodel_selection_is_sorted_and_gate_rows_copied(digits_net: ModularNet) -> None:
    sub = SubModel(digits_net, [[6, 0], [5, 2], [7, 1]])
    assert sub.selection == [[0, 6], [2, 5], [1, 7]]
    for layer, idx in enumerate(sub.selection):
        full = cast(nn.Linear, digits_net.selector.gates[layer])
        mine = cast(nn.Linear, sub.selector.gates[layer])
        assert torch.equal(mine.weight, full.weight[idx])
        assert torch.equal(mine.bias, full.bias[idx])


def test_submodel_of_every_module_equals_the_full_model(digits_net: ModularNet) -> None:
    everything = [list(range(ls.num_modules)) for ls in digits_net.cfg.layers]
    sub = SubModel(digits_net, everything).eval()
    x = _x("digits", 6, seed=5)
    with torch.no_grad():
        assert torch.allclose(sub(x), digits_net(x), atol=1e-5)


def test_submodel_with_one_module_per_layer_is_a_plain_chain(digits_net: ModularNet) -> None:
    selection = [[2], [4], [6]]
    sub = SubModel(digits_net, selection).eval()
    x = _x("digits", 3, seed=6)
    with torch.no_grad():
        h = digits_net.stem(x)
        for layer, (i,) in enumerate(selection):
            h = digits_net.module(layer, i)(h)
        expected = digits_net.head(h)
        assert torch.allclose(sub(x), expected, atol=1e-5)


def test_submodel_is_a_copy(digits_net: ModularNet) -> None:
    sub = SubModel(digits_net, [[0], [0], [0]])
    mine, full = cast(nn.Linear, sub.head.fc), digits_net.head.fc
    with torch.no_grad():
        mine.weight.add_(1.0)
    assert not torch.equal(mine.weight, full.weight)


@pytest.mark.parametrize("selection", [[[0], [1]], [[0], [], [1]]])
def test_submodel_needs_a_module_in_every_layer(digits_net: ModularNet, selection: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="every layer"):
        SubModel(digits_net, selection)


# --- routing primitives ------------------------------------------------------------------------


def test_topk_softmax_keeps_k_largest() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5], [0.0, -2.0, 5.0, 4.0, 4.5]])
    p = topk_softmax(logits, 2)
    assert torch.equal((p > 0).nonzero()[:, 1], torch.tensor([1, 2, 2, 4]))
    assert torch.allclose(p.sum(dim=1), torch.ones(2))
    expected_row0 = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    assert torch.allclose(p[0, [1, 2]], expected_row0)
    expected_row1 = torch.softmax(torch.tensor([5.0, 4.5]), dim=0)
    assert torch.allclose(p[1, [2, 4]], expected_row1)
    assert (p[0, [0, 3, 4]] == 0).all() and (p[1, [0, 1, 3]] == 0).all()


@pytest.mark.parametrize("k", [5, 7])
def test_topk_softmax_with_k_at_least_n_is_softmax(k: int) -> None:
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(topk_softmax(logits, k), torch.softmax(logits, dim=-1))


def test_topk_softmax_gradient_is_finite_and_zero_off_the_top() -> None:
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    p = topk_softmax(logits, 2)
    (p * torch.arange(6.0)).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    off = p.detach() == 0
    assert (logits.grad[off] == 0).all()


def test_topk_softmax_random_rows() -> None:
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    for k in (1, 2, 3, 15):
        p = topk_softmax(logits, k)
        assert ((p > 0).sum(dim=1) == k).all()
        assert torch.allclose(p.sum(dim=1), torch.ones(64), atol=1e-6)


def test_cv_squared() -> None:
    assert float(cv_squared(torch.full((8,), 3.0))) == 0.0
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0
    assert float(cv_squared(torch.tensor([], dtype=torch.float32))) == 0.0
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    expected = float(x.var() / x.mean() ** 2)
    assert float(cv_squared(x)) == pytest.approx(expected, rel=1e-5)
    assert float(cv_squared(torch.tensor([0.0, 0.0, 8.0]))) > float(cv_squared(torch.tensor([2.0, 3.0, 3.0])))


# --- the enhancing stage's LP and class grouping -----------------------------------------------


def _check_mask(mask: np.ndarray, h: np.ndarray, per_subtask: int, min_per_subtask: int) -> None:
    s, n = h.shape
    cap = max(1, math.ceil(s * min(per_subtask, n) / n))
    assert mask.shape == (s, n)
    assert set(np.unique(mask)) <= {0, 1}
    rows = mask.sum(axis=1)
    assert (rows <= min(per_subtask, n)).all() and (rows >= min(min_per_subtask, per_subtask, n)).all(), rows
    assert (mask.sum(axis=0) <= cap).all(), (mask.sum(axis=0), cap)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solve_mask_respects_caps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h = rng.random((5, 8))
    mask = solve_mask(h, per_subtask=3, min_per_subtask=2)
    _check_mask(mask, h, 3, 2)
    # With 5 sub-tasks x 3 slots over 8 modules of cap 2, all 15 slots can be and are used.
    assert mask.sum() == 15


def _brute_force(h: np.ndarray, per_subtask: int, min_per_subtask: int) -> float:
    s, n = h.shape
    cap = max(1, math.ceil(s * per_subtask / n))
    rows = [r for k in range(min_per_subtask, per_subtask + 1) for r in itertools.combinations(range(n), k)]
    best = -np.inf
    for choice in itertools.product(rows, repeat=s):
        mask = np.zeros((s, n))
        for a, cols in enumerate(choice):
            mask[a, list(cols)] = 1
        if (mask.sum(axis=0) <= cap).all():
            best = max(best, float((h * mask).sum()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solve_mask_is_optimal_on_a_tiny_case(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h = rng.random((3, 4))
    # Skew one module so that the per-module cap binds: every sub-task would like module 0.
    h[:, 0] += 1.0
    mask = solve_mask(h, per_subtask=2, min_per_subtask=1)
    _check_mask(mask, h, 2, 1)
    assert mask[:, 0].sum() == 2  # cap = ceil(3 * 2 / 4) = 2
    assert float((h * mask).sum()) == pytest.approx(_brute_force(h, 2, 1), abs=1e-7)


def test_solve_mask_clamps_slots_to_module_count() -> None:
    h = np.random.default_rng(7).random((2, 3))
    mask = solve_mask(h, per_subtask=5, min_per_subtask=4)
    _check_mask(mask, h, 5, 4)
    assert (mask.sum(axis=1) == 3).all()


@pytest.mark.parametrize(("num_classes", "groups"), [(10, 5), (10, 1), (10, 10), (10, 20), (7, 3)])
def test_group_classes_is_a_partition(num_classes: int, groups: int) -> None:
    routing = np.random.default_rng(num_classes * 31 + groups).random((num_classes, 24))
    result = group_classes(routing, groups)
    flat = [c for g in result for c in g]
    assert sorted(flat) == list(range(num_classes)), result
    assert len(flat) == len(set(flat))
    assert all(g and g == sorted(g) for g in result)
    assert len(result) == min(groups, num_classes)
    assert [g[0] for g in result] == sorted(g[0] for g in result)


def test_group_classes_puts_alike_routing_together() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    members = [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    routing = np.zeros((9, 3))
    for centre, cls in zip(centres, members, strict=True):
        for c in cls:
            routing[c] = centre + rng.normal(scale=0.05, size=3)
    assert sorted(group_classes(routing, 3)) == sorted(members)

"""Sub-model derivation at the paper's scale (resnet18 costs) against every registered profile."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _eclm_testutil import comparable_pairs

from device_profiles import available_profiles, load_profile
from eclm.errors import InfeasibleBudgetError
from exporter.config import get_config
from exporter.costs import SESSION_OVERHEAD_BYTES, PartCost, fixed_part_ids, part_costs, submodel_cost
from exporter.derive import DIMENSIONS, derive
from exporter.modular import ModularNet

PROFILES = available_profiles()

# Test-side copy of the registry (Optimum style): a profile added, removed or changed without
# updating this table fails test_expected_table_matches_the_registry. Values from the TOML files.
EXPECTED: dict[str, dict[str, object]] = {
    "pi-zero-2w": {"ort_training": False, "arch": "aarch64", "ram_mb": 512, "cores": 4,
                   "runtime_memory_budget_mb": 64.0, "training_memory_budget_mb": 0.0},
    "pi3b": {"ort_training": True, "arch": "aarch64", "ram_mb": 1024, "cores": 4,
             "runtime_memory_budget_mb": 128.0, "training_memory_budget_mb": 64.0},
    "pi4": {"ort_training": True, "arch": "aarch64", "ram_mb": 4096, "cores": 4,
            "runtime_memory_budget_mb": 512.0, "training_memory_budget_mb": 256.0},
    "pi5": {"ort_training": True, "arch": "aarch64", "ram_mb": 8192, "cores": 4,
            "runtime_memory_budget_mb": 1024.0, "training_memory_budget_mb": 512.0},
    "jetson-nano": {"ort_training": True, "arch": "aarch64", "ram_mb": 4096, "cores": 4,
                    "runtime_memory_budget_mb": 512.0, "training_memory_budget_mb": 256.0},
    "x86-edge": {"ort_training": True, "arch": "x86_64", "ram_mb": 16384, "cores": 4,
                 "runtime_memory_budget_mb": 2048.0, "training_memory_budget_mb": 1024.0},
}


@pytest.fixture(scope="module")
def costs() -> dict[str, PartCost]:
    torch.manual_seed(0)
    return part_costs(ModularNet(get_config("resnet18")))


@pytest.fixture(scope="module")
def layer_sizes() -> list[int]:
    return [ls.num_modules for ls in get_config("resnet18").layers]


def _uniform(sizes: list[int]) -> list[np.ndarray]:
    return [np.full(n, 1.0 / n) for n in sizes]


def _random(sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(n)) for n in sizes]


def _check_within(derivation, budgets: dict[str, float]) -> None:
    dims = derivation.cost.dims()
    for d in DIMENSIONS:
        assert dims[d] <= budgets[d], f"{d}: {dims[d]} > budget {budgets[d]}"


# --- the registry and this file agree -----------------------------------------------------------


def test_expected_table_matches_the_registry() -> None:
    missing = sorted(set(PROFILES) - set(EXPECTED))
    stale = sorted(set(EXPECTED) - set(PROFILES))
    assert not missing, f"registered profiles without an EXPECTED entry in tests/test_derive.py: {missing}"
    assert not stale, f"EXPECTED entries for profiles no longer registered: {stale}"
    for name, expected in EXPECTED.items():
        profile = load_profile(name)
        actual = {key: getattr(profile, key) for key in expected}
        assert actual == expected, name


# --- costs ------------------------------------------------------------------------------------


def test_part_costs_cover_every_part(costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    modules = {f"L{la}M{i}" for la, n in enumerate(layer_sizes) for i in range(n)}
    assert set(costs) == modules | set(fixed_part_ids(len(layer_sizes)))
    for pid, c in costs.items():
        assert c.param_bytes >= 4 * c.params, pid
        assert c.flops >= 0 and c.activation_bytes > 0, pid
    # Within a layer, a wider shrunk block costs more than a narrower one, and residual modules least.
    for la in range(len(layer_sizes)):
        half, quarter, eighth, residual = (costs[f"L{la}M{i}"] for i in (0, 4, 9, 14))
        assert half.params > quarter.params > eighth.params > residual.params
        assert half.flops > quarter.flops > eighth.flops > residual.flops


def test_submodel_cost_adds_up(costs: dict[str, PartCost]) -> None:
    selection = [[0], [4, 14], [9], [15]]
    cost = submodel_cost(costs, selection)
    ids = fixed_part_ids(4) + ["L0M0", "L1M4", "L1M14", "L2M9", "L3M15"]
    assert cost.params == sum(costs[i].params for i in ids)
    assert cost.param_bytes == cost.transfer_bytes == sum(costs[i].param_bytes for i in ids)
    assert cost.flops == sum(costs[i].flops for i in ids)
    assert cost.memory_bytes > cost.param_bytes + SESSION_OVERHEAD_BYTES


# --- derive -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILES)
def test_derive_respects_every_budget_uniform(name: str, costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    budgets = load_profile(name).budgets()
    d = derive(costs, _uniform(layer_sizes), budgets)
    _check_within(d, budgets)
    assert all(d.selection), d.selection
    assert d.cost == submodel_cost(costs, d.selection)
    assert d.budgets == budgets
    assert d.total_importance == pytest.approx(sum(len(s) / n for s, n in zip(d.selection, layer_sizes, strict=True)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", PROFILES)
def test_derive_forces_the_most_important_module(
    name: str, seed: int, costs: dict[str, PartCost], layer_sizes: list[int]
) -> None:
    budgets = load_profile(name).budgets()
    importance = _random(layer_sizes, seed)
    d = derive(costs, importance, budgets)
    _check_within(d, budgets)
    for layer, row in enumerate(importance):
        assert int(np.argmax(row)) in d.selection[layer], (layer, d.selection[layer])
    # Modules under the 1% share are never candidates.
    for layer, row in enumerate(importance):
        share = row / row.sum()
        assert all(share[i] >= 0.01 or i == int(np.argmax(row)) for i in d.selection[layer])


def test_most_important_expensive_module_is_kept_under_a_tight_budget(
    costs: dict[str, PartCost], layer_sizes: list[int]
) -> None:
    # Every layer's favourite is its widest (most expensive) block; the budget leaves room for little else.
    importance = [np.array([0.3] + [0.7 / (n - 1)] * (n - 1)) for n in layer_sizes]
    smallest = submodel_cost(costs, [[0] for _ in layer_sizes])
    budgets = {d: smallest.dims()[d] * 1.05 for d in DIMENSIONS}
    d = derive(costs, importance, budgets)
    _check_within(d, budgets)
    assert all(0 in s for s in d.selection)


def test_impossible_budget_names_smallest_cost_and_budget(costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    importance = _uniform(layer_sizes)  # argmax is module 0 of every layer
    smallest = submodel_cost(costs, [[0] for _ in layer_sizes])
    budgets = {"memory_bytes": 2 * 2**20, "flops": 1e15, "transfer_bytes": 1e15}
    with pytest.raises(InfeasibleBudgetError) as exc:
        derive(costs, importance, budgets)
    message = str(exc.value)
    assert "smallest" in message
    assert f"memory_bytes={smallest.memory_bytes / 2**20:.1f} MiB" in message, message
    assert "memory_bytes=2.0 MiB" in message, message
    assert "flops" not in message and "transfer_bytes" not in message  # only the dimension over budget
    assert exc.value.hint
    assert exc.value.exit_code == 12


def test_impossible_flops_budget(costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    smallest = submodel_cost(costs, [[0] for _ in layer_sizes])
    budgets = {"memory_bytes": 1e15, "flops": 10e6, "transfer_bytes": 1e15}
    with pytest.raises(InfeasibleBudgetError) as exc:
        derive(costs, _uniform(layer_sizes), budgets)
    message = str(exc.value)
    assert f"flops={smallest.flops / 1e6:.1f} M" in message and "flops=10.0 M" in message, message
    numbers = re.findall(r"flops=([\d.]+) M", message)
    assert float(numbers[0]) > float(numbers[1])


def test_budget_equal_to_smallest_is_feasible(costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    smallest = submodel_cost(costs, [[0] for _ in layer_sizes])
    d = derive(costs, _uniform(layer_sizes), dict(smallest.dims()))
    assert d.selection == [[0] for _ in layer_sizes]


# --- monotonicity across the registry -----------------------------------------------------------

PAIRS = comparable_pairs(PROFILES)


def test_registry_has_comparable_pairs() -> None:
    assert ("pi-zero-2w", "pi3b") in PAIRS and ("pi5", "x86-edge") in PAIRS
    assert len(PAIRS) >= 5


def _derive_all(costs: dict[str, PartCost], importance: list[np.ndarray]):
    return {name: derive(costs, importance, load_profile(name).budgets()) for name in PROFILES}


def _params_violations(derived) -> list[str]:
    return [
        f"{p} ({derived[p].cost.params} params) > {q} ({derived[q].cost.params} params)"
        for p, q in PAIRS
        if derived[p].cost.params > derived[q].cost.params
    ]


def test_smaller_budgets_never_give_more_params_uniform(costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    assert not _params_violations(_derive_all(costs, _uniform(layer_sizes)))


@pytest.mark.parametrize("seed", range(10))
def test_smaller_budgets_never_give_a_dominating_submodel_random(
    seed: int, costs: dict[str, PartCost], layer_sizes: list[int]
) -> None:
    """With arbitrary importance the knapsack maximises importance, not size: a smaller profile can get
    more parameters when another dimension binds (seed 6: pi-zero-2w 6.19 M vs pi3b 5.94 M params).
    What holds is that its sub-model is never larger in every dimension at once: that one would also
    fit the larger profile, whose optimum could then not be the (cheaper-tie-broken) one it is."""
    derived = _derive_all(costs, _random(layer_sizes, seed))
    for p, q in PAIRS:
        a, b = derived[p].cost, derived[q].cost
        dominates = (a.params > b.params and a.flops > b.flops and a.memory_bytes > b.memory_bytes)
        assert not dominates, (p, q, a, b)


@pytest.mark.parametrize("seed", range(10))
def test_larger_budgets_never_lose_importance(seed: int, costs: dict[str, PartCost], layer_sizes: list[int]) -> None:
    """What the knapsack does guarantee: every sub-model P may take also fits Q, so Q's optimum is no worse."""
    derived = _derive_all(costs, _random(layer_sizes, seed))
    for p, q in PAIRS:
        assert derived[q].total_importance >= derived[p].total_importance - 1e-6, (p, q)

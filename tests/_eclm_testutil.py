"""Helpers shared by the test modules (not fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

from device_profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CLASSES = [1, 4, 7]
# The seed of the session's bank. No assertion may depend on what one training run learned: run the suite
# with ECLM_TEST_SEED=1 (or 2, ...) to check it against another bank, as another machine would train.
SEED = int(os.environ.get("ECLM_TEST_SEED", "0"))


def subprocess_env() -> dict[str, str]:
    """The environment for a child interpreter that must import this checkout's packages."""
    extra = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + extra if extra else "")}


def comparable_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(P, Q) for every two distinct profiles where every budget of P is <= Q's."""
    budgets = {n: load_profile(n).budgets() for n in names}
    return [
        (p, q)
        for p in names
        for q in names
        if p != q and all(budgets[p][d] <= budgets[q][d] for d in budgets[p])
    ]

"""Statistics of the adapt and paper suites: paired differences over seeds with 95% intervals, accuracy in
the step of a shift (into a seen or a new environment), and the goals' verdicts.

Pure functions on plain numbers and the fleet's history (bench/fleet.py ``run``); no training, no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom; beyond 30 the normal's 1.960
# is within 0.05 of it. Values from any t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.960


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (>= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    return T975[df - 1] if df <= len(T975) else Z975


@dataclass(frozen=True)
class Paired:
    """Paired differences (one per seed), their mean and a 95% interval (None with fewer than two)."""

    diffs: tuple[float, ...]
    mean: float
    half_width: float | None  # t(n-1) * sd / sqrt(n); None: n < 2, no interval

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_dict(self) -> dict[str, Any]:
        return {"diffs": list(self.diffs), "mean": self.mean, "half_width": self.half_width,
                "low": self.low, "high": self.high, "n": self.n}


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """``a - b`` per seed (NaN pairs dropped: a seed where an arm measured nothing), mean and 95% interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one of each per seed: {len(a)} and {len(b)}")
    return paired_diffs([float(x) - float(y) for x, y in zip(a, b, strict=True)])


def paired_diffs(diffs: Sequence[float]) -> Paired:
    d = np.asarray([x for x in diffs if x == x], dtype=np.float64)  # NaN: not measured
    if d.size == 0:
        return Paired((), float("nan"), None)
    if d.size == 1:
        return Paired((float(d[0]),), float(d[0]), None)
    half = t975(d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return Paired(tuple(float(x) for x in d), float(d.mean()), half)


def interval_text(p: Paired, scale: float = 100.0) -> str:
    """``+2.10 points (95% interval +0.50 to +3.70, 3 seeds)``; says so when there is no interval."""
    if p.n == 0:
        return "not measured"
    head = f"{scale * p.mean:+.2f} points"
    if p.half_width is None:
        return f"{head} (one seed: no 95% interval)"
    return f"{head} (95% interval {scale * p.low:+.2f} to {scale * p.high:+.2f}, {p.n} seeds)"  # type: ignore[operator]


def seeds_text(n: int) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def goal_text(p: Paired, points: float, scale: float = 100.0) -> str:
    """Whether the mean difference is at least ``points`` and its interval's lower bound above 0."""
    if p.n == 0:
        return "**not met** (not measured)"
    short = points - scale * p.mean
    misses = []
    if short > 1e-9:
        misses.append(f"by {short:.2f} points")
    if p.low is None:
        misses.append("no 95% interval with one seed")
    elif p.low <= 0:
        misses.append(f"the 95% interval's lower bound {scale * p.low:+.2f} is not above 0")
    return "met" if not misses else f"**not met** ({'; '.join(misses)})"


# --- the step of a shift ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShiftEvent:
    """A device that entered another environment at ``step``: into one another device was in before, or not."""

    step: int
    device: int
    environment: str
    seen: bool


def shift_events(history: Sequence[dict[str, Any]]) -> list[ShiftEvent]:
    """The shifts in a run's history (rows of bench/fleet.py ``run``), each classified: ``seen`` if some other
    device took part in an earlier step while in that environment, ``new`` otherwise.
    """
    events = []
    for row in history:
        for dev in row["shifted"]:
            env = _env(row, dev)
            seen = any(_env(h, j) == env for h in history if h["step"] < row["step"]
                       for j in h["devices"] if j != dev)
            events.append(ShiftEvent(row["step"], dev, env, seen))
    return events


def _env(row: dict[str, Any], dev: int) -> str:
    envs = row["environments"]
    return str(envs[dev] if dev in envs else envs[str(dev)])  # int keys, or str ones read back from JSON


def shift_step_accuracy(history: Sequence[dict[str, Any]], arm: str) -> dict[str, float]:
    """Mean accuracy of the shifted devices in the shift's step (after that step's adaptation): over the shifts
    into a seen environment, into a new one, and all; NaN where there is none (or none was measured).
    """
    by_step = {row["step"]: row for row in history}
    groups: dict[str, list[float]] = {"seen": [], "new": [], "all": []}
    for ev in shift_events(history):
        acc = by_step[ev.step].get(arm, {}).get(ev.device)
        if acc is None or acc != acc:
            continue
        groups["seen" if ev.seen else "new"].append(float(acc))
        groups["all"].append(float(acc))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in groups.items()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (NaNs left out; NaN if none)."""
    v = [x for x in values if x == x]
    return (float(np.mean(v)), float(np.std(v))) if v else (float("nan"), float("nan"))

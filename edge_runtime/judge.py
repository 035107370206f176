"""Whether a candidate model may replace the serving one, judged on the device's holdout, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

LOSS_TOLERANCE = 1e-6  # mean log-loss differences below this count as equal


class Scorable(Protocol):
    """What the judgement needs of a model."""

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float: ...

    def log_loss(self, x: np.ndarray, y: np.ndarray) -> float: ...


class Holdout(Protocol):
    """Labelled samples the candidate never trained on."""

    @property
    def x(self) -> np.ndarray: ...

    @property
    def y(self) -> np.ndarray: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Judgement:
    """The outcome and the measure that decided it: accuracy, or log-loss when accuracy ties."""

    not_worse: bool
    decided_by: str  # "accuracy" or "log-loss"
    accuracy_before: float
    accuracy_after: float
    loss_before: float | None = None  # only computed when accuracy ties
    loss_after: float | None = None
    samples: int = 0

    @property
    def reason(self) -> str:
        """One sentence naming the measure and both values; a tie is never called worse."""
        verdict = "served" if self.not_worse else "not served"
        if self.decided_by == "accuracy":
            trend = "better" if self.accuracy_after > self.accuracy_before else "worse"
            return (f"holdout accuracy {self.accuracy_before:.3f} -> {self.accuracy_after:.3f} ({trend}, "
                    f"{self.samples} samples): {verdict}")
        assert self.loss_before is not None and self.loss_after is not None
        trend = "higher" if self.loss_after > self.loss_before + LOSS_TOLERANCE else "not higher"
        return (f"holdout accuracy tied at {self.accuracy_before:.3f} ({self.samples} samples); "
                f"log-loss {self.loss_before:.4f} -> {self.loss_after:.4f} ({trend}) decided: {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"decided_by": self.decided_by, "holdout_before": self.accuracy_before,
                "holdout_after": self.accuracy_after, "log_loss_before": self.loss_before,
                "log_loss_after": self.loss_after, "holdout_samples": self.samples}


def judge(current: Scorable, candidate: Scorable, holdout: Holdout) -> Judgement:
    """The candidate is not worse when it is more accurate on the holdout or, at equal accuracy, not more
    confidently wrong (mean log-loss): on a small holdout accuracy ties often, the loss still tells the
    two apart.
    """
    before, after = current.accuracy(holdout.x, holdout.y), candidate.accuracy(holdout.x, holdout.y)
    if after != before:
        return Judgement(after > before, "accuracy", before, after, samples=len(holdout))
    loss_before, loss_after = current.log_loss(holdout.x, holdout.y), candidate.log_loss(holdout.x, holdout.y)
    return Judgement(loss_after <= loss_before + LOSS_TOLERANCE, "log-loss", before, after, loss_before, loss_after,
                     samples=len(holdout))

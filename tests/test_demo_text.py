"""The demo's table says what each runtime said, in full words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.demo import DemoResult, StepRecord, _training_cell, render

LONG = ("holdout accuracy tied at 0.950 (40 samples); log-loss 0.1800 -> 0.2100 (higher) decided: not served "
        "(delta kept)")


class Answers:
    """Stands in for an edge process: what its last run reported (the cell only formats it)."""

    def __init__(self, last: dict[str, Any]) -> None:
        self.last = last
        self.runs = 0

    def train_and_wait(self) -> dict[str, Any]:
        self.runs += 1
        return self.last


def test_training_cell_takes_the_runtimes_pause_and_never_cuts_words() -> None:
    edge = Answers({"accepted": False, "reason": LONG})
    paused = {"training_paused": True, "drift": False,
              "training_reason": "automatic training paused: free memory 40 MB < 78 MB (64 kept free + 14 for a run)"}
    assert _training_cell(edge, paused) == "paused: free memory 40 MB < 78 MB (64 kept free + 14 for a run)"  # type: ignore[arg-type]
    assert edge.runs == 0  # a paused runtime is not asked to train
    cell = _training_cell(edge, {"training_paused": False, "drift": True})  # type: ignore[arg-type]
    assert cell == "drift; not served: holdout accuracy tied at 0.950 (40 samples); log-loss 0.1800 -> 0.2100 " \
                   "(higher) decided"
    assert _training_cell(Answers({"accepted": True}), {"training_paused": False}) == "served"  # type: ignore[arg-type]


def test_rendered_rows_keep_every_word() -> None:
    result = DemoResult(Path("x"), 0.96, "mqtt://h:1")
    result.records.append(StepRecord("camera-3", 4, "classes 3,6,9, noise, CPU load", 0.9, 0.95, 1234.0, "minimal",
                                     "not served: " + LONG))
    row = render(result).splitlines()[-1]
    assert LONG in row and row.endswith(" |")

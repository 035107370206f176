"""The one commit-or-roll-back path (edge_runtime/generations.py) that training, module updates and bundle
updates share: a worse candidate leaves nothing behind, a served one is committed before the pointer moves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_edge_support import make_service

from eclm.parts import HEAD, bank_name, onnx_prefixes
from edge_runtime.generations import Generations, Trial, with_values
from edge_runtime.model import ServingModel


def _head_names(serving: ServingModel) -> list[str]:
    return [n for n, a in serving.weights.items() if n.startswith(tuple(onnx_prefixes(HEAD))) and a.dtype.kind == "f"]


def _store_own_predictions(svc, x: np.ndarray) -> None:
    """Samples labelled with what the serving model predicts: its holdout accuracy is exactly 1."""
    labels = [svc.serving.labels[i] for i in svc.serving.logits(x).argmax(axis=1)]
    assert len(set(labels)) > 1  # a constant answer is then worse
    svc.add_samples(x, labels)


def _zero_head(serving: ServingModel) -> ServingModel:
    """A candidate whose head answers the same logits for every input (always the first class)."""
    return with_values(serving, {n: np.zeros_like(serving.weights[n]) for n in _head_names(serving)})


def test_a_worse_candidate_is_rolled_back_and_leaves_no_generation(pi4: Path, xy, tmp_path: Path) -> None:
    svc = make_service(tmp_path / "state", pi4, holdout_every=2)
    try:
        _store_own_predictions(svc, xy[0][:40])
        gens: Generations = svc.generations
        serving, before = svc.serving, svc.state.generations()
        seen: list[Trial] = []
        with gens.lock:
            trial = gens.trial(_zero_head(serving), svc.store.holdout_set(), record={"delta_id": "d"},
                               unjudged_serves=True, keep=seen.append)
        assert not trial.served and trial.before == 1.0 and trial.after < 1.0
        assert trial.verdict is not None and trial.verdict.decided_by == "accuracy"
        assert seen == [trial]  # what a run keeps (its delta) is kept also when it does not serve
        assert svc.serving is serving and svc.state.generations() == before
        assert svc.state.read_pointer().generation == serving.generation
        assert "eclm_edge_holdout_accuracy 1.0" in svc.metrics.render().decode()
    finally:
        svc.close()


def test_a_served_candidate_is_committed_before_the_pointer_moves(pi4: Path, xy, tmp_path: Path) -> None:
    svc = make_service(tmp_path / "state", pi4, holdout_every=2)
    try:
        _store_own_predictions(svc, xy[0][:40])
        gens: Generations = svc.generations
        serving = svc.serving
        same = with_values(serving, {n: serving.weights[n].copy() for n in _head_names(serving)})
        during: list[tuple[list[int], int]] = []

        def keep(trial: Trial) -> None:
            during.append((svc.state.generations(), svc.state.read_pointer().generation))

        with gens.lock:
            trial = gens.trial(same, svc.store.holdout_set(), record={"delta_id": "d"}, unjudged_serves=False,
                               keep=keep)
        assert trial.served and trial.verdict is not None and trial.verdict.decided_by == "log-loss"  # a tie serves
        n = same.generation
        assert n > serving.generation and during == [([*svc.state.generations()], serving.generation)]
        assert n in during[0][0]  # committed when ``keep`` ran, the pointer not yet moved
        assert svc.serving is same and svc.state.read_pointer().generation == n
        info = svc.state.verify_generation(n)
        assert info["delta_id"] == "d" and info["parent"] == serving.generation and info["bundle"] == serving.digest
    finally:
        svc.close()


@pytest.mark.parametrize("unjudged_serves", [True, False])
def test_without_holdout_samples_the_caller_decides(pi4: Path, tmp_path: Path, unjudged_serves: bool) -> None:
    svc = make_service(tmp_path / "state", pi4)
    try:
        gens: Generations = svc.generations
        serving = svc.serving
        with gens.lock:
            trial = gens.trial(_zero_head(serving), svc.store.holdout_set(), record={"update": {"head": 2}},
                               unjudged_serves=unjudged_serves)
        assert trial.verdict is None and trial.served is unjudged_serves
        assert (svc.serving is not serving) is unjudged_serves
        assert bool(svc.state.generations()) is unjudged_serves
    finally:
        svc.close()


def test_training_and_module_updates_go_through_the_one_path(pi4: Path, xy, tmp_path: Path, monkeypatch) -> None:
    calls: list[dict | None] = []
    real = Generations.trial

    def spy(self, candidate, holdout, **kw):
        calls.append(kw["record"])
        return real(self, candidate, holdout, **kw)

    monkeypatch.setattr(Generations, "trial", spy)
    svc = make_service(tmp_path / "state", pi4, min_train_samples=8)
    try:
        x, y = xy
        svc.add_samples(x[:40], [svc.serving.labels[int(i) % len(svc.serving.labels)] for i in range(40)])
        svc.train_now()
        assert len(calls) == 1 and set(calls[0] or {}) == {"delta_id"}
        head = {bank_name(n): svc.serving.weights[n] for n in _head_names(svc.serving)}
        svc.apply_module_update({"head": 99}, head)
        assert len(calls) == 2 and calls[1] == {"update": {"head": 99}}
    finally:
        svc.close()


def test_the_components_do_not_import_the_service() -> None:
    """The service wires the components; none of them reaches back into it (no circle)."""
    import subprocess
    import sys

    from _eclm_testutil import ROOT, subprocess_env

    code = ("import sys\n"
            "import edge_runtime.generations, edge_runtime.learning, edge_runtime.updates\n"
            "import edge_runtime.variants, edge_runtime.drift_watch, edge_runtime.events\n"
            "print('edge_runtime.service' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

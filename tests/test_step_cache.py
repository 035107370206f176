"""The traced step graph is reused across sub-models of one structure, with each one's own frozen values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eclm.onnx_weights import read_initializers
from exporter import step_cache
from exporter.export import ExportRequest, export_bundle


def test_a_second_sub_model_of_the_same_structure_reuses_the_trace(digits_bank, tmp_path: Path) -> None:
    bank_dir, _ = digits_bank
    step_cache.clear()
    before = dict(step_cache.stats)
    outs = []
    for name, classes in (("a", [1, 4, 7]), ("again", [1, 4, 7]), ("b", [0, 2, 5])):
        out = tmp_path / name
        # The export checks each step graph against autograd (one and ten steps) and fails otherwise.
        export_bundle(ExportRequest(bank_dir, profile="pi4", out_dir=out, classes=classes, measure=False))
        outs.append(out)
    assert step_cache.stats["misses"] - before["misses"] >= 1
    assert step_cache.stats["hits"] - before["hits"] >= 1  # the same derivation again: the same structure
    steps = [read_initializers(o / "training" / "train_step.onnx") for o in outs]
    models = [read_initializers(o / "model.onnx") for o in outs]
    for step, model in zip(steps, models, strict=True):
        shared = set(step) & set(model)
        assert shared, "the step graph holds the frozen parameters under the serving graph's names"
        for name in shared:  # each step graph carries its own bundle's frozen values, never another's
            assert np.array_equal(step[name], model[name]), name


def test_the_key_ignores_module_indices_but_not_shapes() -> None:
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, names: list[str], width: int) -> None:
            super().__init__()
            self.mods = nn.ModuleDict({n: nn.Linear(4, width) for n in names})

    a, b, c = Layer(["m1", "m3"], 4), Layer(["m0", "m7"], 4), Layer(["m1", "m3"], 5)

    def k(m: nn.Module) -> str:
        state = dict(m.state_dict())
        names = list(state)
        return step_cache.key(m, state, names[:1], names[1:], ["adamw"])

    assert k(a) == k(b)
    assert k(a) != k(c)
    del torch

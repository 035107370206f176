"""An honest evaluation protocol (`eclm bench --suite paper` and `--suite adapt`): test samples never trained
on, corruptions that fit the data's shape, exactly the seeds asked, reports whose command reproduces the
run, and a second built-in data set of another shape (``signals``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import bench.cli
import bench.suites
from bench.corruptions import IMAGE_KINDS, SIGNAL_KINDS, corrupt, kinds_for
from bench.fleet import Device, FleetConfig, Pool, Shift, make_fleet, run
from bench.suites import _adapt_md, _cfg_dict, _paper_md, command_line
from eclm.errors import ConfigError
from exporter.data import load_dataset, split


@pytest.fixture(scope="module")
def signals_pool() -> Pool:
    pool = split(load_dataset("signals"), 0).pool
    return Pool(pool.x, pool.y, 0)


class _FakeArm:
    """An arm that trains nothing: the protocol's sampling is what is under test."""

    name = "fake"

    def adapt(self, devices: list[Device], fresh: dict[int, Any]) -> dict[str, float]:
        return {"uplink": 0.0, "downlink": 0.0}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return 0.5

    def close(self) -> None:
        pass


# --- 1. train and test samples are disjoint, per device and per step (and across the fleet) -----------------

def test_test_samples_are_never_training_samples(signals_pool: Pool) -> None:
    pool = signals_pool
    assert np.intersect1d(pool.train_idx, pool.test_idx).size == 0
    assert np.array_equal(np.union1d(pool.train_idx, pool.test_idx), np.arange(len(pool.y)))
    for k in range(pool.num_classes):  # every class can be drawn from both parts
        assert (pool.y[pool.train_idx] == k).any() and (pool.y[pool.test_idx] == k).any()
    # 2 classes of ~126 per device and 100 test samples: the old protocol drew tests from the same pool
    cfg = FleetConfig(devices=8, per_round=4, classes_per_device=2, steps=6, test_samples=100,
                      corruptions=SIGNAL_KINDS, shifts=(Shift(3, (0, 1), classes=(0, 5, 6, 8)),))
    devices = make_fleet(cfg, pool.num_classes)
    result = run([_FakeArm()], cfg, pool, devices)
    assert len(result["samples"]) == cfg.steps
    all_train: list[np.ndarray] = []
    all_test: list[np.ndarray] = []
    for step, per_device in enumerate(result["samples"]):
        assert set(per_device) == set(result["history"][step]["devices"])
        for i, (train, test) in per_device.items():
            assert len(train) == devices[i].size and len(test) == cfg.test_samples
            assert np.intersect1d(train, test).size == 0, f"step {step}, device {i}"
            all_train.append(train)
            all_test.append(test)
    # nor is a device tested on a sample another device trained on, at any step
    assert np.intersect1d(np.concatenate(all_train), np.concatenate(all_test)).size == 0


# --- 2. corruptions fit the data's shape ----------------------------------------------------------------------

def test_signal_corruptions_change_the_data_but_keep_samples_apart(signals_pool: Pool) -> None:
    x = signals_pool.x[::20]
    assert kinds_for(x.shape[1:]) == SIGNAL_KINDS
    spread = x.std(axis=0).mean()  # how far samples are apart, per feature
    for kind in SIGNAL_KINDS:
        out = corrupt(x, kind, seed=1, value_range=signals_pool.value_range)
        assert out.shape == x.shape and out.dtype == np.float32 and np.isfinite(out).all(), kind
        if kind != "none":
            assert np.abs(out - x).mean() > 0.05 * spread, f"{kind} does not change the data"
        assert out.std(axis=0).mean() > 0.5 * spread, f"{kind} makes the samples (nearly) identical"
    for kind in ("rotation", "contrast", "blur"):  # image operations are refused on 1-D data
        with pytest.raises(ConfigError, match="does not apply"):
            corrupt(x, kind)


def test_image_corruptions_are_unchanged_on_digits() -> None:
    x = load_dataset("digits").x[:50]
    assert kinds_for(x.shape[1:]) == IMAGE_KINDS
    # sums of the outputs of the image corruptions before 1-D data got its own (seed 3)
    before = {"none": (15513.0, 190075.0), "rotation": (13988.149591121357, 145454.77730292457),
              "noise": (16964.18651387299, 193453.6272435129), "contrast": (21565.20020008087, 163709.92109611523),
              "blur": (15513.000019072351, 126721.15066922759)}
    for kind, (total, squares) in before.items():
        out = corrupt(x, kind, seed=3).astype(np.float64)
        assert out.shape == x.shape
        assert out.sum() == pytest.approx(total, rel=1e-6) and (out**2).sum() == pytest.approx(squares, rel=1e-6)
    with pytest.raises(ConfigError):
        corrupt(x, "time-shift")


def test_the_fleet_draws_the_data_sets_own_corruptions(signals_pool: Pool) -> None:
    x, y, idx = signals_pool.draw((1, 2), "time-warp", 10)
    assert x.shape == (10, 1, 1, 64) and set(y.tolist()) <= {1, 2} and np.isin(idx, signals_pool.train_idx).all()
    assert bench.suites._corruptions("signals") == SIGNAL_KINDS
    assert bench.suites._corruptions("digits") == IMAGE_KINDS


# --- 3. the seeds run are the seeds asked ---------------------------------------------------------------------

def _invoke_paper(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake_paper(out: Path, quick: bool, seeds: int, say: Any, dataset: str = "digits") -> dict[str, Any]:
        seen.update(quick=quick, seeds=seeds, dataset=dataset)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paper.md").write_text("report\n")
        return {}

    monkeypatch.setattr(bench.suites, "paper_suite", fake_paper)
    monkeypatch.delenv("ECLM_BENCH_SEEDS", raising=False)
    monkeypatch.delenv("ECLM_DATASET", raising=False)
    monkeypatch.delenv("ECLM_BENCH_QUICK", raising=False)
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", "paper", "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    return seen


@pytest.mark.parametrize(("args", "seeds"), [(["--quick", "--seeds", "3"], 3), (["--quick", "--seeds", "2"], 2),
                                             (["--quick"], 1), ([], 3), (["--seeds", "1"], 1)])
def test_quick_never_reduces_the_seeds_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             args: list[str], seeds: int) -> None:
    assert _invoke_paper(monkeypatch, tmp_path, args)["seeds"] == seeds


def test_seeds_for_a_suite_that_ignores_them_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", "adapt", "--seeds", "3", "--out", str(tmp_path)])
    assert result.exit_code == ConfigError.exit_code and "--seeds is for the paper suite" in result.output


# --- 4. the reports' command reproduces the run and names the data set ----------------------------------------

def _fake_paper_results(dataset: str, seeds: int, quick: bool) -> dict[str, Any]:
    arm = {"after_one_step": (0.5, 0.01), "averaged": (0.6, 0.02), "uplink_bytes": 1000.0,
           "downlink_bytes": 2000.0, "seconds_per_step": 1.0}
    return {"machine": {"cpu": "test cpu", "cores": 2, "date": "2026-01-01"}, "quick": quick, "seeds": seeds,
            "dataset": dataset, "seconds": 1.0, "resources": None, "failed_devices": {},
            "config": _cfg_dict(FleetConfig(corruptions=SIGNAL_KINDS)),
            "summary": {k: {a: dict(arm) for a in ("none", "local", "fedavg", "heterofl", "eclm")}
                        for k in ("m=2", "m=5")}}


def _command_of(md: str) -> str:
    line = next(ln for ln in md.splitlines() if ln.startswith("Command: `"))
    return line.split("`")[1]


def test_paper_report_command_reproduces_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    md = _paper_md(_fake_paper_results("signals", 2, True), [], tmp_path / "b.png", True)
    command = _command_of(md)
    assert command == "eclm bench --suite paper --quick --seeds 2 --dataset signals"
    assert md.startswith("# The paper's protocol on signals") and "time-shift" in md and "digits" not in md
    # the printed command, run, asks for exactly this run
    argv = shlex.split(command)[2:]
    seen = _invoke_paper(monkeypatch, tmp_path / "again", [a for a in argv if a not in ("--suite", "paper")])
    assert seen == {"quick": True, "seeds": 2, "dataset": "signals"}
    # defaults are written out too, and a path is quoted for the shell
    full = _command_of(_paper_md(_fake_paper_results("/data/my set.npz", 3, False), [], tmp_path / "b.png", False))
    assert shlex.split(full) == ["eclm", "bench", "--suite", "paper", "--seeds", "3", "--dataset", "/data/my set.npz"]


def test_adapt_report_names_the_data_set_and_its_corruptions(tmp_path: Path) -> None:
    cfg = FleetConfig(devices=6, per_round=6, classes_per_device=3, steps=8, corruptions=("none",), shifts=(
        Shift(2, (0, 1), corruption="time-shift"), Shift(4, (2, 3), classes=(0, 5, 6, 8)),
        Shift(6, (4, 5), corruption="noise")))
    row = {"mean_accuracy": 0.5, "mean_recovery_steps": 1.0, "never_recovered": 0, "seconds_per_step": 1.0}
    results = {"machine": {"cpu": "test cpu", "cores": 2, "date": "2026-01-01"}, "quick": True,
               "dataset": "signals", "config": _cfg_dict(cfg), "seconds": 1.0, "failed_devices": {},
               "summary": {a: dict(row) for a in ("none", "local", "eclm")}}
    md = _adapt_md(results, tmp_path / "a.png")
    assert _command_of(md) == "eclm bench --suite adapt --quick --dataset signals"
    assert "on signals" in md and "samples of signals" in md and "digits" not in md
    assert '"time-shift"' in md and "rotated" not in md
    assert command_line("adapt", False, "digits") == "eclm bench --suite adapt --dataset digits"


# --- 5. the signals data set ----------------------------------------------------------------------------------

def test_signals_loads_deterministically_with_its_shape() -> None:
    a, b = load_dataset("signals"), load_dataset("signals")
    assert a.name == "signals" and a.x.shape == (1800, 1, 1, 64) and a.x.dtype == np.float32
    assert a.input_shape == (1, 1, 64) and len(a.labels) == 10 and a.labels[0] == "sine-low"
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert np.bincount(a.y).tolist() == [180] * 10 and np.isfinite(a.x).all()
    x = a.x.astype(np.float64)  # the generator's numbers, pinned: a change to it shows here
    assert x.sum() == pytest.approx(-83.91325687414928, abs=1e-3)
    assert (x**2).sum() == pytest.approx(70778.66518548793, rel=1e-6)
    # classes differ (not noise around one mean): the class means are far apart
    means = np.stack([a.x[a.y == k].mean(axis=0).ravel() for k in range(10)])
    assert min(np.linalg.norm(means[i] - means[j]) for i in range(10) for j in range(i)) > 0.3


def test_a_bank_can_be_trained_on_signals(tmp_path: Path) -> None:
    import json

    import torch

    from exporter.cloud import TrainOptions, _config_for, train_bank
    from exporter.modular import ModularNet

    ds = load_dataset("signals")
    cfg = _config_for(TrainOptions(dataset="signals"), ds.input_shape, len(ds.labels))
    assert cfg.input_shape == (1, 1, 64) and cfg.num_classes == 10
    assert ModularNet(cfg).eval()(torch.zeros(4, 1, 1, 64)).shape == (4, 10)
    train_bank(TrainOptions(dataset="signals", bank_dir=tmp_path / "bank", seed=0, epochs=1, enhance_epochs=1))
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert meta["config"]["input_shape"] == [1, 1, 64] and meta["dataset"] == "signals"


def test_ablations_are_named_reproducible_and_refused_where_they_do_not_apply() -> None:
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.suites import ablation_args, command_line

    assert ablation_args("no-gate") == ("--no-gate",) and ablation_args("") == ()
    assert command_line("adapt", False, "digits", ablation="no-gate").endswith("--dataset digits --ablation no-gate")
    wrong = CliRunner().invoke(app, ["bench", "--suite", "adapt", "--ablation", "no-such", "--out", "/nonexistent"])
    assert wrong.exit_code != 0 and "unknown ablation" in wrong.output
    elsewhere = CliRunner().invoke(app, ["bench", "--suite", "paper", "--ablation", "no-gate", "--out", "/nonexistent"])
    assert elsewhere.exit_code != 0 and "adapt suite" in elsewhere.output

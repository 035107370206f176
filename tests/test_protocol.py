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

import bench.adapt_suite
import bench.cli
import bench.paper_suite
import bench.suites
from bench.adapt_suite import adapt_md, summarize
from bench.corruptions import IMAGE_KINDS, SIGNAL_KINDS, corrupt, kinds_for
from bench.fleet import Device, FleetConfig, Pool, Shift, make_fleet, run
from bench.paper_suite import paper_md
from bench.suites import _cfg_dict, command_line
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

def _invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], suite: str = "paper",
            environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `eclm bench --suite SUITE ARGS` (with only ``environ`` of the ECLM_BENCH_* variables set) with the
    suite replaced by one that records what it was asked.
    """
    seen: dict[str, Any] = {}

    def fake(out: Path, quick: bool, seeds: int, say: Any, dataset: str = "digits", ablation_name: str = "",
             few: bool = False) -> dict[str, Any]:
        seen.update(quick=quick, seeds=seeds, dataset=dataset, ablation=ablation_name, few_shot=few)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{suite}.md").write_text("report\n")
        return {}

    module = {"paper": bench.paper_suite, "adapt": bench.adapt_suite}[suite]
    monkeypatch.setattr(module, f"{suite}_suite", fake)
    for var in ("ECLM_BENCH_SEEDS", "ECLM_DATASET", "ECLM_BENCH_QUICK", "ECLM_BENCH_FEW_SHOT", "ECLM_BENCH_ABLATION"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (environ or {}).items():
        monkeypatch.setenv(var, value)
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", suite, "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    return seen


def _invoke_paper(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]) -> dict[str, Any]:
    return _invoke(monkeypatch, tmp_path, args, "paper")


@pytest.mark.parametrize(("args", "seeds"), [(["--quick", "--seeds", "3"], 3), (["--quick", "--seeds", "2"], 2),
                                             (["--quick"], 1), ([], 3), (["--seeds", "1"], 1)])
@pytest.mark.parametrize("suite", ["paper", "adapt"])
def test_quick_never_reduces_the_seeds_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             args: list[str], seeds: int, suite: str) -> None:
    assert _invoke(monkeypatch, tmp_path, args, suite)["seeds"] == seeds


@pytest.mark.parametrize("option", [["--seeds", "3"], ["--few-shot"], ["--ablation", "no-gate"]])
def test_fleet_options_for_a_suite_that_ignores_them_are_an_error(tmp_path: Path, option: list[str]) -> None:
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", "sync", *option, "--out", str(tmp_path)])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert f"{option[0]} is for the paper and adapt suites" in result.output


@pytest.mark.parametrize("suite", ["export", "edge", "soak", "attack", "scale"])
def test_a_data_set_for_a_suite_that_measures_digits_only_is_an_error(tmp_path: Path, suite: str) -> None:
    """Not silently ignored: these suites would measure digits whatever --dataset said."""
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", suite, "--dataset", "signals", "--out",
                                                str(tmp_path)])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert f"the {suite} suite measures digits only" in result.output


def test_the_sync_suite_takes_the_data_set_and_fitting_corruptions(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from bench.sync_bench import DEVICES, device_kind

    calls: list[list[str]] = []
    def call(args: list[str]) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(bench.cli, "run_suite", call)
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", "sync", "--dataset", "signals", "--out",
                                                str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls[0][2] == "bench.sync_bench" and calls[0][-2:] == ["--dataset", "signals"]
    images = [device_kind(k, (1, 8, 8)) for k in range(len(DEVICES))]
    assert images == ["rotation", "noise", "contrast", "blur", "rotation"]  # digits' devices as before
    signals = {device_kind(k, (1, 1, 64)) for k in range(len(DEVICES))}
    assert signals <= set(SIGNAL_KINDS) and "none" not in signals and len(signals) == len(DEVICES)


# --- 4. the reports' command reproduces the run and names the data set ----------------------------------------

def _fake_paper_results(dataset: str, seeds: int, quick: bool) -> dict[str, Any]:
    arm = {"after_one_step": (0.5, 0.01), "averaged": (0.6, 0.02), "uplink_bytes": 1000.0,
           "downlink_bytes": 2000.0, "seconds_per_step": 1.0}
    return {"machine": {"cpu": "test cpu", "cores": 2, "date": "2026-01-01"}, "quick": quick, "seeds": seeds,
            "dataset": dataset, "seconds": 1.0, "resources": None, "failed_devices": {}, "few_shot": False,
            "config": _cfg_dict(FleetConfig(corruptions=SIGNAL_KINDS)),
            "summary": {k: {a: dict(arm) for a in ("none", "local", "fedavg", "heterofl", "eclm")}
                        for k in ("m=2", "m=5")}}


def _command_of(md: str) -> str:
    line = next(ln for ln in md.splitlines() if ln.startswith("Command: `"))
    return line.split("`")[1]


def test_paper_report_command_reproduces_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    md = paper_md(_fake_paper_results("signals", 2, True), [], tmp_path / "b.png", True)
    command = _command_of(md)
    assert command == "eclm bench --suite paper --quick --seeds 2 --dataset signals"
    assert md.startswith("# The paper's protocol on signals") and "time-shift" in md and "digits" not in md
    # the printed command, run, asks for exactly this run
    argv = shlex.split(command)[2:]
    seen = _invoke_paper(monkeypatch, tmp_path / "again", [a for a in argv if a not in ("--suite", "paper")])
    assert seen == {"quick": True, "seeds": 2, "dataset": "signals", "ablation": "", "few_shot": False}
    # defaults are written out too, and a path is quoted for the shell
    full = _command_of(paper_md(_fake_paper_results("/data/my set.npz", 3, False), [], tmp_path / "b.png", False))
    assert shlex.split(full) == ["eclm", "bench", "--suite", "paper", "--seeds", "3", "--dataset", "/data/my set.npz"]


class _ConstArm(_FakeArm):
    """A fake arm of a given name whose accuracy is a fixed number."""

    def __init__(self, name: str, acc: float) -> None:
        self.name, self.acc = name, acc

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return self.acc


def _adapt_results(signals_pool: Pool, seeds: int, quick: bool, few: bool, ablation: str) -> dict[str, Any]:
    """The adapt suite's results of fake arms over the real schedule (no training, no broker)."""
    per_seed = []
    for seed in range(seeds):
        cfg = bench.adapt_suite.adapt_config(quick, "time-shift", "noise", seed, few)
        arms = [_ConstArm("none", 0.4), _ConstArm("local", 0.5), _ConstArm("eclm", 0.55 + 0.01 * seed)]
        res = run(arms, cfg, signals_pool, make_fleet(cfg, signals_pool.num_classes))
        per_seed.append(bench.adapt_suite.seed_result(seed, {**res, "lines": None}))
    summary, diffs = summarize(per_seed)
    return {"machine": {"cpu": "test cpu", "cores": 2, "date": "2026-01-01"}, "quick": quick, "seeds": seeds,
            "dataset": "signals", "few_shot": few, "ablation": ablation, "ablation_what": "what it does",
            "config": _cfg_dict(bench.adapt_suite.adapt_config(quick, "time-shift", "noise", 0, few)),
            "seconds": 1.0, "failed_devices": {}, "summary": summary, "eclm_minus_local": diffs, "lines": False}


def test_adapt_report_names_the_data_set_and_its_corruptions(signals_pool: Pool, tmp_path: Path) -> None:
    md = adapt_md(_adapt_results(signals_pool, 1, True, False, ""), tmp_path / "a.png")
    assert _command_of(md) == "eclm bench --suite adapt --quick --seeds 1 --dataset signals"
    assert "on signals" in md and "samples of signals" in md and "digits" not in md
    assert '"time-shift"' in md and "rotated" not in md and "few-shot" not in md
    assert "one seed: no 95% interval" in md and "no environment lines" in md
    # 5 points averaged and in every shift step: the +3 goal is met in size but has no interval, +10 is missed
    assert "**not met** (no 95% interval with one seed)" in md and "**not met** (by 5.00 points;" in md
    assert command_line("adapt", False, "digits") == "eclm bench --suite adapt --dataset digits"


def test_adapt_report_command_reproduces_the_run(signals_pool: Pool, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    results = _adapt_results(signals_pool, 3, False, True, "no-merge")
    md = adapt_md(results, tmp_path / "a.png")
    assert md.startswith("# Continuous adaptation on signals: 20 steps with shifts, few-shot (10-30 labelled")
    assert "10-30 samples of signals" in md and "Ablation no-merge: what it does" in md
    command = _command_of(md)
    assert command == "eclm bench --suite adapt --seeds 3 --dataset signals --few-shot --ablation no-merge"
    argv = [a for a in shlex.split(command)[2:] if a not in ("--suite", "adapt")]
    seen = _invoke(monkeypatch, tmp_path / "again", argv, "adapt")
    assert seen == {"quick": False, "seeds": 3, "dataset": "signals", "ablation": "no-merge", "few_shot": True}
    # ECLM - LA per seed: 5, 6 and 7 points; mean 6 with t(2) = 4.303 times sd 1 / sqrt(3)
    avg = results["eclm_minus_local"]["averaged"]
    assert avg["diffs"] == pytest.approx([0.05, 0.06, 0.07]) and avg["mean"] == pytest.approx(0.06)
    assert avg["half_width"] == pytest.approx(4.303 * 0.01 / np.sqrt(3))
    assert "met; +6.00 points (95% interval +3.52 to +8.48, 3 seeds)" in md  # +3 averaged: met
    assert "**not met** (by 4.00 points)" in md  # +10 in the shift step: missed by 4


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
    assert wrong.exit_code == ConfigError.exit_code and "unknown ablation" in wrong.output
    elsewhere = CliRunner().invoke(app, ["bench", "--suite", "soak", "--ablation", "no-gate", "--out", "/nonexistent"])
    assert elsewhere.exit_code != 0 and "paper and adapt suites" in elsewhere.output

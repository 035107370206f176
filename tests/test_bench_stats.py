"""The adapt and paper suites' statistics and set-up (issue 14): paired differences with 95% intervals, environment
labels and the seen/new split of shifts, the few-shot regime, ablations and the reproducing command.

Fast: no training, no broker; the fleet runs with fake arms where a run is needed.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_protocol import _invoke
from typer.testing import CliRunner

import bench.adapt_suite
import bench.cli
import bench.paper_suite
from bench.arms_edge import MIN_TRAIN_SAMPLES, EclmOptions
from bench.fleet import Device, FleetConfig, Pool, Shift, apply_shifts, make_fleet, run
from bench.stats import goal_text, interval_text, paired, paired_diffs, shift_events, shift_step_accuracy, t975
from bench.suites import ABLATIONS, FEW_SHOT_SAMPLES, ablation, ablation_args, command_line, few_shot
from eclm.errors import ConfigError
from exporter.data import load_dataset, split

# --- paired differences and their 95% interval -------------------------------------------------------------------


def test_paired_differences_match_hand_computed_values() -> None:
    p = paired_diffs([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303
    assert p.n == 3 and p.mean == pytest.approx(2.0)
    assert p.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert p.low == pytest.approx(2 - 4.303 / math.sqrt(3)) and p.high == pytest.approx(2 + 4.303 / math.sqrt(3))
    q = paired([0.9, 0.8], [0.7, 0.7])  # diffs 0.2, 0.1: mean 0.15, sd 0.0707, t(1) = 12.706
    assert q.diffs == pytest.approx((0.2, 0.1)) and q.mean == pytest.approx(0.15)
    assert q.half_width == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2))
    assert paired_diffs([2.0, 2.0, 2.0]).half_width == pytest.approx(0.0)
    assert paired_diffs([1.0, float("nan"), 3.0]).diffs == (1.0, 3.0)  # a seed an arm did not measure
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_t_quantiles() -> None:
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(4) == 2.776 and t975(30) == 2.042
    assert t975(31) == 1.960 and t975(1000) == 1.960
    assert all(a > b for a, b in zip([t975(k) for k in range(1, 31)], [t975(k) for k in range(2, 32)], strict=True))
    with pytest.raises(ValueError):
        t975(0)


def test_one_seed_has_no_interval_and_says_so() -> None:
    p = paired([0.8], [0.7])
    assert p.n == 1 and p.mean == pytest.approx(0.1) and p.half_width is None and p.low is None
    assert interval_text(p) == "+10.00 points (one seed: no 95% interval)"
    assert goal_text(p, 3.0) == "**not met** (no 95% interval with one seed)"
    assert goal_text(p, 12.0) == "**not met** (by 2.00 points; no 95% interval with one seed)"
    assert interval_text(paired_diffs([])) == "not measured" and goal_text(paired_diffs([]), 3).startswith("**not met")


def test_goal_verdicts() -> None:
    big = paired_diffs([0.11, 0.12, 0.13])
    assert goal_text(big, 10.0) == "met"
    assert goal_text(big, 13.0) == "**not met** (by 1.00 points)"
    wide = paired_diffs([-0.05, 0.05, 0.15])  # mean +5 but the interval reaches below 0
    verdict = goal_text(wide, 3.0)
    assert verdict.startswith("**not met** (the 95% interval's lower bound -") and "by" not in verdict
    assert interval_text(big) == "+12.00 points (95% interval +9.52 to +14.48, 3 seeds)"


# --- environment labels ------------------------------------------------------------------------------------------

def test_make_fleet_labels_each_device_with_its_corruption() -> None:
    devices = make_fleet(FleetConfig(devices=5, corruptions=("none", "rotation", "noise")), 10)
    assert [d.corruption for d in devices] == ["none", "rotation", "noise", "none", "rotation"]
    assert [d.environment for d in devices] == ["", "rotation", "noise", "", "rotation"]


def test_apply_shifts_sets_the_environment() -> None:
    cfg = FleetConfig(devices=5, corruptions=("none",), shifts=(
        Shift(1, (0,), corruption="rotation"), Shift(1, (1,), classes=(0, 5, 6, 8)),
        Shift(2, (2,), corruption="blur", environment="factory-3"), Shift(2, (0,), corruption="none"),
        Shift(3, (3,), classes=(1, 2), corruption="noise")))
    devices = make_fleet(cfg, 10)
    assert apply_shifts(cfg, devices, 0) == [] and all(d.environment == "" for d in devices)
    assert apply_shifts(cfg, devices, 1) == [0, 1]
    assert devices[0].environment == "rotation" and devices[1].environment == "classes-0-5-6-8"
    assert devices[1].classes == (0, 5, 6, 8) and devices[1].corruption == "none"
    apply_shifts(cfg, devices, 2)
    assert devices[2].environment == "factory-3" and devices[2].corruption == "blur"
    assert devices[0].environment == ""  # back to uncorrupted: the shared line
    apply_shifts(cfg, devices, 3)
    assert devices[3].environment == "noise"  # a corruption names the environment, new classes or not
    assert devices[4].environment == ""


def test_solo_environments_gives_every_device_its_own_line() -> None:
    from bench.arms_edge import EclmArm

    arm = EclmArm.__new__(EclmArm)  # the line chosen is a pure function of the options; no daemon is needed
    d = Device(0, "dev-000", (1, 2), "rotation", 1.0, 50, environment="rotation")
    arm.options = EclmOptions()
    assert arm.line(d) == "rotation"
    arm.options = EclmOptions(solo_environments=True)
    assert arm.line(d) == "dev-000"


def test_the_arm_declares_each_devices_environment_when_the_runtime_can() -> None:
    from bench.arms_edge import EclmArm

    class WithLines:
        def __init__(self) -> None:
            self.declared: list[str] = []

        def set_environment(self, name: str) -> None:
            self.declared.append(name)

    arm = EclmArm.__new__(EclmArm)
    arm.options, arm.lines = EclmOptions(), None
    d = Device(0, "dev-000", (1, 2), "rotation", 1.0, 50, environment="rotation")
    svc = WithLines()
    arm.services = {0: svc}
    arm._declare(d)
    d.environment = ""
    arm._declare(d)
    assert svc.declared == ["rotation", ""] and arm.lines is True
    arm.services = {0: object()}  # a runtime without environment lines: nothing to call, and the report says so
    arm._declare(d)
    assert arm.lines is False


# --- seen / new shifts -------------------------------------------------------------------------------------------

def _row(step: int, envs: list[str], shifted: list[int], acc: dict[int, float] | None = None) -> dict[str, Any]:
    return {"step": step, "devices": list(range(len(envs))), "shifted": shifted,
            "environments": dict(enumerate(envs)), "local": acc or {}, "eclm": acc or {}}


def test_shifts_are_seen_or_new_on_a_small_history() -> None:
    history = [_row(0, ["", "", "", ""], []),
               _row(1, ["a", "", "", ""], [0], {0: 0.6, 1: 0.9}),
               _row(2, ["a", "a", "b", ""], [1, 2], {1: 0.8, 2: 0.4}),
               _row(3, ["a", "a", "b", "b"], [3], {3: 0.7})]
    events = shift_events(history)
    assert [(e.step, e.device, e.environment, e.seen) for e in events] == [
        (1, 0, "a", False), (2, 1, "a", True), (2, 2, "b", False), (3, 3, "b", True)]
    acc = shift_step_accuracy(history, "local")
    assert acc["seen"] == pytest.approx((0.8 + 0.7) / 2) and acc["new"] == pytest.approx((0.6 + 0.4) / 2)
    assert acc["all"] == pytest.approx((0.6 + 0.8 + 0.4 + 0.7) / 4)
    # a device's own earlier stay does not make an environment seen; nor does one that did not take part
    back = [_row(0, ["a", ""], []), _row(1, ["", ""], [0]), _row(2, ["a", ""], [0])]
    assert [e.seen for e in shift_events(back)] == [True, False]  # device 1 was in "" at step 0; "a" only dev 0
    back[0]["devices"] = [0]  # device 1 did not take part in step 0
    assert [e.seen for e in shift_events(back)] == [False, False]
    # JSON turns the environments' keys into strings: still read
    again = [{**r, "environments": {str(k): v for k, v in r["environments"].items()}} for r in history]
    assert shift_events(again) == events


@pytest.fixture(scope="module")
def signals_pool() -> Pool:
    pool = split(load_dataset("signals"), 0).pool
    return Pool(pool.x, pool.y, 0)


class _Arm:
    def __init__(self, name: str) -> None:
        self.name = name

    def adapt(self, devices: list[Device], fresh: dict[int, Any]) -> dict[str, float]:
        return {"uplink": 0.0, "downlink": 0.0}

    def accuracy(self, device: Device, x: np.ndarray, y: np.ndarray) -> float:
        return 0.5

    def close(self) -> None:
        pass


@pytest.mark.parametrize("quick", [True, False])
def test_the_adapt_schedule_shifts_into_one_seen_and_five_new_environments(signals_pool: Pool, quick: bool) -> None:
    cfg = bench.adapt_suite.adapt_config(quick, "time-shift", "noise", seed=2)
    s = cfg.steps // 4
    assert cfg.devices == cfg.per_round == 6 and cfg.steps == (8 if quick else 20) and cfg.seed == 2
    res = run([_Arm("local")], cfg, signals_pool, make_fleet(cfg, signals_pool.num_classes))
    assert all(r["devices"] == list(range(6)) for r in res["history"])  # all adapt every step
    got = [(e.step, e.device, e.environment, e.seen) for e in shift_events(res["history"])]
    assert got == [(s, 0, "time-shift", False), (s, 1, "time-shift", False),
                   (2 * s, 2, "classes-0-5-6-8", False), (2 * s, 3, "classes-0-5-6-8", False),
                   (3 * s, 4, "time-shift", True), (3 * s, 5, "noise", False)]


# --- the few-shot regime -----------------------------------------------------------------------------------------

def test_few_shot_devices_hold_10_to_30_samples(signals_pool: Pool) -> None:
    cfg = few_shot(bench.adapt_suite.adapt_config(True, "time-shift", "noise"), True)
    assert (cfg.min_samples, cfg.max_samples) == FEW_SHOT_SAMPLES == (10, 30)
    assert few_shot(cfg, False) == cfg and bench.adapt_suite.adapt_config(True, "time-shift", "noise", 0, True) == cfg
    paper = bench.paper_suite.paper_config(False, ("none", "noise"), True)
    assert (paper.min_samples, paper.max_samples) == (10, 30) and paper.devices == 100
    devices = make_fleet(replace_devices(paper, 200), signals_pool.num_classes)
    sizes = [d.size for d in devices]
    assert min(sizes) >= 10 and max(sizes) <= 30 and len(set(sizes)) > 10
    fleet = make_fleet(cfg, signals_pool.num_classes)
    res = run([_Arm("local")], cfg, signals_pool, fleet)
    held = [len(train) for step in res["samples"] for train, _ in step.values()]  # every step, every device
    assert len(held) == cfg.steps * 6 and min(held) >= 10 and max(held) <= 30


def replace_devices(cfg: FleetConfig, n: int) -> FleetConfig:
    from dataclasses import replace

    return replace(cfg, devices=n)


def test_the_smallest_few_shot_device_can_still_train(tmp_path: Path) -> None:
    """The edge runtime's store holds out every 5th sample; 10 held samples must leave MIN_TRAIN_SAMPLES."""
    from edge_runtime.store import SampleStore

    store = SampleStore(tmp_path / "s.db", (1, 1, 4), capacity=FEW_SHOT_SAMPLES[0])
    for batch in (10, 5, 5, 3):  # the first fill, then half of it replaced (rounded up), step after step
        store.add(np.zeros((batch, 1, 1, 4), np.float32), np.zeros(batch, np.int64))
        assert store.count() == 10 and len(store.training_set()) >= MIN_TRAIN_SAMPLES
    store.close()


# --- ablations ---------------------------------------------------------------------------------------------------

def test_ablations_map_to_daemon_flags_and_arm_options() -> None:
    expected = {"no-gate": (("--no-gate",), EclmOptions()),
                "robust-merge": (("--strategy", "robust", "--min-devices", "2"), EclmOptions()),
                "any-staleness": (("--max-staleness", "1000"), EclmOptions()),
                "no-lines": (("--no-environments",), EclmOptions()),
                "equal-weights": (("--weighting", "equal"), EclmOptions()),
                "samples-weights": (("--weighting", "samples"), EclmOptions()),
                "no-merge": ((), EclmOptions(merges=False)),
                "downlink-next-round": ((), EclmOptions(downlink_same_round=False)),
                "solo-environments": ((), EclmOptions(solo_environments=True)),
                "refine-updates": ((), EclmOptions(refine_updates=True)),
                "no-rederive": (("--derive-threshold", "inf"), EclmOptions()),
                "fp16-updates": (("--update-codec", "fp16+zlib"), EclmOptions())}
    assert set(ABLATIONS) == set(expected)
    for name, (args, options) in expected.items():
        assert (ablation(name).daemon_args, ablation(name).options) == (args, options), name
        assert ablation_args(name) == args and ablation(name).what
    assert ablation("").daemon_args == () and ablation("").options == EclmOptions()


def test_every_ablation_flag_is_one_the_daemon_takes(tmp_path: Path) -> None:
    """Parsed by the real `eclm-cloud sync` command line: a misspelt flag would only fail mid-benchmark."""
    import typer.main

    from cloud_sync.cli import app

    sync = typer.main.get_command(app).commands["sync"]  # type: ignore[attr-defined]  # a click Group
    for name in ABLATIONS:
        ctx = sync.make_context("sync", ["--bank", str(tmp_path), *ablation_args(name)])
        assert str(ctx.params["bank"]) == str(tmp_path), name
    assert sync.make_context("sync", ["--bank", str(tmp_path), *ablation_args("no-rederive")]
                             ).params["derive_threshold"] == float("inf")


def test_an_unknown_ablation_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown ablation 'no-such'") as err:
        ablation("no-such")
    assert "\n" not in err.value.message and "no-merge" in (err.value.hint or "")
    result = CliRunner().invoke(bench.cli.app, ["bench", "--suite", "paper", "--ablation", "no-such",
                                                "--out", str(tmp_path)])
    assert result.exit_code == ConfigError.exit_code and "unknown ablation 'no-such'" in result.output
    assert not (tmp_path / "paper.md").exists()


# --- the command that reproduces a run ---------------------------------------------------------------------------

@pytest.mark.parametrize("suite", ["paper", "adapt"])
@pytest.mark.parametrize(("quick", "seeds", "dataset", "few", "abl"), [
    (False, 3, "digits", False, ""), (True, 1, "signals", True, "no-merge"),
    (True, 5, "/data/my set.npz", False, "solo-environments"), (False, 2, "digits", True, "downlink-next-round")])
def test_command_line_round_trips_every_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suite: str,
                                               quick: bool, seeds: int, dataset: str, few: bool, abl: str) -> None:
    command = command_line(suite, quick, dataset, seeds, abl, few)
    argv = shlex.split(command)
    assert argv[:4] == ["eclm", "bench", "--suite", suite]
    seen = _invoke(monkeypatch, tmp_path, argv[4:], suite)
    assert seen == {"quick": quick, "seeds": seeds, "dataset": dataset, "ablation": abl, "few_shot": few}


def test_few_shot_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = _invoke(monkeypatch, tmp_path, [], "adapt", {"ECLM_BENCH_FEW_SHOT": "1"})
    assert (seen["few_shot"], seen["seeds"]) == (True, 3)


# --- the paper suite's ECLM - LA ---------------------------------------------------------------------------------

def test_paper_eclm_minus_local_per_setting() -> None:
    def run_of(local: list[float], eclm: list[float]) -> dict[str, Any]:
        return {"accuracy_per_step": {"local": local, "eclm": eclm, "none": [0.1] * len(local)}}

    runs = {"m=2": [run_of([0.5, 0.7], [0.6, 0.8]), run_of([0.5, 0.5], [0.55, 0.75])],
            "m=5": [run_of([0.5, 0.5], [0.5, 0.5])]}
    out = bench.paper_suite.eclm_minus_local(runs)
    assert out["m=2"]["averaged"]["diffs"] == pytest.approx([0.1, 0.15])
    assert out["m=2"]["after_one_step"]["diffs"] == pytest.approx([0.1, 0.05])
    assert out["m=2"]["averaged"]["half_width"] == pytest.approx(12.706 * np.std([0.1, 0.15], ddof=1) / math.sqrt(2))
    assert out["m=5"]["averaged"]["mean"] == pytest.approx(0.0) and out["m=5"]["averaged"]["half_width"] is None

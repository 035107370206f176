"""The attack suite's harness (`eclm bench --suite attack`): merger settings from options, the fuzz generator
against the daemon's real decision code, and a tiny matrix that reports a missed goal when the defences are off.

Nothing here depends on what a training run learns to a precise figure: an x100 delta merged without the norm
bound and the gate moves accuracy by far more than the goal's 2 points, and the checks that refuse x100 and NaN
deltas are the daemon's own.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bench import fuzz
from bench.attack import merge_settings, run_matrix
from bench.attack_fleet import Fleet, FleetSpec, build_fleet
from bench.attack_fuzz import daemon_options
from bench.attack_md import render_markdown
from bench.attack_report import MAX_RSS_GROWTH, assemble, judge
from eclm.errors import ConfigError

UNDEFENDED = ["gate_margin=1.0", "limits.max_relative_norm=1e12"]


@pytest.fixture(scope="module")
def tiny_fleet(digits_bank: Any, pi4: Path, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Three devices trained once by the real edge runtime on the session's bank and pi4 bundle."""
    spec = FleetSpec(devices=3, samples_per_device=60, test_per_device=40, max_attackers=1, attacker_epochs=3,
                     bank=digits_bank[0], bundle=pi4)
    return build_fleet(spec, tmp_path_factory.mktemp("attack-fleet"), lambda _m: None)


def test_merge_options_set_any_field_of_merge_settings() -> None:
    s = merge_settings(["strategy=median", "gate_margin=0.5", "limits.max_relative_norm=1e9",
                        "limits.max_staleness=3"])
    assert (s.strategy, s.gate_margin, s.limits.max_relative_norm, s.limits.max_staleness) == ("median", 0.5, 1e9, 3)
    assert merge_settings([]) == type(s)()
    for bad in (["no_such_field=1"], ["limits.nope=2"], ["gate_margin"], ["strategy=nonsense"]):
        with pytest.raises(ConfigError):
            merge_settings(bad)


def test_merge_options_reach_the_daemon_as_its_flags() -> None:
    args, skipped = daemon_options(["gate_margin=0.1", "limits.max_staleness=5", "strategy=median", "no_such=1"])
    assert args == ["--gate-margin", "0.1", "--max-staleness", "5", "--strategy", "median"]
    assert skipped == ["no_such=1"]


def test_a_bad_merge_option_fails_before_any_set_up(tmp_path: Path) -> None:
    from bench.cli import app

    result = CliRunner().invoke(app, ["bench", "--suite", "attack", "--out", str(tmp_path),
                                      "--merge-option", "no_such_field=1"])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "no_such_field" in result.output and not list(tmp_path.iterdir())


def test_fuzz_covers_every_topic_and_the_daemon_core_survives_it(digits_bank: Any, tmp_path: Path) -> None:
    from sync_hooks import exporter_hooks

    from cloud_sync.core import SyncCore, SyncSettings
    from module_bank import DirectoryBank

    bank = tmp_path / "bank"
    shutil.copytree(digits_bank[0], bank)
    b = DirectoryBank(bank)
    shapes = {n: tuple(a.shape) for n, a in b.read_part("head").items() if a.dtype.kind == "f"}
    sizes = [len(layer["widths"]) for layer in b.info().config["layers"]]
    ctx = fuzz.FuzzContext(b.info().bank_id, "head", shapes, ["honest-0", "honest-1"],
                           [[1.0 / n] * n for n in sizes], max_payload=200_000, rng=np.random.default_rng(3))
    msgs = [m for _ in range(400) for m in fuzz.next_messages(ctx)]
    kinds = {k for k, _, _ in msgs}
    assert kinds >= {"random_bytes", "random_header", "mutate_bytes", "mutate_fields", "chunked", "pill"}
    assert all(t.startswith("eclm/v1/") for _, t, _ in msgs)
    assert {t.rsplit("/", 1)[-1] for _, t, _ in msgs} >= {"delta", "profile", "status", "ack", "update", "request"}
    assert any(len(p) > ctx.max_payload for p in [fuzz.oversize(ctx)])
    core = SyncCore(SyncSettings(bank_dir=bank, max_payload=ctx.max_payload), None, exporter_hooks(bank))
    try:
        for _, t, payload in msgs:
            core.handle(t, payload)  # never raises: a bad message is refused and counted
        summary = core.ledger.summary()
        assert sum(summary["rejected_by_reason"].values()) > len(msgs) // 4
        assert not core.ledger.quarantined(), core.ledger.quarantined()[:3]
    finally:
        core.close()


def test_without_gate_and_norm_bound_an_x100_attack_is_reported_as_a_missed_goal(tiny_fleet: Fleet,
                                                                                 tmp_path: Path) -> None:
    matrix = run_matrix(tiny_fleet, ["weighted"], [0.34], ["scale100"], UNDEFENDED, tmp_path, lambda _m: None)
    (cell,) = matrix["cells"]
    # Stored (the first delta of a round may be told it waits for support from a second device), then merged.
    assert cell["attackers"] == 1 and cell["attackers_merged"] == 1
    assert [a.split(":")[0] for a in cell["attacker_acks"]] == ["stored"], cell["attacker_acks"]
    assert matrix["settings"]["weighted"]["limits"]["max_relative_norm"] == 1e12
    goals = {g["goal"]: g for g in judge(matrix, None)}
    (shift_goal,) = [g for name, g in goals.items() if "(weighted)" in name]
    assert not shift_goal["met"] and "scale100" in shift_goal["figure"], shift_goal
    results = assemble("eclm bench --suite attack (test)", UNDEFENDED, tiny_fleet, matrix, None, {})
    text = render_markdown(results)
    assert "goals missed" in text and "**missed**" in text and "limits.max_relative_norm=1e12" in text


def test_the_daemons_checks_refuse_x100_and_nan_deltas_by_default(tiny_fleet: Fleet, tmp_path: Path) -> None:
    matrix = run_matrix(tiny_fleet, ["weighted"], [0.34], ["scale100", "nan"], [], tmp_path, lambda _m: None)
    acks = {c["attack"]: c["attacker_acks"] for c in matrix["cells"]}
    assert acks == {"scale100": ["rejected: norm_bound"], "nan": ["rejected: non_finite"]}
    assert all(c["attackers_merged"] == 0 for c in matrix["cells"])
    assert set(matrix["cells"][0]["device_accuracy"]) == {d.name for d in tiny_fleet.devices}


def _fuzz(**over: Any) -> dict[str, Any]:
    base = {"sent": 1000, "daemon_exit": None, "edge_exit": None, "handler_errors": 0,
            "rss_before": {"daemon": 300 * 10**6}, "rss_after": {"daemon": 305 * 10**6},
            "legit_status": {"a": "merged", "b": "merged"}}
    return {**base, **over}


def test_fuzz_goals_are_judged() -> None:
    empty = {"cells": [], "controls": {}}
    assert all(g["met"] for g in judge(empty, _fuzz()))
    for bad in (_fuzz(daemon_exit=1), _fuzz(rss_after={"daemon": 300 * 10**6 + MAX_RSS_GROWTH}),
                _fuzz(legit_status={"a": "merged", "b": "pending"}), _fuzz(rss_after={"daemon": None})):
        assert [g["met"] for g in judge(empty, bad)].count(False) == 1, bad

"""The runtime says what it does: why training waits (answer, status, metric), which measure judged an
update, what the holdout accuracy is, and JSON it writes holds no NaN.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eclm.hashing import atomic_write_json
from edge_runtime.config import load_config
from edge_runtime.judge import judge
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.outbox import Outbox
from edge_runtime.resources import LatencyWindow, PauseRule, Readings, training_pause
from edge_runtime.service import EdgeService

ROOT = Path(__file__).resolve().parents[1]
RULE = PauseRule(policy="headroom", max_latency_ms=100.0, min_free_memory_mb=64.0, training_mb=14.0)
BUSY_HOST = Readings(free_memory_mb=2000.0, cpu_busy=1.0, latency_ms_p95=3.0)


def strict(text: str | bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def service(state: Path, bundle: Path | None, **overrides: Any) -> EdgeService:
    values: dict[str, Any] = {"bundle": bundle, "state_dir": state, "train_every_samples": 8, "min_train_samples": 8,
                              "resource_interval_s": 0, **overrides}
    return EdgeService(load_config(overrides=values, environ={}))


def metric(svc: EdgeService, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(svc.metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(name)


# --- when automatic training waits ----------------------------------------------------------------


def test_a_busy_host_does_not_pause_training_only_own_headroom_does() -> None:
    assert training_pause(RULE, BUSY_HOST, level=0, variant="main") is None  # a camera pipeline at 100% CPU
    assert training_pause(RULE, None, level=0, variant="main") is None  # nothing read yet
    short = training_pause(RULE, Readings(70.0, 0.1, None), level=0, variant="main")
    assert short is not None and short.kind == "memory"
    assert short.reason == "free memory 70 MB < 78 MB (64 kept free + 14 for a run)"
    slow = training_pause(RULE, Readings(2000.0, 0.1, 140.0), level=0, variant="main")
    assert slow is not None and slow.kind == "latency" and "140.0 ms per sample > budget 100 ms" in slow.reason
    # a cheaper variant serving does not pause by itself, unless the policy says so
    assert training_pause(RULE, BUSY_HOST, level=2, variant="minimal") is None
    variant = PauseRule("variant", 100.0, 64.0, 14.0)
    pause = training_pause(variant, BUSY_HOST, level=2, variant="minimal")
    assert pause is not None and pause.kind == "variant" and "minimal" in pause.reason
    never = PauseRule("never", 100.0, 64.0, 14.0)
    assert training_pause(never, Readings(1.0, 1.0, 10_000.0), level=2, variant="minimal") is None


def test_latency_is_per_sample_and_recent() -> None:
    window = LatencyWindow(window_s=30.0)
    assert window.p95(now=0.0) is None
    for i in range(10):
        window.add(0.5, 100, now=float(i))  # 500 ms for a batch of 100: 5 ms per sample
    assert window.p95(now=10.0) == pytest.approx(5.0)
    assert window.p95(now=100.0) is None  # stale readings do not count (they once kept a device paused)


def test_the_default_config_ignores_host_cpu(pi4: Path, tmp_path: Path) -> None:
    svc = service(tmp_path / "state", pi4)
    try:
        assert svc.ladder().pressure(BUSY_HOST) == []
        svc.last_readings = BUSY_HOST
        assert svc.training_pause() is None
    finally:
        svc.close()


def test_pause_is_said_in_the_answer_status_and_metric(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    # more free memory asked for than any machine has: the real /proc reading is short
    svc = service(tmp_path / "state", pi4, min_free_memory_mb=10**9, resource_interval_s=0.1)
    try:
        svc.start_monitors()
        deadline = time.time() + 30
        while svc.paused is None:
            assert time.time() < deadline, svc.status()["variant"]
            time.sleep(0.05)
        out = svc.add_samples(x[:16], y[:16].tolist())
        assert out["training_started"] is False and out["training_paused"] is True
        assert out["training_reason"].startswith("automatic training paused: free memory")
        status = strict(json.dumps(svc.status()))["training"]
        assert status["paused"] is True and status["pause_policy"] == "headroom"
        assert status["paused_reason"].startswith("free memory") and "for a run" in status["paused_reason"]
        assert metric(svc, "eclm_edge_training_paused", kind="memory") == 1.0
        assert metric(svc, "eclm_edge_training_paused", kind="latency") == 0.0
        # a run asked for explicitly still starts
        assert svc.start_training("api") is True
        svc.wait_for_training(120)
    finally:
        svc.close()


def test_latency_over_budget_pauses_with_its_reason(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = service(tmp_path / "state", pi4, max_latency_ms=2.0)
    try:
        svc.last_readings = Readings(free_memory_mb=10_000.0, cpu_busy=0.2, latency_ms_p95=7.5)
        out = svc.add_samples(x[:16], y[:16].tolist())
        assert out["training_started"] is False
        assert out["training_reason"] == "automatic training paused: own latency p95 7.5 ms per sample > budget 2 ms"
        assert metric(svc, "eclm_edge_training_paused", kind="latency") == 1.0
        svc.last_readings = Readings(free_memory_mb=10_000.0, cpu_busy=1.0, latency_ms_p95=1.0)
        out = svc.add_samples(x[16:24], y[16:24].tolist())
        assert out["training_started"] is True and out["training_paused"] is False
        svc.wait_for_training(120)
        assert metric(svc, "eclm_edge_training_paused", kind="latency") == 0.0
    finally:
        svc.close()


def test_train_pause_policy_is_a_setting(tmp_path: Path) -> None:
    from eclm.errors import ConfigError

    assert load_config(environ={"ECLM_EDGE_TRAIN_PAUSE": "never"}).train_pause == "never"
    (tmp_path / "edge.toml").write_text('[edge]\ntrain_pause = "variant"\n')
    assert load_config(tmp_path / "edge.toml", environ={}).train_pause == "variant"
    with pytest.raises(ConfigError, match="train_pause"):
        load_config(overrides={"train_pause": "sometimes"}, environ={})


# --- which measure judged an update ---------------------------------------------------------------


class Fixed:
    """A model with set scores (the judgement only reads accuracy and log-loss)."""

    def __init__(self, accuracy: float, loss: float) -> None:
        self._accuracy, self._loss = accuracy, loss

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return self._accuracy

    def log_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return self._loss


class Holdout:
    x = np.zeros((40, 1))
    y = np.zeros(40, dtype=np.int64)

    def __len__(self) -> int:
        return 40


def test_a_tie_is_never_called_worse() -> None:
    tie = judge(Fixed(0.95, 0.18), Fixed(0.95, 0.21), Holdout())
    assert not tie.not_worse and tie.decided_by == "log-loss"
    assert tie.reason == ("holdout accuracy tied at 0.950 (40 samples); log-loss 0.1800 -> 0.2100 (higher) "
                          "decided: not served")
    assert "worse" not in tie.reason
    assert tie.to_dict() == {"decided_by": "log-loss", "holdout_before": 0.95, "holdout_after": 0.95,
                             "log_loss_before": 0.18, "log_loss_after": 0.21, "holdout_samples": 40}
    kept = judge(Fixed(0.95, 0.21), Fixed(0.95, 0.18), Holdout())
    assert kept.not_worse and "(not higher) decided: served" in kept.reason
    worse = judge(Fixed(0.95, 0.1), Fixed(0.90, 0.1), Holdout())
    assert not worse.not_worse and worse.decided_by == "accuracy" and worse.loss_before is None
    assert worse.reason == "holdout accuracy 0.950 -> 0.900 (worse, 40 samples): not served"


def _loss(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def test_an_update_of_equal_accuracy_reports_the_log_loss_that_decided(pi4: Path, xy, tmp_path: Path) -> None:
    """Scaling the head scales the logits: the same predictions (equal accuracy by construction), another
    log-loss. The mean log-loss is convex in the scale, so halving or doubling makes it higher.
    """
    x, y = xy
    svc = service(tmp_path / "state", pi4, train_every_samples=0)
    try:
        svc.add_samples(x[:200], y[:200].tolist())
        holdout = svc.store.holdout_set()
        logits = svc.serving.logits(holdout.x)
        scale = max((0.5, 2.0), key=lambda s: _loss(s * logits, holdout.y))
        assert _loss(scale * logits, holdout.y) > _loss(logits, holdout.y)
        head = {n.removeprefix("net."): scale * svc.serving.weights[n]
                for n in ("net.head.fc.weight", "net.head.fc.bias")}
        version = svc.serving.module_versions["head"]
        result = svc.apply_module_update({"head": version + 1}, head)
        assert result["rolled_back"] is True and result["decided_by"] == "log-loss", result
        assert result["holdout_before"] == result["holdout_after"]
        assert result["log_loss_after"] > result["log_loss_before"]
        assert "worse" not in result["reason"] and "tied at" in result["reason"]
        assert f"{result['log_loss_before']:.4f} -> {result['log_loss_after']:.4f} (higher)" in result["reason"]
        assert strict(json.dumps(svc.status()))["last_update"]["decided_by"] == "log-loss"
        # the gauge: the holdout accuracy of what still serves
        assert metric(svc, "eclm_edge_holdout_accuracy") == pytest.approx(result["holdout_before"])
    finally:
        svc.close()


# --- metrics that are set, JSON without NaN -------------------------------------------------------


def test_every_metric_is_set_somewhere() -> None:
    metrics = EdgeMetrics()
    names = [k for k, v in vars(metrics).items() if hasattr(v, "_name")]
    assert "holdout_accuracy" in names and "training_paused" in names
    source = "\n".join(p.read_text() for p in (ROOT / "edge_runtime").glob("*.py") if p.name != "metrics.py")
    unused = [n for n in names if not re.search(rf"metrics\.{n}\.(set|inc|dec|observe|labels)\(", source)]
    assert unused == [], f"metrics defined but never set: {unused}"


def test_holdout_gauge_follows_training_and_start(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = service(tmp_path / "state", pi4, train_every_samples=0)
    try:
        assert np.isnan(metric(svc, "eclm_edge_holdout_accuracy"))  # unknown, not 0
        svc.add_samples(x[:120], y[:120].tolist())
        result = svc.train_now("test")
        served = result["holdout_after"] if result["accepted"] else result["holdout_before"]
        assert metric(svc, "eclm_edge_holdout_accuracy") == pytest.approx(served)
        holdout = svc.store.holdout_set()
        assert svc.measure_holdout() == pytest.approx(svc.serving.accuracy(holdout.x, holdout.y))
    finally:
        svc.close()


def test_files_hold_no_nan(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "g.json", {"holdout_before": float("nan"), "loss": [1.0, float("inf")]})
    assert strict((tmp_path / "g.json").read_text()) == {"holdout_before": None, "loss": [1.0, None]}
    box = Outbox(tmp_path / "outbox")
    path = box.put("d1", {"metrics": {"loss_last": float("nan"), "steps": 3}}, {"w": np.zeros(2, np.float32)})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = strict(raw[8 : 8 + n])
    assert strict(header["__metadata__"]["eclm"])["metrics"] == {"loss_last": None, "steps": 3}

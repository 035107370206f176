"""Adaptation on the device: drift detection, the resource ladder, and rollback of bad updates.

Everything is real: Page-Hinkley on seeded streams, EdgeServices on real state directories serving
real ONNX Runtime sessions of the session's digits bundles, the machine's own /proc readings under
real memory thresholds and real busy child processes, and real signed bundle archives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _eclm_testutil import DEVICE_CLASSES

from bench.corruptions import corrupt
from eclm.archive import tar_bundle
from eclm.errors import BundleError, ConfigError
from eclm.manifest import BundleManifest, bundle_digest, read_manifest, write_manifest
from eclm.onnx_weights import read_initializers
from eclm.signing import generate_keys, load_verifier
from edge_runtime.config import load_config
from edge_runtime.drift import DriftMonitor, PageHinkley, importance_distance
from edge_runtime.model import ServingModel
from edge_runtime.resources import Ladder, Readings, Thresholds
from edge_runtime.service import EdgeService
from exporter.data import Splits
from exporter.export import ExportRequest, export_bundle
from module_bank import BankInfo

Bundles = dict[str, tuple[Path, BundleManifest]]


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own(digits_splits: Splits) -> tuple[np.ndarray, np.ndarray]:
    """Pool samples (the devices' data) of the device's classes 1, 4, 7."""
    pool = digits_splits.pool
    mask = np.isin(pool.y, DEVICE_CLASSES)
    return pool.x[mask].astype(np.float32), pool.y[mask].astype(np.int64)


def service(state_dir: Path, bundle: Path, **overrides: Any) -> EdgeService:
    """An EdgeService that neither trains by itself nor watches resources unless told to."""
    values: dict[str, Any] = {"bundle": bundle, "state_dir": state_dir, "train_every_samples": 0,
                              "resource_interval_s": 0, **overrides}
    return EdgeService(load_config(overrides=values, environ={}))


class Events:
    """A listener that records (time, event, detail) from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[float, str, dict[str, Any]]] = []

    def __call__(self, event: str, detail: dict[str, Any]) -> None:
        with self.lock:
            self.items.append((time.monotonic(), event, dict(detail)))

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [d for _, e, d in self.items if e == event and all(d.get(k) == v for k, v in match.items())]


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def labels_of(y: np.ndarray) -> list[int]:
    return [int(v) for v in y]


def feed(svc: EdgeService, x: np.ndarray, y: np.ndarray, batch: int = 8) -> list[dict[str, Any]]:
    return [svc.add_samples(x[i : i + batch], labels_of(y[i : i + batch])) for i in range(0, len(y), batch)]


def assert_valid_answer(out: dict[str, Any], n: int, digest: str, names: set[str]) -> None:
    probs = np.asarray(out["probabilities"], dtype=np.float64)
    assert probs.shape == (n, len(out["labels"])) == (n, 10)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert out["predictions"] == [out["labels"][i] for i in probs.argmax(axis=1)]
    assert out["bundle"] == digest
    assert out["variant"] in names


def adapted_service(state_dir: Path, bundle: Path, own: tuple[np.ndarray, np.ndarray]) -> EdgeService:
    """A device that saw clean and rotated samples of its classes and fine-tuned on them (accepted)."""
    svc = service(state_dir, bundle, drift=False)  # no drift-triggered run races the explicit one
    x, y = own
    xr = corrupt(x, "rotation", 1.0, seed=1)
    order = np.random.default_rng(0).permutation(2 * len(y))
    feed(svc, np.concatenate([x, xr])[order], np.concatenate([y, y])[order], batch=32)
    result = svc.train_now("adapt")
    assert result["accepted"] is True, result
    assert result["holdout_after"] > result["holdout_before"], result  # rotated holdout samples got better
    assert svc.serving.generation == result["generation"] >= 1
    return svc


# --- 1. pure: Page-Hinkley, importance distance, the ladder ---------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_page_hinkley_quiet_on_stationary_errors_and_fast_on_a_jump(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ph = PageHinkley(delta=0.1, threshold=5.0, min_samples=30)
    stationary = (rng.random(2000) < 0.05).astype(float)
    alarms = [i for i, v in enumerate(stationary) if ph.update(float(v))]
    assert alarms == [], f"false alarm at {alarms[:5]} on a stationary 5% error stream"
    # the reference is the mean of the first min_samples values, then held
    assert ph.n == 2000 and abs(ph.mean - stationary[:30].mean()) < 1e-9
    jumped = (rng.random(200) < 0.5).astype(float)
    delay = next((i for i, v in enumerate(jumped) if ph.update(float(v))), None)
    assert delay is not None and delay < 60, delay
    # non-finite values are ignored, not counted
    n = ph.n
    assert ph.update(float("nan")) is False and ph.n == n


def test_page_hinkley_needs_min_samples_before_an_alarm() -> None:
    ph = PageHinkley(delta=0.0, threshold=0.5, min_samples=20)
    assert not any(ph.update(v) for v in [0.0] * 5 + [1.0] * 15)  # the first 20 values set the reference
    assert ph.statistic == 0.0 and ph.mean == pytest.approx(0.75)
    assert ph.update(1.0) is False  # 1.0 is only 0.25 above the reference
    assert ph.update(1.0) is False  # 0.5 in all: not past the threshold
    assert ph.update(1.0) is True
    ph.reset()
    assert (ph.n, ph.statistic) == (0, 0.0)


def test_accuracy_monitor_quiet_on_stationary_errors() -> None:
    monitor = DriftMonitor([[1.0]])
    correct = np.random.default_rng(0).random(2000) >= 0.05
    alarms = sum(monitor.observe_labels(correct[i : i + 8]) for i in range(0, len(correct), 8))
    assert alarms == 0, f"{alarms} accuracy alarms without any change"


def test_importance_distance_zero_for_identical_and_one_for_disjoint() -> None:
    reference = [[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]
    same = [np.tile(np.asarray(r), (6, 1)) for r in reference]
    assert importance_distance(same, reference) == pytest.approx(0.0, abs=1e-12)
    # the mean routing counts, not single rows; and unnormalised references are normalised
    spread = [np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), np.tile([1.0, 2.0, 3.0, 4.0], (3, 1))]
    assert importance_distance(spread, reference) == pytest.approx(0.0, abs=1e-12)
    disjoint = [np.tile([0.0, 0.0, 0.7, 0.3], (4, 1)), np.tile([1.0, 0.0, 0.0, 0.0], (4, 1))]
    reference2 = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.3, 0.5]]
    assert importance_distance(disjoint, reference2) == pytest.approx(1.0)
    half = [np.tile([0.5, 0.0, 0.5, 0.0], (2, 1))]
    assert importance_distance(half, [[0.5, 0.5, 0.0, 0.0]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):  # one routing per reference layer
        importance_distance(same[:1], reference)


THRESHOLDS = Thresholds(min_free_memory_mb=100, recover_free_memory_mb=200, max_cpu_busy=0.9,
                        recover_cpu_busy=0.6, max_latency_ms=100, recover_latency_ms=50, patience=3)
NAN = None  # no predictions in the window
PRESSED = Readings(free_memory_mb=50, cpu_busy=0.3, latency_ms_p95=NAN)
CPU_PRESSED = Readings(free_memory_mb=1000, cpu_busy=0.95, latency_ms_p95=NAN)
SLOW = Readings(free_memory_mb=1000, cpu_busy=0.3, latency_ms_p95=150.0)
FINE = Readings(free_memory_mb=1000, cpu_busy=0.3, latency_ms_p95=NAN)
BANDS = [  # between pressure and recovery: neither
    Readings(free_memory_mb=150, cpu_busy=0.3, latency_ms_p95=NAN),
    Readings(free_memory_mb=1000, cpu_busy=0.75, latency_ms_p95=NAN),
    Readings(free_memory_mb=1000, cpu_busy=0.3, latency_ms_p95=75.0),
]


def test_ladder_steps_down_after_patience_and_never_past_the_last_rung() -> None:
    ladder = Ladder(rungs=3, thresholds=THRESHOLDS)
    decisions = [ladder.decide(PRESSED) for _ in range(20)]
    changed = [(i, d) for i, d in enumerate(decisions) if d is not None]
    assert [(i, d[0]) for i, d in changed] == [(2, 1), (5, 2)]  # the 3rd and the 6th pressured reading
    assert "free memory" in changed[0][1][1]
    assert ladder.level == 2  # the cheapest rung; further pressure changes nothing
    for reading, why in ((CPU_PRESSED, "CPU busy"), (SLOW, "latency")):
        fresh = Ladder(rungs=3, thresholds=THRESHOLDS)
        out = [fresh.decide(reading) for _ in range(3)]
        assert out[:2] == [None, None] and out[2] is not None and out[2][0] == 1 and why in out[2][1]


def test_ladder_steps_up_after_patience_and_never_below_the_main_model() -> None:
    ladder = Ladder(rungs=3, thresholds=THRESHOLDS)
    for _ in range(6):
        ladder.decide(PRESSED)
    assert ladder.level == 2
    decisions = [ladder.decide(FINE) for _ in range(20)]
    assert [(i, d) for i, d in enumerate(decisions) if d is not None] == [
        (2, (1, "resources back")), (5, (0, "resources back"))]
    assert ladder.level == 0
    assert [h[1] for h in ladder.history] == [1, 2, 1, 0]


def test_ladder_hysteresis_band_changes_nothing() -> None:
    for band in BANDS:
        assert not Ladder(3, THRESHOLDS).pressure(band) and not Ladder(3, THRESHOLDS).recovered(band)
        # at the main model, at the middle rung and at the last: band readings never move the level
        for pressed in (0, 3, 6):
            ladder = Ladder(rungs=3, thresholds=THRESHOLDS)
            for _ in range(pressed):
                ladder.decide(PRESSED)
            level = ladder.level
            assert all(ladder.decide(band) is None for _ in range(50))
            assert ladder.level == level
        # a band reading interrupts a run: patience counts consecutive readings only
        ladder = Ladder(rungs=3, thresholds=THRESHOLDS)
        seq = [PRESSED, PRESSED, band, PRESSED, PRESSED, band, PRESSED]
        assert all(ladder.decide(r) is None for r in seq) and ladder.level == 0
        assert ladder.decide(PRESSED) is None and ladder.decide(PRESSED) == (1, ladder.history[-1][2])
        seq = [FINE, FINE, band, FINE, FINE, band]
        assert all(ladder.decide(r) is None for r in seq) and ladder.level == 1
        # pressure interrupts recovery and recovery interrupts pressure
        assert ladder.decide(FINE) is None and ladder.decide(FINE) is None
        assert ladder.decide(PRESSED) is None and ladder.decide(FINE) is None and ladder.level == 1


def test_drift_can_be_switched_off_through_the_config() -> None:
    # (once coerced with str(): False became the truthy string 'False' and drift could not be switched off)
    assert load_config(overrides={"drift": False}, environ={}).drift is False
    assert load_config(environ={"ECLM_EDGE_DRIFT": "false"}).drift is False
    assert load_config(environ={"ECLM_EDGE_DRIFT": "0"}).drift is False
    assert load_config(environ={"ECLM_EDGE_DRIFT": "yes"}).drift is True
    assert load_config(environ={}).drift is True


def test_drift_switch_in_a_config_file(tmp_path: Path) -> None:
    file = tmp_path / "edge.toml"
    file.write_text("[edge]\ndrift = false\nresource_patience = 4\n")
    cfg = load_config(file, environ={})
    assert cfg.drift is False and cfg.resource_patience == 4
    with pytest.raises(ConfigError, match="drift"):
        load_config(environ={"ECLM_EDGE_DRIFT": "maybe"})


# --- 2. accuracy drift: labelled samples get worse -> fine-tune --------------------------------------


def test_accuracy_drop_triggers_drift_and_a_training_run(pi4: Path, own, tmp_path: Path) -> None:
    x, _ = own
    svc = service(tmp_path / "state", pi4)
    events = Events()
    svc.listeners.append(events)
    try:
        # Labels by construction, whatever the bank learned: first the serving model's own predictions
        # (no errors), then, on rotated inputs, labels it does not predict (every sample an error).
        agree = svc.serving.logits(x).argmax(axis=1)
        clean = feed(svc, x, agree)
        assert not any(r["drift"] or r["training_started"] for r in clean)
        assert events.of("drift") == [] and svc.last_training is None
        assert svc.drift.report()["rolling_accuracy"] == 1.0

        rotated = corrupt(x, "rotation", 1.0, seed=0)
        disagree = (svc.serving.logits(rotated).argmax(axis=1) + 1) % 10
        drifted_at = None
        for i in range(0, len(x), 8):
            r = svc.add_samples(rotated[i : i + 8], labels_of(disagree[i : i + 8]))
            if r["drift"]:
                drifted_at = i
                assert r["training_started"] is True
                break
        assert drifted_at is not None, svc.drift.report()
        # Page-Hinkley (tolerance 0.10, threshold 6) from an error rate of 0 alarms at the 7th error
        assert drifted_at == 0, f"the alarm came only after {drifted_at} wrongly predicted samples"

        alarms = events.of("drift")
        assert len(alarms) == 1 and alarms[0]["kind"] == "accuracy"
        assert alarms[0]["accuracy_alarms"] == 1 and alarms[0]["rolling_accuracy"] < 1.0

        result = svc.wait_for_training(timeout=120)
        assert not svc.training_now
        assert result is not None and svc.last_training is result
        assert result["trigger"] == "drift:accuracy"
        assert result["samples"] >= svc.cfg.min_train_samples and result["steps"] > 0
        assert "accepted" in result and result["holdout_before"] is not None
        if result["accepted"]:
            assert svc.serving.generation == result["generation"] == 1
        assert svc.status()["training"]["last"]["trigger"] == "drift:accuracy"
    finally:
        svc.close()


# --- 3. importance drift: unlabelled inputs route elsewhere -> ask for a new bundle -----------------


def routing_by_brightness(bundle: Path, out: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """A copy of ``bundle`` whose selector routes by construction, not by what a bank learned.

    Its ``selector.onnx`` sends an input with mean pixel value below 8 to the importance the bundle was
    derived for (A), and one above 8 to the least important module of every layer (B):
    ``routing = A + sigmoid(10 (mean - 8)) (B - A)``. Digits (0..16) have a mean of at most 6.8, their
    inverse (16 - x) at least 9.2, so the two route about total-variation distance 1 apart on any bank.
    """
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    reference = [np.asarray(r, dtype=np.float64) / np.sum(r) for r in manifest.importance]
    shifted = [np.eye(len(r))[int(np.argmin(r))] for r in reference]
    outputs = list(manifest.selector["outputs"])
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "col"], ["mean"]),
        helper.make_node("Sub", ["mean", "eight"], ["centred"]),
        helper.make_node("Mul", ["centred", "ten"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["t"]),
    ]
    inits = [helper.make_tensor("col", TensorProto.INT64, [2], [-1, 1]),
             helper.make_tensor("eight", TensorProto.FLOAT, [], [8.0]),
             helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])]
    for i, (a, b, name) in enumerate(zip(reference, shifted, outputs, strict=True)):
        inits += [helper.make_tensor(f"a{i}", TensorProto.FLOAT, [1, len(a)], a.astype(np.float32).tolist()),
                  helper.make_tensor(f"d{i}", TensorProto.FLOAT, [1, len(a)], (b - a).astype(np.float32).tolist())]
        nodes += [helper.make_node("Mul", ["t", f"d{i}"], [f"move{i}"]),
                  helper.make_node("Add", [f"a{i}", f"move{i}"], [name])]
    graph = helper.make_graph(
        nodes, "routing-by-brightness",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *manifest.input["shape"][1:]])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", len(r)]) for n, r in zip(outputs, reference,
                                                                                           strict=True)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(out / manifest.selector.get("file", "selector.onnx")))
    write_manifest(out, manifest)
    return out, reference, shifted


def test_importance_shift_triggers_drift_and_wants_a_bundle(pi4: Path, own, tmp_path: Path) -> None:
    x, _ = own
    bundle, reference, shifted = routing_by_brightness(pi4, tmp_path / "bundle")
    svc = service(tmp_path / "state", bundle)
    events = Events()
    svc.listeners.append(events)
    try:
        _importance_shift(svc, events, x, 16.0 - x, reference, shifted)
    finally:
        svc.close()


def _importance_shift(svc: EdgeService, events: Events, x: np.ndarray, strange: np.ndarray,
                      reference: list[np.ndarray], shifted: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    # the construction, checked on the data (no model learned any of this)
    assert float(x.mean(axis=(1, 2, 3)).max()) < 7.0 < 9.0 < float(strange.mean(axis=(1, 2, 3)).min())
    assert importance_distance(svc.routing(x), svc.drift.reference) < 1e-3
    far = importance_distance([s[None, :] for s in shifted], [r.tolist() for r in reference])
    assert far > 0.5 and importance_distance(svc.routing(strange), svc.drift.reference) == pytest.approx(far, abs=1e-3)
    batch = 32
    svc.start_monitors()
    # The routing of at most one batch per 0.2 s is judged, off the request path: pace to match.
    # A stable stretch first: Page-Hinkley learns the reference level from the first batches.
    for _ in range(25):
        svc.predict(x[rng.choice(len(x), batch, replace=False)])
        time.sleep(0.205)
    assert wait_until(lambda: len(svc.drift.distances) >= 15, 10), len(svc.drift.distances)
    assert events.of("drift") == [] and svc.want_bundle is False
    stable = svc.drift.report()["importance_distance"]
    assert stable < 1e-3

    started = time.monotonic()
    deadline = started + 60
    while time.monotonic() < deadline and not events.of("drift"):
        svc.predict(strange[rng.choice(len(strange), batch, replace=False)])
        time.sleep(0.205)
    took = time.monotonic() - started
    alarms = events.of("drift")
    assert alarms, f"no importance alarm after {took:.1f} s of shifted inputs: {svc.drift.report()}"
    assert [a["kind"] for a in alarms] == ["importance"]
    assert alarms[0]["importance_alarms"] == 1
    assert alarms[0]["importance_distance"] > stable
    assert svc.want_bundle is True
    assert svc.status()["drift"]["importance_alarms"] == 1
    print(f"importance drift noticed after {took:.1f} s (distance {stable:.3f} -> "
          f"{alarms[0]['importance_distance']:.3f})")


def test_importance_monitor_reports_a_persistent_shift() -> None:
    monitor = DriftMonitor([[0.5, 0.5, 0.0, 0.0]])

    def gates(d: float) -> list[np.ndarray]:
        return [np.tile([0.5 + d, 0.5 - d, 0.0, 0.0], (16, 1))]  # total-variation distance d

    assert importance_distance(gates(0.1), monitor.reference) == pytest.approx(0.1)
    assert not any(monitor.observe_routing(gates(0.03)) for _ in range(30))
    alarm_after = next((i for i in range(1000) if monitor.observe_routing(gates(0.10))), None)
    assert alarm_after is not None, f"statistic {monitor.importance_test.statistic:.2f} < 2.0 forever"


# --- 4. memory pressure: step down to a variant, keep serving, pause training ----------------------


def test_memory_pressure_steps_down_keeps_serving_and_pauses_training(pi4: Path, own, tmp_path: Path) -> None:
    x, y = own
    svc = service(tmp_path / "state", pi4, min_free_memory_mb=10**9, resource_interval_s=0.2,
                  resource_patience=2, train_every_samples=8, min_train_samples=8)
    events = Events()
    svc.listeners.append(events)
    digest = svc.serving.digest
    names = {"main", *(v["name"] for v in svc.serving.manifest.variants)}
    rungs = len(svc.variants())
    assert rungs == len(svc.serving.manifest.variants) >= 1

    stop = threading.Event()
    answers: list[tuple[str, np.ndarray, np.ndarray]] = []  # (variant, inputs' indices, probabilities)
    errors: list[BaseException] = []

    def hammer() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            idx = rng.choice(len(x), 12, replace=False)
            try:
                out = svc.predict(x[idx])
                assert_valid_answer(out, 12, digest, names)
                answers.append((out["variant"], idx, np.asarray(out["probabilities"])))
            except BaseException as exc:  # noqa: BLE001 - every failure is reported by the test
                errors.append(exc)
                return

    thread = threading.Thread(target=hammer, daemon=True)
    try:
        thread.start()
        assert wait_until(lambda: len(answers) >= 20 or bool(errors), 10)
        svc.start_monitors()
        assert wait_until(lambda: svc.level == rungs or bool(errors), 10), (svc.level, events.items)
        time.sleep(0.3)  # some answers from the last rung too
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        assert errors == [], repr(errors[0])

        seen = [v for v, _, _ in answers]
        assert seen[0] == "main" and seen[-1] == svc.variant_name() != "main"
        assert len(set(seen)) == rungs + 1, set(seen)  # served by every rung during the switches
        # every answer came from the model it names: the main model or that variant, none mixed up
        models = {"main": svc.serving, **{v["name"]: m for v, m in zip(svc.serving.manifest.variants, svc.variants(),
                                                                          strict=True)}}
        for name, idx, probs in answers:
            assert np.allclose(probs, models[name].predict(x[idx]), atol=1e-5), name

        status = svc.status()
        assert status["variant"]["level"] == rungs > 0
        assert status["variant"]["name"] == svc.serving.manifest.variants[rungs - 1]["name"]
        assert status["variant"]["readings"]["free_memory_mb"] < 10**9
        switches = events.of("variant")
        assert [s["level"] for s in switches] == list(range(1, rungs + 1))
        assert all("free memory" in s["reason"] for s in switches)

        # what serves now is the cheapest variant's model
        out = svc.predict(x[:30])
        cheapest = svc.variants()[-1]
        assert np.allclose(out["probabilities"], cheapest.predict(x[:30]), atol=1e-5)

        # automatic training waits while memory is short, by sample count and by drift alike, and says why
        results = feed(svc, x[:64], y[:64])
        results += feed(svc, corrupt(x[64:200], "rotation", 1.0, seed=0), y[64:200])
        assert not any(r["training_started"] for r in results)
        assert all(r["training_paused"] and "free memory" in r["training_reason"] for r in results)
        assert any(r["drift"] for r in results)  # the alarm is still raised, just not acted on
        assert events.of("drift", kind="accuracy")
        assert svc.status()["samples"]["new_since_training"] >= svc.cfg.train_every_samples
        time.sleep(0.3)
        assert not svc.training_now and svc.last_training is None and svc.level == rungs
    finally:
        stop.set()
        svc.close()


def test_bundle_swap_while_a_variant_serves_keeps_predictions_working(pi4: Path, own, tmp_path: Path) -> None:
    x, _ = own
    fewer = tmp_path / "fewer-variants"  # e.g. a re-derived bundle whose cheaper derivations coincide
    shutil.copytree(pi4, fewer)
    manifest = read_manifest(fewer)
    assert manifest.variants, "the pi4 bundle is expected to carry variants"
    for v in manifest.variants:
        shutil.rmtree((fewer / v["file"]).parent)
    cheapest = manifest.variants[-1]["name"]
    manifest.variants = []
    write_manifest(fewer, manifest)
    svc = service(tmp_path / "state", pi4)  # no resource loop: the level is set by hand
    try:
        svc.set_level(len(svc.variants()), "test: pressure")
        assert svc.predict(x[:4])["variant"] == cheapest
        svc.install_bundle(fewer)
        out = svc.predict(x[:4])  # raises IndexError
        assert out["bundle"] == bundle_digest(fewer)
    finally:
        svc.close()


# --- 5. CPU pressure from real busy processes, and recovery --------------------------------------


def test_cpu_pressure_steps_down_and_recovers(pi4: Path, tmp_path: Path) -> None:
    svc = service(tmp_path / "state", pi4, max_cpu_busy=0.9, resource_interval_s=0.3, resource_patience=2,
                  min_free_memory_mb=0)
    events = Events()
    svc.listeners.append(events)
    busy: list[subprocess.Popen[bytes]] = []
    readings: list[float] = []
    try:
        svc.start_monitors()
        time.sleep(0.7)  # a first reading or two of the machine as it is
        mark = time.monotonic()
        # one spinning process per core the kernel counts in /proc/stat
        spin = [sys.executable, "-c", "while True: pass"]
        busy = [subprocess.Popen(spin) for _ in range(max(2, os.cpu_count() or 2))]
        assert wait_until(lambda: svc.level > 0, 15), (svc.status()["variant"], events.items)
        under_load = svc.status()["variant"]
        assert under_load["last_switch"]["reason"].startswith("CPU busy")
        assert under_load["readings"]["cpu_busy"] > 0.6
        stepped = [d for d in events.of("variant") if d["level"] > 0]
        assert stepped and all("CPU busy" in d["reason"] for d in stepped)
        took_down = time.monotonic() - mark
    finally:
        for p in busy:
            p.kill()
        for p in busy:
            p.wait(10)
    mark = time.monotonic()

    def back() -> bool:
        r = getattr(svc, "last_readings", None)
        if r is not None:
            readings.append(r.cpu_busy)
        return svc.level == 0

    try:
        recovered = wait_until(back, 20, step=0.3)
        if not recovered and np.median(readings) > 0.6:
            pytest.skip(f"the machine stays busy with other work (median CPU busy {np.median(readings):.0%})")
        assert recovered, (svc.status()["variant"], readings[-10:])
        took_up = time.monotonic() - mark
        last = events.of("variant")[-1]
        assert last["level"] == 0 and last["reason"] == "resources back" and last["variant"] == "main"
        assert svc.variant_name() == "main" and svc.active is svc.serving
        print(f"CPU: stepped down after {took_down:.1f} s of load, back to main {took_up:.1f} s after it ended")
    finally:
        svc.close()


# --- 6. bad updates are rolled back ---------------------------------------------------------------


def test_worse_module_update_is_rolled_back(pi4: Path, own, tmp_path: Path) -> None:
    x, y = own
    probe = np.concatenate([x[:40], corrupt(x[:40], "rotation", 1.0, seed=5)])
    svc = adapted_service(tmp_path / "state", pi4, own)
    events = Events()
    svc.listeners.append(events)
    try:
        generation, versions = svc.serving.generation, svc.serving.module_versions
        pointer = (tmp_path / "state" / "current.json").read_text()
        gens = sorted(p.name for p in (tmp_path / "state" / "gens").iterdir())
        before = svc.predict(probe)
        holdout = svc.store.holdout_set()
        assert len(holdout) > 50

        # the serving parameters of the largest module, scrambled
        module = max(svc.serving.manifest.modules, key=lambda m: len(m["params"]))
        pid = module["part_id"]
        current = {n.removeprefix("net."): svc.serving.weights[n].copy() for n in module["params"]}
        rng = np.random.default_rng(0)
        scrambled = {n: (rng.uniform(0.5, 2.0, v.shape) if n.endswith("running_var")
                         else rng.normal(0.0, 1.0, v.shape)).astype(np.float32) for n, v in current.items()}

        result = svc.apply_module_update({pid: versions[pid] + 1}, scrambled)
        assert result["rolled_back"] is True and result["applied"] is False, result
        assert result["holdout_after"] < result["holdout_before"]
        assert result["holdout_before"] == pytest.approx(svc.serving.accuracy(holdout.x, holdout.y))
        assert svc.serving.generation == generation and svc.serving.module_versions == versions
        assert svc.status()["module_versions"] == versions and svc.last_update == result
        assert (tmp_path / "state" / "current.json").read_text() == pointer
        assert sorted(p.name for p in (tmp_path / "state" / "gens").iterdir()) == gens  # nothing left behind
        after = svc.predict(probe)
        assert after["generation"] == generation
        assert np.array_equal(after["probabilities"], before["probabilities"])
        rollbacks = events.of("rollback")
        assert len(rollbacks) == 1 and rollbacks[0]["versions"] == {pid: versions[pid] + 1}

        # the same module at its current values is not worse: applied as a new generation
        same = svc.apply_module_update({pid: versions[pid] + 1}, current)
        assert same["applied"] is True and same["generation"] == generation + 1, same
        assert svc.serving.module_versions == {**versions, pid: versions[pid] + 1}
        assert np.allclose(svc.predict(probe)["probabilities"], before["probabilities"], atol=1e-5)
        assert len(events.of("rollback")) == 1
    finally:
        svc.close()


def test_bundle_archives_are_verified_and_worse_bundles_rolled_back(
    digits_bank: tuple[Path, BankInfo], pi4: Path, own, tmp_path: Path
) -> None:
    bank_dir, _ = digits_bank
    x, _ = own
    keys, other_keys = tmp_path / "keys", tmp_path / "other-keys"
    keys.mkdir()
    other_keys.mkdir()
    generate_keys(keys)
    generate_keys(other_keys)
    verifier = load_verifier(keys / "signing.pub")
    worse = tmp_path / "other-classes"
    export_bundle(ExportRequest(bank_dir, profile="pi4", out_dir=worse, classes=[0, 2, 3], measure=False,
                                signing_key=keys / "signing.key", device_id="device"))
    assert read_manifest(worse).signature is not None

    unsigned = tmp_path / "unsigned"
    shutil.copytree(worse, unsigned)
    data = json.loads((unsigned / "manifest.json").read_text())
    data["signature"] = None
    (unsigned / "manifest.json").write_text(json.dumps(data))
    tampered = tmp_path / "tampered"
    shutil.copytree(worse, tampered)
    blob = bytearray((tampered / "model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(blob))

    state = tmp_path / "state"
    probe = np.concatenate([x[:40], corrupt(x[:40], "rotation", 1.0, seed=5)])
    svc = adapted_service(state, pi4, own)
    events = Events()
    svc.listeners.append(events)
    try:
        serving = (svc.serving.digest, svc.serving.generation)
        pointer = (state / "current.json").read_text()
        before = svc.predict(probe)

        def unchanged() -> None:
            assert (svc.serving.digest, svc.serving.generation) == serving
            assert (state / "current.json").read_text() == pointer
            assert np.array_equal(svc.predict(probe)["probabilities"], before["probabilities"])
            assert list((state / "bundles").glob(".tmp-*")) == []

        refused = [
            (tar_bundle(unsigned), verifier, "not signed"),
            (tar_bundle(worse), load_verifier(other_keys / "signing.pub"), "not the trusted key"),
            (tar_bundle(tampered), verifier, "does not match its sha256"),
            (b"not a gzip'd tar at all", verifier, "unreadable"),
        ]
        for archive, key, why in refused:
            with pytest.raises(BundleError, match=why):
                svc.install_bundle_archive(archive, key)
            unchanged()
        assert events.of("rollback") == []

        # correctly signed, but derived for other classes: judged on the device's holdout
        holdout = svc.store.holdout_set()
        expected_before = svc.serving.accuracy(holdout.x, holdout.y)
        expected_after = ServingModel(read_manifest(worse), worse, "x", 0, worse / "model.onnx",
                                      read_initializers(worse / "model.onnx")).accuracy(holdout.x, holdout.y)
        assert expected_after < expected_before  # the adapted device does better on its own data
        result = svc.install_bundle_archive(tar_bundle(worse), verifier)
        assert result["rolled_back"] is True and result["applied"] is False, result
        assert result["bundle"] == bundle_digest(worse)
        assert result["holdout_before"] == pytest.approx(expected_before)
        assert result["holdout_after"] == pytest.approx(expected_after)
        unchanged()
        assert svc.last_update == result
        rollbacks = events.of("rollback")
        assert len(rollbacks) == 1 and rollbacks[0]["bundle"] == result["bundle"]
    finally:
        svc.close()

    # the same signed archive on a device without a holdout yet is applied and serves
    fresh = service(tmp_path / "fresh", pi4)
    try:
        result = fresh.install_bundle_archive(tar_bundle(worse), verifier)
        assert result["applied"] is True and fresh.serving.digest == bundle_digest(worse)
        out = fresh.predict(probe)
        assert out["bundle"] == bundle_digest(worse) and out["generation"] == 0
        assert fresh.serving.manifest.derived_for["classes"] == [0, 2, 3]
    finally:
        fresh.close()


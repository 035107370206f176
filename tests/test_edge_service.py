"""The edge runtime as a library: predictions, the sample store, fine-tuning, the holdout gate, the outbox."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from test_edge_support import generation_problems, make_service

from eclm.errors import DataError, TrainingUnavailableError
from eclm.manifest import BundleManifest, bundle_digest
from edge_runtime.config import load_config
from edge_runtime.outbox import Outbox
from edge_runtime.service import EdgeService
from module_bank import BankInfo, DirectoryBank

Bundles = dict[str, tuple[Path, BundleManifest]]


def _all_samples(svc: EdgeService) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stored sample ordered by id: (ids, x, y)."""
    tr, ho = svc.store.training_set(), svc.store.holdout_set()
    ids = np.concatenate([tr.ids, ho.ids])
    order = np.argsort(ids)
    return ids[order], np.concatenate([tr.x, ho.x])[order], np.concatenate([tr.y, ho.y])[order]


# --- predictions ---------------------------------------------------------------------------------


def test_predict_returns_probabilities_and_label_names(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4)
    try:
        out = svc.predict(x[:40])
        probs = np.asarray(out["probabilities"])
        assert probs.shape == (40, len(out["labels"])) == (40, 10)
        assert np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        assert out["labels"] == [str(i) for i in range(10)]
        assert out["predictions"] == [out["labels"][i] for i in probs.argmax(axis=1)]
        assert out["generation"] == 0 and out["bundle"] == bundle_digest(pi4)
        # the bundle's own graph answers, run here by a bare ONNX Runtime session (not what a bank learned)
        import onnxruntime as ort

        bare = ort.InferenceSession(str(pi4 / "model.onnx"), providers=["CPUExecutionProvider"])
        logits = bare.run(None, {bare.get_inputs()[0].name: x[:40]})[0]
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        assert np.allclose(probs, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)

        # the same samples flattened to (N, 64), and one sample without the batch axis
        flat = svc.predict(x[:40].reshape(40, -1))
        assert np.allclose(flat["probabilities"], out["probabilities"], atol=1e-6)
        one = svc.predict(x[0])
        assert np.allclose(one["probabilities"], out["probabilities"][:1], atol=1e-6)
        # integers are numbers too
        ints = svc.predict(x[:3].astype(np.int64))
        assert len(ints["predictions"]) == 3
    finally:
        svc.close()


def _bad_inputs() -> dict[str, np.ndarray]:
    good = np.ones((2, 1, 8, 8), np.float32)
    nan, inf, ninf = good.copy(), good.copy(), good.copy()
    nan[1, 0, 3, 3] = np.nan
    inf[0, 0, 0, 0] = np.inf
    ninf[1, 0, 7, 7] = -np.inf
    return {
        "wrong-width": np.ones((2, 63), np.float32),
        "wrong-image": np.ones((2, 1, 8, 7), np.float32),
        "wrong-channels": np.ones((2, 3, 8, 8), np.float32),
        "one-dim": np.ones(64, np.float32),
        "scalar": np.asarray(1.0, np.float32),
        "five-dims": np.ones((1, 2, 1, 8, 8), np.float32),
        "nan": nan,
        "inf": inf,
        "-inf": ninf,
        "float64-nan": nan.astype(np.float64),
        "strings": np.full((2, 64), "1.0"),
        "bytes": np.full((2, 64), b"1"),
        "objects": np.array([[1.0, None] * 32], dtype=object),
        "bools": np.ones((2, 64), bool),
        "complex": np.ones((2, 64), np.complex64),
        "empty-batch": np.zeros((0, 1, 8, 8), np.float32),
        "empty-flat": np.zeros((0, 64), np.float32),
        "empty": np.array([], np.float32),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_data_error_and_store_nothing(case: str, pi4: Path, tmp_path: Path) -> None:
    x = _bad_inputs()[case]
    svc = make_service(tmp_path, pi4)
    try:
        with pytest.raises(DataError) as exc:
            svc.predict(x)
        assert exc.value.message and exc.value.hint
        n = len(x) if x.ndim else 1
        with pytest.raises(DataError):
            svc.add_samples(x, [1] * n)
        assert svc.store.count() == 0 and svc.store.last_id() == 0
        assert svc.predict(np.ones((1, 64), np.float32))["probabilities"]  # still serving
    finally:
        svc.close()


@pytest.mark.parametrize(
    "labels",
    [[1, 4, 10], [1, -1, 4], [1, "x", 4], [1, "one", 4], [1, True, 4], [1, 4.0, 4], [1, None, 4], [1, [4], 4],
     [1, 4], [1, 4, 7, 7], []],
    ids=["index-10", "index--1", "name-x", "name-one", "bool", "float", "none", "list", "too-few", "too-many",
         "none-given"],
)
def test_bad_labels_raise_data_error_and_store_nothing(labels: list, pi4: Path, xy, tmp_path: Path) -> None:
    x, _ = xy
    svc = make_service(tmp_path, pi4)
    try:
        svc.add_samples(x[:2], [1, 4])
        with pytest.raises(DataError) as exc:
            svc.add_samples(x[2:5], labels)
        assert exc.value.message
        assert svc.store.count() == 2 and svc.store.last_id() == 2
    finally:
        svc.close()


def test_labels_may_be_indices_or_names(pi4: Path, xy, tmp_path: Path) -> None:
    x, _ = xy
    svc = make_service(tmp_path, pi4)
    try:
        out = svc.add_samples(x[:4], [1, "4", 7, "7"])
        assert (out["stored"], out["held"], out["training_started"]) == (4, 4, False)
        _, _, y = _all_samples(svc)
        assert y.tolist() == [1, 4, 7, 7]
    finally:
        svc.close()


def test_numpy_integer_labels_are_accepted(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4)
    try:
        svc.add_samples(x[:3], list(y[:3]))  # np.int64 elements
        svc.add_samples(x[3:5], [np.int32(4), np.uint8(7)])
        assert svc.store.count() == 5
        assert _all_samples(svc)[2].tolist() == [*y[:3].tolist(), 4, 7]
        for bad in (np.bool_(True), np.int64(10), np.float64(1.0)):
            with pytest.raises(DataError):
                svc.add_samples(x[:1], [bad])
        assert svc.store.count() == 5
    finally:
        svc.close()


# --- the sample store ----------------------------------------------------------------------------


def test_samples_survive_a_new_service_on_the_same_state_dir(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4)
    svc.add_samples(x[:30], y[:30].tolist())
    svc.add_samples(x[30:50], y[30:50].tolist())
    svc.close()

    again = make_service(tmp_path)  # no bundle: the installed one
    try:
        ids, xs, ys = _all_samples(again)
        assert ids.tolist() == list(range(1, 51))
        assert np.array_equal(xs, x[:50]) and np.array_equal(ys, y[:50])
        assert again.status()["samples"]["held"] == 50
    finally:
        again.close()


def test_capacity_evicts_the_oldest_and_keeps_the_newest(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4, max_samples=10)
    try:
        assert svc.add_samples(x[:8], y[:8].tolist())["held"] == 8
        assert svc.add_samples(x[8:16], y[8:16].tolist())["held"] == 10
        ids, xs, ys = _all_samples(svc)
        assert ids.tolist() == list(range(7, 17))
        assert np.array_equal(xs, x[6:16]) and np.array_equal(ys, y[6:16])
        # one batch larger than the capacity keeps its own newest samples
        assert svc.add_samples(x[16:31], y[16:31].tolist())["held"] == 10
        ids, xs, _ = _all_samples(svc)
        assert ids.tolist() == list(range(22, 32)) and np.array_equal(xs, x[21:31])
    finally:
        svc.close()
    again = make_service(tmp_path, max_samples=10)
    try:
        assert _all_samples(again)[0].tolist() == list(range(22, 32))
    finally:
        again.close()


def test_holdout_split_is_stable(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4, holdout_every=5)
    svc.add_samples(x[:23], y[:23].tolist())
    first = svc.store.holdout_set()
    train = svc.store.training_set()
    assert first.ids.tolist() == [5, 10, 15, 20]
    assert set(train.ids.tolist()) == set(range(1, 24)) - {5, 10, 15, 20}
    assert np.array_equal(first.x, x[[4, 9, 14, 19]])
    svc.close()

    again = make_service(tmp_path, holdout_every=5)
    try:
        assert np.array_equal(again.store.holdout_set().ids, first.ids)
        again.add_samples(x[23:40], y[23:40].tolist())
        later = again.store.holdout_set()
        assert later.ids.tolist() == [5, 10, 15, 20, 25, 30, 35, 40]  # earlier holdout samples stay holdout
        assert not set(later.ids.tolist()) & set(again.store.training_set().ids.tolist())
        assert again.status()["samples"]["holdout_every"] == 5
    finally:
        again.close()


# --- fine-tuning -----------------------------------------------------------------------------------


def test_train_now_keeps_a_delta_and_serves_the_new_generation(
    pi4: Path, xy, digits_bank: tuple[Path, BankInfo], tmp_path: Path
) -> None:
    x, y = xy
    manifest = BundleManifest.from_dict(json.loads((pi4 / "manifest.json").read_text()))
    digest = bundle_digest(pi4)
    svc = make_service(tmp_path, pi4, device_id="board-7")
    svc.add_samples(x, y.tolist())
    before = svc.predict(x[:50])
    result = svc.train_now()

    # the outbox holds one delta, whatever the gate decided
    pending = svc.outbox.pending()
    assert len(pending) == 1
    entry = Outbox.read(pending[0])
    assert entry.delta_id == result["delta_id"]
    meta = entry.meta
    assert meta["device_id"] == "board-7"
    assert meta["bank_id"] == manifest.bank_id == digits_bank[1].bank_id
    assert meta["bundle"] == digest and meta["local_generation"] == 0
    assert meta["accepted_locally"] is result["accepted"]
    assert meta["sample_count"] == result["samples"] == len(svc.store.training_set())
    versions = {p["part_id"]: p["version"] for p in [*manifest.modules, *manifest.fixed_parts]}
    assert meta["parts"] and set(meta["parts"]) <= set(manifest.training["trainable_parts"])
    bank = DirectoryBank(digits_bank[0])
    names: set[str] = set()
    for part_id, part in meta["parts"].items():
        assert part["base_version"] == versions[part_id]
        bank_tensors = bank.read_part(part_id, part["base_version"])
        for name in part["params"]:
            assert not name.startswith("net.")
            assert name in bank_tensors, (part_id, name)
            assert entry.tensors[name].shape == bank_tensors[name].shape
        names |= set(part["params"])
    assert set(entry.tensors) == names
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in entry.tensors.values())
    assert any(np.abs(t).max() > 0 for t in entry.tensors.values())  # training moved something
    for key in ("holdout_before", "holdout_after", "loss_first", "loss_last", "steps"):
        assert meta["metrics"][key] is not None and math.isfinite(meta["metrics"][key]), key
    assert meta["metrics"]["steps"] == result["steps"] > 0
    print(f"\nfine-tuning: holdout {result['holdout_before']:.3f} -> {result['holdout_after']:.3f}, "
          f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}, accepted {result['accepted']}")

    pointer = json.loads((tmp_path / "current.json").read_text())
    if result["accepted"]:
        assert result["holdout_after"] >= result["holdout_before"]
        assert result["generation"] == 1 and svc.serving.generation == 1
        assert pointer == {"bundle": digest, "generation": 1}
        assert generation_problems(tmp_path, 1) == []
        info = json.loads((tmp_path / "gens" / "000001" / "generation.json").read_text())
        assert info["parent"] == 0 and info["delta_id"] == entry.delta_id and info["bundle"] == digest
    else:
        assert svc.serving.generation == 0 and pointer == {"bundle": digest, "generation": 0}
    after = svc.predict(x[:50])
    assert after["generation"] == pointer["generation"]
    assert svc.status()["samples"]["new_since_training"] == 0
    assert svc.status()["training"]["last"]["delta_id"] == entry.delta_id
    svc.close()

    # a restart without --bundle serves the same generation with the same weights
    again = make_service(tmp_path)
    try:
        assert again.serving.generation == pointer["generation"] and again.serving.digest == digest
        restarted = again.predict(x[:50])
        assert restarted["generation"] == pointer["generation"]
        assert np.allclose(restarted["probabilities"], after["probabilities"], atol=1e-6)
        if result["accepted"]:
            assert not np.allclose(after["probabilities"], before["probabilities"], atol=1e-6)
        assert again.status()["samples"]["new_since_training"] == 0
    finally:
        again.close()
    # and so does a restart that names the same bundle again
    third = make_service(tmp_path, pi4)
    try:
        assert third.serving.generation == pointer["generation"]
    finally:
        third.close()


def test_holdout_gate_keeps_a_worse_model_out_of_service(pi4: Path, xy, tmp_path: Path) -> None:
    """Label noise in the training share only: the fine-tuned model gets worse on the (clean) holdout."""
    x, y = xy
    ids = np.arange(1, len(y) + 1)  # a fresh store numbers samples from 1
    holdout = ids % 5 == 0
    permute = {1: 4, 4: 7, 7: 1}
    noisy = np.where(holdout, y, [permute[int(v)] for v in y])
    svc = make_service(tmp_path, pi4, holdout_every=5, epochs=4)
    try:
        svc.add_samples(x, noisy.tolist())
        assert np.array_equal(svc.store.holdout_set().y, y[holdout])
        before = svc.predict(x[:20])
        result = svc.train_now()
        print(f"\nnoisy fine-tuning: holdout {result['holdout_before']:.3f} -> {result['holdout_after']:.3f}")
        assert result["accepted"] is False
        assert result["holdout_after"] < result["holdout_before"]
        assert "holdout" in result["reason"]
        assert svc.serving.generation == 0
        assert json.loads((tmp_path / "current.json").read_text())["generation"] == 0
        assert not [p for p in (tmp_path / "gens").iterdir()]  # nothing committed, no temporaries left
        assert np.allclose(svc.predict(x[:20])["probabilities"], before["probabilities"], atol=1e-6)
        pending = svc.outbox.pending()
        assert len(pending) == 1
        meta = Outbox.read(pending[0]).meta
        assert meta["accepted_locally"] is False
        assert meta["metrics"]["holdout_before"] == pytest.approx(result["holdout_before"])
        assert meta["metrics"]["holdout_after"] == pytest.approx(result["holdout_after"])
        assert meta["metrics"]["holdout_after"] < meta["metrics"]["holdout_before"]
        assert svc.status()["samples"]["new_since_training"] == 0
    finally:
        svc.close()


def test_too_few_samples_skip_the_run(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4, min_train_samples=16)
    try:
        svc.add_samples(x[:12], y[:12].tolist())
        result = svc.train_now()
        assert result["accepted"] is False and "needed" in result["reason"]
        assert len(svc.outbox) == 0 and svc.serving.generation == 0
        assert svc.status()["samples"]["new_since_training"] == 12
    finally:
        svc.close()


def test_train_every_samples_starts_a_background_run(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, pi4, train_every_samples=32)
    try:
        assert svc.add_samples(x[:31], y[:31].tolist())["training_started"] is False
        assert svc.last_training is None and not svc.training_now
        assert svc.add_samples(x[31:32], y[31:32].tolist())["training_started"] is True
        last = svc.wait_for_training(timeout=120)
        assert last is not None and not svc.training_now
        assert last["trigger"] == "samples" and last.get("delta_id"), last
        assert len(svc.outbox) == 1
        assert svc.status()["samples"]["new_since_training"] == 0
        # fewer than 32 new samples since that run: no new run
        assert svc.add_samples(x[32:40], y[32:40].tolist())["training_started"] is False
    finally:
        svc.close()


def test_same_seed_and_samples_give_the_same_delta(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    deltas = []
    for i in range(2):
        if i:
            second = int(time.time())
            while int(time.time()) == second:  # the wall clock must not matter, so let it change
                time.sleep(0.01)
        svc = make_service(tmp_path / f"s{i}", pi4, seed=3)
        try:
            svc.add_samples(x[:120], y[:120].tolist())
            svc.train_now()
            deltas.append(Outbox.read(svc.outbox.pending()[0]).tensors)
        finally:
            svc.close()
    assert deltas[0].keys() == deltas[1].keys()
    assert all(np.array_equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


# --- a bundle without on-device training -------------------------------------------------------------


def test_inference_only_bundle_serves_and_stores_but_does_not_train(zero: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path, zero)
    try:
        assert svc.serving.trainable is False
        out = svc.predict(x[:10])
        assert np.allclose(np.asarray(out["probabilities"]).sum(axis=1), 1.0, atol=1e-4)
        out = svc.add_samples(x[:40], y[:40].tolist())
        assert (out["stored"], out["held"], out["training_started"]) == (40, 40, False)
        with pytest.raises(TrainingUnavailableError) as exc:
            svc.start_training("api")
        assert exc.value.hint and exc.value.exit_code == 18
        assert svc.status()["bundle"]["trainable"] is False and svc.status()["bundle"]["training_reason"]
        assert len(svc.outbox) == 0 and not svc.training_now
    finally:
        svc.close()
    again = make_service(tmp_path)
    try:
        assert again.store.count() == 40 and again.serving.digest == bundle_digest(zero)
    finally:
        again.close()


def test_inference_only_bundle_keeps_accepting_samples_when_auto_training_is_on(
    zero: Path, xy, tmp_path: Path
) -> None:
    x, y = xy
    svc = make_service(tmp_path, zero, train_every_samples=8)
    try:
        out = svc.add_samples(x[:10], y[:10].tolist())
        assert out["stored"] == 10 and out["training_started"] is False
        assert svc.store.count() == 10 and not svc.training_now and svc.last_training is None
    finally:
        svc.close()


def test_train_now_on_an_inference_only_bundle_raises_training_unavailable(
    zero: Path, xy, tmp_path: Path
) -> None:
    x, y = xy
    svc = make_service(tmp_path, zero)
    try:
        svc.add_samples(x[:40], y[:40].tolist())
        with pytest.raises(TrainingUnavailableError):
            svc.train_now()
    finally:
        svc.close()


@pytest.mark.parametrize("source", ["override", "env", "toml"])
def test_drift_can_be_switched_off(source: str, tmp_path: Path) -> None:
    if source == "override":
        cfg = load_config(overrides={"drift": False}, environ={})
    elif source == "env":
        cfg = load_config(environ={"ECLM_EDGE_DRIFT": "false"})
    else:
        (tmp_path / "edge.toml").write_text("[edge]\ndrift = false\n")
        cfg = load_config(tmp_path / "edge.toml", environ={})
    assert cfg.drift is False

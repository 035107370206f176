"""Training on the device with plain ONNX Runtime: the step graph, shared weights, honest refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_edge_support import EdgeServer, make_service

from eclm.errors import TrainingUnavailableError
from eclm.manifest import MANIFEST, hash_files, read_manifest, write_manifest
from eclm.tensors import read_tensors
from edge_runtime.state import PARAMS


def _rewrite_manifest(bundle: Path, edit) -> None:
    """Edit the manifest's training section and re-hash the files (the bundle is unsigned)."""
    manifest = read_manifest(bundle)
    edit(manifest.training)
    manifest.files = hash_files(bundle)
    (bundle / MANIFEST).unlink()
    write_manifest(bundle, manifest)


def _unloadable_step(src: Path, dst: Path) -> Path:
    """The pi4 bundle with a step graph this ONNX Runtime refuses (an IR version from the future)."""
    shutil.copytree(src, dst)
    path = dst / "training" / "train_step.onnx"
    model = onnx.load(str(path))
    model.ir_version = 99
    onnx.save(model, str(path))
    _rewrite_manifest(dst, lambda t: None)
    return dst


def _no_step(src: Path, dst: Path) -> Path:
    """The pi4 bundle as an exporter without step graphs wrote it: training available, no `step`."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "training")
    _rewrite_manifest(dst, lambda t: (t.pop("step"), t.update(folder=None)))
    return dst


@pytest.mark.parametrize("variant", ["unloadable-step", "no-step"])
def test_a_bundle_that_cannot_train_here_is_refused_with_its_reason(
    variant: str, pi4: Path, xy, tmp_path: Path
) -> None:
    bundle = (_unloadable_step if variant == "unloadable-step" else _no_step)(pi4, tmp_path / "bundle")
    svc = make_service(tmp_path / "state", bundle)
    try:
        assert svc.serving.trainable is False
        reason = svc.status()["bundle"]["training_reason"]
        assert ("does not load in this ONNX Runtime" if variant == "unloadable-step" else "re-export") in reason
        assert svc.status()["bundle"]["trainable"] is False
        svc.add_samples(xy[0][:40], xy[1][:40].tolist())
        with pytest.raises(TrainingUnavailableError, match="cannot train on the device"):
            svc.start_training("api")
        with pytest.raises(TrainingUnavailableError):
            svc.train_now()
        assert svc.last_training is None and svc.predict(xy[0][:3])["generation"] == 0
    finally:
        svc.close()


def test_post_train_answers_409_with_the_reason_for_an_unloadable_step_graph(pi4: Path, xy, tmp_path: Path) -> None:
    bundle = _unloadable_step(pi4, tmp_path / "bundle")
    srv = EdgeServer(tmp_path / "state", bundle).start()
    try:
        status = srv.request("GET", "/v1/status").json()
        assert status["bundle"]["trainable"] is False
        assert "does not load in this ONNX Runtime" in status["bundle"]["training_reason"]
        r = srv.request("POST", "/v1/samples", {"inputs": xy[0][:40].reshape(40, -1).tolist(),
                                                "labels": xy[1][:40].tolist()})
        assert r.status == 200 and r.json()["training_started"] is False
        r = srv.request("POST", "/v1/train")
        assert r.status == 409, r.body
        assert "does not load in this ONNX Runtime" in r.json()["error"]
        assert srv.request("GET", "/v1/status").json()["training"]["last"] is None  # no run started and failed
        assert srv.request("POST", "/v1/predict", {"inputs": xy[0][:2].reshape(2, -1).tolist()}).status == 200
    finally:
        srv.stop()


def test_a_run_never_writes_the_serving_arrays(pi4: Path, xy, tmp_path: Path) -> None:
    """The step reads the serving arrays and writes its own buffers: whatever the run learns, the model
    that serves during the run (and after it, if the run is not accepted) keeps its values."""
    from edge_runtime.store import Batch
    from edge_runtime.trainer import TrainSettings, run_training

    svc = make_service(tmp_path / "state", pi4)
    try:
        serving = svc.serving
        snapshot = {n: a.copy() for n, a in serving.weights.items()}
        x, y = xy[0][:64], xy[1][:64]
        train, holdout = Batch(x, y, np.arange(1, 65)), Batch(x[:0], y[:0], np.arange(0))
        outcome, deltas, trained = run_training(serving, train, holdout, TrainSettings(2, 16, 1e-3))
        assert outcome.steps == 8 and deltas
        assert set(trained) == set(serving.manifest.training["trainable_params"])
        for name, array in serving.weights.items():
            np.testing.assert_array_equal(array, snapshot[name])
            assert name not in trained or trained[name] is not array
        assert any(not np.array_equal(trained[n], snapshot[n]) for n in trained)
    finally:
        svc.close()


def test_a_new_generation_shares_the_unchanged_arrays_and_stores_the_changed_ones(pi4: Path, tmp_path: Path) -> None:
    """One set of arrays: a module update (here the head at its current values: never worse, so applied)
    makes a generation whose session reads the very arrays of its parent for everything it did not change,
    and whose folder stores only what changed (safetensors)."""
    svc = make_service(tmp_path / "state", pi4)
    try:
        before = svc.serving
        head = next(p for p in before.manifest.fixed_parts if p["part_id"] == "head")
        values = {n.removeprefix("net."): before.weights[n].copy() for n in head["params"]}
        result = svc.apply_module_update({"head": before.module_versions["head"] + 1}, values)
        assert result["applied"] is True, result
        after = svc.serving
        assert after.generation == result["generation"] and after.changed == frozenset(head["params"])
        for name, array in before.weights.items():
            if name not in head["params"]:
                assert after.weights[name] is array  # shared, not copied
        folder = tmp_path / "state" / "gens" / f"{after.generation:06d}"
        assert sorted(p.name for p in folder.iterdir()) == ["generation.json", PARAMS]
        stored = read_tensors(folder / PARAMS)
        assert set(stored) == set(head["params"])
        for name, value in stored.items():
            np.testing.assert_array_equal(value, after.weights[name])
        assert set(json.loads((folder / "generation.json").read_text())["files"]) == {PARAMS}
    finally:
        svc.close()


def test_the_step_graph_is_loaded_once_per_bundle(pi4: Path, tmp_path: Path, monkeypatch) -> None:
    """The check that the step graph loads runs when a bundle is opened, not for each generation or variant."""
    import edge_runtime.generations as service_module

    calls: list[str] = []
    real = service_module.open_runner

    def counting(serving):
        calls.append(serving.digest)
        return real(serving)

    monkeypatch.setattr(service_module, "open_runner", counting)
    svc = make_service(tmp_path / "state", pi4)
    try:
        assert svc.serving.trainable and len(calls) == 1
        svc.variants()
        svc.install_bundle(pi4)
        assert len(calls) == 1
    finally:
        svc.close()


def test_a_generation_serves_exactly_the_values_it_holds(pi4: Path, xy, tmp_path: Path) -> None:
    """Parameters handed to the session replace the file's everywhere, also where ONNX Runtime would fold
    them into constants (a BatchNorm scale is weight * rsqrt(var + eps)): the session answers like a model
    file holding the same values."""
    from onnx import numpy_helper

    from eclm.onnx_weights import read_initializers
    from edge_runtime.model import ServingModel

    weights = read_initializers(pi4 / "model.onnx")
    rng = np.random.default_rng(0)
    changed = {n: (a * rng.uniform(0.5, 1.5, a.shape)).astype(np.float32) for n, a in weights.items()
               if n.startswith("net.") and n.endswith(("bn.weight", "bn.bias", "conv.weight", "fc.weight"))}
    model = onnx.load(str(pi4 / "model.onnx"))
    for t in model.graph.initializer:
        if t.name in changed:
            t.CopyFrom(numpy_helper.from_array(changed[t.name], t.name))
    onnx.save(model, str(tmp_path / "baked.onnx"))
    manifest = read_manifest(pi4)
    x = xy[0][:32]
    baked = ort.InferenceSession(str(tmp_path / "baked.onnx"), providers=["CPUExecutionProvider"])
    expected = baked.run(["logits"], {"input": x})[0]  # plain ONNX Runtime, default options, values in the file
    handed = ServingModel(manifest, pi4, "handed", 1, pi4 / "model.onnx", {**weights, **changed}, frozenset(changed))
    bundle = ServingModel(manifest, pi4, "bundle", 0, pi4 / "model.onnx", weights)
    assert float(np.max(np.abs(bundle.logits(x) - expected))) > 1e-2  # the change matters
    np.testing.assert_allclose(handed.logits(x), expected, atol=1e-4)

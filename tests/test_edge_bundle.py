"""Bundle and generation integrity on the device: tampered bundles are refused, the last good model serves."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_edge_support import copy_bundle, flip_byte, generation_problems, make_service, temporaries

from eclm.errors import BundleError
from eclm.manifest import BundleManifest, bundle_digest, verify_bundle
from eclm.onnx_weights import read_initializers
from edge_runtime.model import ServingModel
from edge_runtime.state import PARAMS, read_params

Bundles = dict[str, tuple[Path, BundleManifest]]


def _edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


TAMPERS: dict[str, Callable[[Path], None]] = {
    "model-byte": lambda b: flip_byte(b / "model.onnx"),
    "model-first-byte": lambda b: flip_byte(b / "model.onnx", 0),
    "step-graph-byte": lambda b: flip_byte(b / "training" / "train_step.onnx"),
    "model-truncated": lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:-1]),
    "selector-missing": lambda b: (b / "selector.onnx").unlink(),
    "extra-file": lambda b: (b / "training" / "extra.onnx").write_bytes(b"\x00"),
    "manifest-garbage": lambda b: (b / "manifest.json").write_text("{not json"),
    "manifest-missing": lambda b: (b / "manifest.json").unlink(),
    "manifest-hash-edited": lambda b: _edit_manifest(b, lambda d: d["files"].update({"model.onnx": "0" * 64})),
    "manifest-no-files": lambda b: _edit_manifest(b, lambda d: d.update(files={})),
    "manifest-path-escape": lambda b: _edit_manifest(b, lambda d: d["files"].update({"../x": "0" * 64})),
    "manifest-schema": lambda b: _edit_manifest(b, lambda d: d.update(schema_version=99)),
}


def _state_is_untouched(state: Path) -> None:
    assert not (state / "current.json").exists()
    assert list((state / "bundles").iterdir()) == []  # no copy, no half-written temporary


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_bundle_is_refused_on_an_empty_state_dir(tamper: str, pi4: Path, tmp_path: Path) -> None:
    bad = copy_bundle(pi4, tmp_path / "bundle")
    TAMPERS[tamper](bad)
    with pytest.raises(BundleError) as exc:
        make_service(tmp_path / "state", bad)
    assert exc.value.exit_code == 14 and exc.value.message
    _state_is_untouched(tmp_path / "state")


def test_nothing_to_serve_without_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as exc:
        make_service(tmp_path / "state")
    assert "--bundle" in (exc.value.hint or "")


def test_a_tampered_installed_copy_is_refused_when_nothing_else_is_installed(pi4: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_service(state, pi4).close()
    installed = state / "bundles" / bundle_digest(pi4)
    verify_bundle(installed)
    flip_byte(installed / "model.onnx")
    with pytest.raises(BundleError):
        make_service(state)


def test_a_damaged_installed_copy_is_repaired_from_the_intact_source(pi4: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_service(state, pi4).close()
    flip_byte(state / "bundles" / bundle_digest(pi4) / "model.onnx")
    svc = make_service(state, pi4)
    try:
        assert svc.serving.digest == bundle_digest(pi4)
        verify_bundle(state / "bundles" / bundle_digest(pi4))
    finally:
        svc.close()


def _trained_state(state: Path, bundle: Path, xy: tuple[np.ndarray, np.ndarray], generations: int) -> None:
    """Fine-tune until ``generations`` generations were accepted (a run may be rejected; then retry)."""
    x, y = xy
    svc = make_service(state, bundle)
    svc.add_samples(x, y.tolist())
    svc.close()
    for seed in range(8):
        svc = make_service(state, seed=seed)
        try:
            if svc.serving.generation >= generations:
                return
            svc.train_now()
        finally:
            svc.close()
    pytest.fail(f"fewer than {generations} fine-tuning runs passed the holdout gate in 8 tries")


@pytest.mark.parametrize("tampered", ["other-bundle", "same-bundle"])
def test_a_tampered_bundle_argument_keeps_the_previous_one_serving(
    tampered: str, pi4: Path, zero: Path, xy, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    _trained_state(state, pi4, xy, generations=1)
    pointer = (state / "current.json").read_text()
    svc = make_service(state)
    expected = svc.predict(xy[0][:20])
    svc.close()

    bad = copy_bundle(zero if tampered == "other-bundle" else pi4, tmp_path / "bad")
    flip_byte(bad / "model.onnx")
    svc = make_service(state, bad)
    try:
        assert svc.serving.digest == bundle_digest(pi4) and svc.serving.generation == 1
        out = svc.predict(xy[0][:20])
        assert out["bundle"] == bundle_digest(pi4) and out["generation"] == 1
        assert np.allclose(out["probabilities"], expected["probabilities"], atol=1e-6)
        assert b"eclm_edge_bundle_rejections_total 1.0" in svc.metrics.render()
        assert (state / "current.json").read_text() == pointer
        assert sorted(p.name for p in (state / "bundles").iterdir()) == [bundle_digest(pi4)]
    finally:
        svc.close()


def test_install_bundle_refuses_a_tampered_bundle_and_swaps_in_a_good_one(
    pi4: Path, zero: Path, xy, tmp_path: Path
) -> None:
    x, y = xy
    state = tmp_path / "state"
    svc = make_service(state, pi4)
    try:
        svc.add_samples(x[:30], y[:30].tolist())
        pointer = (state / "current.json").read_text()
        bad = copy_bundle(zero, tmp_path / "bad")
        flip_byte(bad / "selector.onnx")
        with pytest.raises(BundleError):
            svc.install_bundle(bad)
        assert svc.serving.digest == bundle_digest(pi4) and svc.serving.trainable
        assert svc.predict(x[:3])["bundle"] == bundle_digest(pi4)
        assert (state / "current.json").read_text() == pointer
        assert sorted(p.name for p in (state / "bundles").iterdir()) == [bundle_digest(pi4)]

        swapped = svc.install_bundle(zero)
        assert swapped == {"bundle": bundle_digest(zero), "generation": 0}
        assert svc.serving.digest == bundle_digest(zero) and not svc.serving.trainable
        assert svc.predict(x[:3])["bundle"] == bundle_digest(zero)
        assert svc.store.count() == 30  # the samples stay
    finally:
        svc.close()
    assert temporaries(state) == []
    again = make_service(state)
    try:
        assert again.serving.digest == bundle_digest(zero) and again.store.count() == 30
    finally:
        again.close()


@pytest.fixture(scope="module")
def two_generations(pi4: Path, xy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list]]:
    """A state dir serving generation 2 (parent 1, grandparent the bundle) and each generation's predictions."""
    state = tmp_path_factory.mktemp("two-gens") / "state"
    _trained_state(state, pi4, xy, generations=2)
    assert json.loads((state / "gens" / "000002" / "generation.json").read_text())["parent"] == 1
    probs: dict[int, list] = {}
    for gen in (0, 1, 2):
        weights = read_initializers(pi4 / "model.onnx")
        if gen:  # a generation holds only the parameters it changed; the rest are the bundle's
            weights.update(read_params(state / "gens" / f"{gen:06d}", weights))
        manifest = BundleManifest.from_dict(json.loads((pi4 / "manifest.json").read_text()))
        model = ServingModel(manifest, pi4, bundle_digest(pi4), gen, pi4 / "model.onnx", weights)
        probs[gen] = model.predict(xy[0][:20]).tolist()
    return state, probs


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "params-byte": lambda g: flip_byte(g / PARAMS),
    "params-missing": lambda g: (g / PARAMS).unlink(),
    "params-truncated": lambda g: (g / PARAMS).write_bytes(b""),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupted_generation_falls_back_to_its_parent(
    corruption: str, two_generations: tuple[Path, dict[int, list]], pi4: Path, xy, tmp_path: Path
) -> None:
    source, probs = two_generations
    state = tmp_path / "state"
    shutil.copytree(source, state)
    CORRUPTIONS[corruption](state / "gens" / "000002")
    assert generation_problems(state, 2) != []

    svc = make_service(state, pi4)
    try:
        assert svc.serving.generation == 1
        out = svc.predict(xy[0][:20])
        assert out["generation"] == 1
        assert np.allclose(out["probabilities"], probs[1], atol=1e-5)
        assert svc.serving.trainable  # the parent's parameters start the next run
    finally:
        svc.close()

    # the parent corrupted as well: the bundle's own weights serve
    CORRUPTIONS[corruption](state / "gens" / "000001")
    svc = make_service(state)
    try:
        assert svc.serving.generation == 0
        out = svc.predict(xy[0][:20])
        assert np.allclose(out["probabilities"], probs[0], atol=1e-5)
    finally:
        svc.close()


def test_an_unreadable_generation_record_is_never_served(
    two_generations: tuple[Path, dict[int, list]], xy, tmp_path: Path
) -> None:
    source, probs = two_generations
    state = tmp_path / "state"
    shutil.copytree(source, state)
    (state / "gens" / "000002" / "generation.json").write_text("{")
    svc = make_service(state)
    try:
        # the record holds the parent's number, so the runtime cannot know it and falls back further
        assert svc.serving.generation in (0, 1)
        out = svc.predict(xy[0][:20])
        assert np.allclose(out["probabilities"], probs[svc.serving.generation], atol=1e-5)
    finally:
        svc.close()


def test_a_generation_of_another_bundle_is_not_served(
    two_generations: tuple[Path, dict[int, list]], pi4: Path, xy, tmp_path: Path
) -> None:
    source, probs = two_generations
    state = tmp_path / "state"
    shutil.copytree(source, state)
    record = state / "gens" / "000002" / "generation.json"
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "bundle": "0" * 16}))  # files still verify; the owner differs
    svc = make_service(state)
    try:
        assert svc.serving.generation == 1
        assert np.allclose(svc.predict(xy[0][:20])["probabilities"], probs[1], atol=1e-5)
    finally:
        svc.close()

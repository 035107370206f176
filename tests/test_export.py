"""Bundles for every registered profile: verification, budgets, ONNX Runtime against PyTorch,
the training step graph, tampering, and the accuracy the demo reports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _eclm_testutil import DEVICE_CLASSES, comparable_pairs

from device_profiles import available_profiles, load_profile
from eclm.errors import BundleError, ExportValidationError
from eclm.manifest import MANIFEST, hash_files, read_manifest, verify_bundle
from eclm.onnx_weights import read_initializers
from eclm.train_step import STEP_FILE, StepRunner
from exporter.modular import ModularNet, SubModel
from exporter.onnx_export import Normalised
from exporter.torchio import model_from_bank
from exporter.validate import compare_outputs, within_tolerance
from module_bank import DirectoryBank

PROFILES = available_profiles()
TRAINING_PROFILES = [n for n in PROFILES if load_profile(n).ort_training]
INFERENCE_ONLY_PROFILES = [n for n in PROFILES if not load_profile(n).ort_training]
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def cloud_model(digits_bank) -> ModularNet:
    return model_from_bank(DirectoryBank(digits_bank[0]))


@pytest.fixture(scope="module")
def check_inputs(digits_splits) -> np.ndarray:
    """Raw pool samples (never seen by the exporter's own check) and uniform noise over the value range."""
    pool = digits_splits.pool.x[::20][:48]
    noise = np.random.default_rng(123).uniform(0.0, 16.0, size=(16, 1, 8, 8))
    return np.concatenate([pool, noise]).astype(np.float32)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _normalise(x: np.ndarray, info_norm: dict[str, list[float]]) -> torch.Tensor:
    mean = torch.tensor(info_norm["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(info_norm["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
    return (torch.from_numpy(x) - mean) / std


def _copy_bundle(digits_bundles, name: str, dst: Path) -> Path:
    shutil.copytree(digits_bundles[name][0], dst)
    return dst


# --- every bundle -----------------------------------------------------------------------------


def test_a_bundle_per_profile(digits_bundles) -> None:
    assert sorted(digits_bundles) == PROFILES
    assert INFERENCE_ONLY_PROFILES == ["pi-zero-2w"]


@pytest.mark.parametrize("name", PROFILES)
def test_bundle_verifies(name: str, digits_bundles, digits_bank) -> None:
    out_dir, manifest = digits_bundles[name]
    verified = verify_bundle(out_dir)
    assert verified.to_dict() == manifest.to_dict() == read_manifest(out_dir).to_dict()
    assert manifest.kind == "eclm-bundle" and manifest.schema_version == 2
    assert manifest.bank_id == digits_bank[1].bank_id
    assert manifest.config == "digits"
    assert manifest.profile["name"] == name
    assert manifest.derived_for == {"source": "classes", "classes": DEVICE_CLASSES}
    assert manifest.labels == [str(i) for i in range(10)]


@pytest.mark.parametrize("name", PROFILES)
def test_manifest_lists_every_file_with_sha256(name: str, digits_bundles) -> None:
    out_dir, manifest = digits_bundles[name]
    on_disk = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert sorted([*manifest.files, MANIFEST]) == on_disk
    assert {"model.onnx", "selector.onnx"} <= set(manifest.files)
    for rel, digest in manifest.files.items():
        assert SHA256.match(digest), rel
    assert manifest.files == hash_files(out_dir)
    # No leftovers of the atomic publish next to the bundle.
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("name", PROFILES)
def test_within_budget_all_ok(name: str, digits_bundles) -> None:
    _, manifest = digits_bundles[name]
    profile = load_profile(name)
    checks = manifest.costs["within_budget"]
    expected = {"memory_bytes", "transfer_bytes", "flops", "latency_ms_estimated_on_board"}
    if manifest.training["available"]:
        expected.add("training_memory_bytes")
    assert set(checks) == expected
    bad = {k: v for k, v in checks.items() if not v["ok"] or v["value"] > v["budget"]}
    assert not bad, bad
    assert checks["memory_bytes"]["budget"] == profile.memory_budget_bytes
    assert checks["flops"]["budget"] == profile.flops_budget
    measured = manifest.costs["measured"]
    assert measured["inference_memory_bytes"] > 0 and measured["model_bytes"] > 0
    assert "torch_imported" not in measured
    est = manifest.costs["estimated"]
    for dim, budget in manifest.costs["budgets"].items():
        assert est[dim] <= budget, dim


@pytest.mark.parametrize("name", PROFILES)
def test_onnx_matches_pytorch_submodel(
    name: str, digits_bundles, digits_bank, cloud_model, check_inputs
) -> None:
    out_dir, manifest = digits_bundles[name]
    _, info = digits_bank
    sub = SubModel(cloud_model, manifest.selection).eval()
    with torch.no_grad():
        expected = sub(_normalise(check_inputs, info.normalisation)).numpy()
    got = _session(out_dir / "model.onnx").run(["logits"], {"input": check_inputs})[0]
    assert got.shape == (len(check_inputs), 10)
    diff = float(np.max(np.abs(got - expected)))
    assert within_tolerance(expected, got), f"ONNX Runtime vs PyTorch: max abs difference {diff:.3g}"
    assert np.isfinite(manifest.validation["model.onnx"]["logits"])


@pytest.mark.parametrize("name", PROFILES)
def test_selector_onnx_matches_cloud_selector(
    name: str, digits_bundles, digits_bank, cloud_model, check_inputs
) -> None:
    out_dir, manifest = digits_bundles[name]
    outputs = manifest.selector["outputs"]
    assert manifest.selector["top_k"] == cloud_model.cfg.top_k
    got = _session(out_dir / manifest.selector["file"]).run(outputs, {"input": check_inputs})
    with torch.no_grad():
        expected = cloud_model.selector(_normalise(check_inputs, digits_bank[1].normalisation)).probs
    assert len(got) == len(expected) == len(cloud_model.cfg.layers)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == tuple(e.shape)
        assert within_tolerance(e.numpy(), g)


@pytest.mark.parametrize("name", PROFILES)
def test_manifest_describes_the_selection(name: str, digits_bundles, digits_bank) -> None:
    _, manifest = digits_bundles[name]
    _, info = digits_bank
    listed = [(m["layer"], m["index"]) for m in manifest.modules]
    assert listed == [(la, i) for la, idx in enumerate(manifest.selection) for i in idx]
    for m in manifest.modules:
        assert m["part_id"] == f"L{m['layer']}M{m['index']}"
        assert m["version"] == info.parts[m["part_id"]].version == 1
    gates = {f["part_id"]: f for f in manifest.fixed_parts if f["part_id"].startswith("selector.gate")}
    for layer, idx in enumerate(manifest.selection):
        assert gates[f"selector.gate{layer}"]["rows"] == idx
    # Importance was derived from classes 1, 4, 7: the most important module of each layer is in.
    for layer, row in enumerate(manifest.importance):
        assert int(np.argmax(row)) in manifest.selection[layer]
        assert sum(row) == pytest.approx(1.0, abs=1e-5)


# --- on-device training ------------------------------------------------------------------------


@pytest.mark.parametrize("name", INFERENCE_ONLY_PROFILES)
def test_no_training_for_profiles_without_ort_training(name: str, digits_bundles) -> None:
    out_dir, manifest = digits_bundles[name]
    assert manifest.training["available"] is False
    assert manifest.training["reason"] and name in manifest.training["reason"]
    assert manifest.training["folder"] is None and manifest.training["trainable_parts"] == []
    assert not (out_dir / "training").exists()
    assert not any(rel.startswith("training/") for rel in manifest.files)
    assert not any(m["trainable"] for m in manifest.modules + manifest.fixed_parts)


def _runner(out_dir: Path, manifest) -> tuple[StepRunner, dict[str, np.ndarray]]:
    weights = read_initializers(out_dir / "model.onnx")
    return StepRunner(out_dir / manifest.training["step"], weights, manifest.training["trainable_params"]), weights


@pytest.mark.parametrize("name", TRAINING_PROFILES)
def test_training_step_loads_and_learns(name: str, digits_bundles, device_batch) -> None:
    out_dir, manifest = digits_bundles[name]
    training = manifest.training
    assert training["available"] is True and training["reason"] == ""
    assert training["folder"] == "training" and training["step"] == f"training/{STEP_FILE}"
    assert training["step"] in manifest.files and (out_dir / training["step"]).is_file()
    assert sorted(p.name for p in (out_dir / "training").iterdir()) == [STEP_FILE]  # no ORT training artifacts
    assert training["optimizer"]["name"] == "adamw"
    parts = training["trainable_parts"]
    assert parts[0] == "head"
    assert not [p for p in parts if p in ("stem", "selector.embed") or p.startswith("selector.gate")]
    assert training["estimated_bytes"] <= training["budget_bytes"] == load_profile(name).training_budget_bytes
    check = manifest.validation["training"]
    assert check["steps"] == 10 and check["gradients"] < 1e-5 and check["loss"] < 1e-5

    runner, _ = _runner(out_dir, manifest)
    x_all, y_all = device_batch
    batch = int(training["batch_size"])
    x, y = x_all[:batch], y_all[:batch]
    # The step's forward pass is the serving graph.
    first, logits = runner.step_with_logits(x, y, float(training["learning_rate"]))
    ref = _session(out_dir / "model.onnx").run(["logits"], {"input": x})[0]
    assert within_tolerance(ref, logits)
    losses = [first] + [runner.step(x, y, float(training["learning_rate"])) for _ in range(9)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", TRAINING_PROFILES[:1])
def test_the_weights_reader_matches_onnx(name: str, digits_bundles) -> None:
    """The torch- and onnx-free reader the device uses returns every initializer, value for value."""
    import onnx
    from onnx import numpy_helper

    out_dir, manifest = digits_bundles[name]
    for rel in ("model.onnx", manifest.training["step"], "selector.onnx"):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out_dir / rel)).graph.initializer}
        got = read_initializers(out_dir / rel)
        assert set(got) == set(inits), rel
        for key, value in inits.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, (rel, key)
            np.testing.assert_array_equal(got[key], value)


@pytest.mark.parametrize("name", TRAINING_PROFILES[:1])
def test_the_step_graph_holds_frozen_parts_as_constants(name: str, digits_bundles) -> None:
    """Trainable parameters are inputs; every other tensor of the model is an initializer of the same name
    and value (the device hands its serving arrays to both graphs)."""
    out_dir, manifest = digits_bundles[name]
    model = read_initializers(out_dir / "model.onnx")
    step = read_initializers(out_dir / manifest.training["step"])
    trainable = set(manifest.training["trainable_params"])
    assert set(step) == set(model) - trainable
    for key, value in step.items():
        np.testing.assert_array_equal(value, model[key])
    inputs = {i.name for i in _session(out_dir / manifest.training["step"]).get_inputs()}
    assert {n.removeprefix("param/") for n in inputs if n.startswith("param/")} == trainable
    assert not [n for n in inputs if n.endswith(("running_mean", "running_var"))]  # statistics stay frozen


@pytest.mark.parametrize("name", TRAINING_PROFILES[:1])
def test_training_updates_trainable_parts_only(name: str, digits_bundles, device_batch) -> None:
    """The step moves the head and the trainable modules; frozen parts (stem, selector) are constants."""
    out_dir, manifest = digits_bundles[name]
    runner, weights = _runner(out_dir, manifest)
    before = {n: a.copy() for n, a in weights.items()}
    x, y = device_batch[0][:16], device_batch[1][:16]
    for _ in range(3):
        runner.step(x, y, 1e-3)
    assert all(np.array_equal(weights[n], before[n]) for n in weights)  # the caller's arrays are only read
    changed = {n for n, a in runner.parameters().items() if not np.array_equal(a, before[n])}
    assert {"net.head.fc.weight", "net.head.fc.bias"} <= changed
    trainable_prefixes = ["net.head."] + [
        f"net.layers.{m['layer']}.mods.m{m['index']}." for m in manifest.modules if m["trainable"]
    ]
    assert all(n.startswith(tuple(trainable_prefixes)) for n in changed), sorted(changed)
    assert not [n for n in changed if n.startswith(("net.stem.", "net.selector.", "norm_"))]


@pytest.mark.parametrize("name", PROFILES)
def test_every_graph_uses_the_default_onnx_domain_only(name: str, digits_bundles) -> None:
    """Plain ONNX Runtime (any build, any board) runs every graph of every bundle: no custom or contrib ops."""
    import onnx

    out_dir, manifest = digits_bundles[name]
    graphs = [rel for rel in manifest.files if rel.endswith(".onnx")]
    assert {"model.onnx", "selector.onnx"} <= set(graphs)
    assert (manifest.training["step"] in graphs) is manifest.training["available"]
    for rel in graphs:
        model = onnx.load(str(out_dir / rel))
        domains = {n.domain for n in model.graph.node} | {o.domain for o in model.opset_import}
        assert domains <= {"", "ai.onnx"}, (rel, domains)
        assert not model.functions, rel


def _flip_a_gradient(src: Path, dst: Path) -> None:
    """Negate the output of the step graph's first ConvTranspose (an input gradient of a convolution):
    every gradient below it changes sign, the graph stays valid."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    out = node.output[0]
    node.output[0] = out + "_unflipped"
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index + 1, helper.make_node("Neg", [out + "_unflipped"], [out]))
    onnx.save(model, str(dst))


def test_the_export_check_catches_a_wrong_gradient(digits_bank, digits_bundles, device_batch, tmp_path) -> None:
    """The check the exporter runs on every step graph fails, with the export-check exit code, when one
    gradient in the graph has the wrong sign."""
    from exporter.step_graph import OptimizerSpec
    from exporter.validate import check_step

    out_dir, manifest = digits_bundles["pi4"]
    broken = tmp_path / "broken.onnx"
    _flip_a_gradient(out_dir / manifest.training["step"], broken)
    model = model_from_bank(DirectoryBank(digits_bank[0]))
    norm = digits_bank[1].normalisation
    sub = Normalised(SubModel(model, manifest.selection), norm["mean"], norm["std"]).eval()
    x, y = device_batch
    batches = [(x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]) for i in range(3)]
    opt = OptimizerSpec.from_dict(manifest.training["optimizer"])
    trainable = manifest.training["trainable_params"]
    good = check_step(out_dir / manifest.training["step"], sub, trainable, opt, batches, 1e-3)
    assert good["gradients"] < 1e-5
    with pytest.raises(ExportValidationError) as exc:
        check_step(broken, sub, trainable, opt, batches, 1e-3)
    assert exc.value.exit_code == 15
    assert "gradient of net." in exc.value.message


def test_eclm_export_exits_with_the_check_code_on_a_wrong_gradient(digits_bank, tmp_path, monkeypatch) -> None:
    """End to end: a step graph broken during the export makes `eclm-export` exit 15 and write no bundle."""
    from typer.testing import CliRunner

    import exporter.export as export_module
    from exporter.cli import app

    real = export_module.export_step

    def broken_export(*args, **kwargs) -> None:
        real(*args, **kwargs)
        path = args[3]
        _flip_a_gradient(path, path)

    monkeypatch.setattr(export_module, "export_step", broken_export)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["--bank", str(digits_bank[0]), "--profile", "pi4", "--out", str(out),
                                      "--classes", "1,4,7"])
    assert result.exit_code == 15, result.output
    assert "disagrees with PyTorch autograd" in result.output
    assert not out.exists()


# --- sizes across profiles ----------------------------------------------------------------------


def test_smaller_budgets_never_give_larger_submodels(digits_bundles) -> None:
    pairs = comparable_pairs(PROFILES)
    assert pairs
    for p, q in pairs:
        small = digits_bundles[p][1].costs["estimated"]["params"]
        large = digits_bundles[q][1].costs["estimated"]["params"]
        assert small <= large, f"{p} ({small} params) > {q} ({large} params)"


# --- tampering ---------------------------------------------------------------------------------


def test_flipped_byte_in_model_is_refused(digits_bundles, tmp_path: Path) -> None:
    bundle = _copy_bundle(digits_bundles, "pi4", tmp_path / "b")
    verify_bundle(bundle)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError) as exc:
        verify_bundle(bundle)
    assert "model.onnx does not match its sha256" in str(exc.value)
    assert "selector.onnx" not in str(exc.value)
    assert exc.value.hint and exc.value.exit_code == 14


def test_extra_unlisted_file_is_refused(digits_bundles, tmp_path: Path) -> None:
    bundle = _copy_bundle(digits_bundles, "pi4", tmp_path / "b")
    (bundle / "training" / "extra.bin").write_bytes(b"\0")
    with pytest.raises(BundleError, match=r"training/extra\.bin is not listed in the manifest"):
        verify_bundle(bundle)


def test_missing_file_is_refused(digits_bundles, tmp_path: Path) -> None:
    bundle = _copy_bundle(digits_bundles, "pi-zero-2w", tmp_path / "b")
    (bundle / "selector.onnx").unlink()
    with pytest.raises(BundleError, match=r"selector\.onnx is missing"):
        verify_bundle(bundle)


def _edit_manifest(bundle: Path, **changes: object) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    data.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(data))


def test_future_schema_version_is_refused(digits_bundles, tmp_path: Path) -> None:
    bundle = _copy_bundle(digits_bundles, "pi4", tmp_path / "b")
    _edit_manifest(bundle, schema_version=99)
    with pytest.raises(BundleError, match="schema version 99") as exc:
        verify_bundle(bundle)
    assert exc.value.hint


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"kind": "something-else"}, "not an ECLM bundle manifest"),
        ({"files": {"../outside.onnx": "0" * 64}}, "unsafe path"),
        ({"files": {}}, "lists no files"),
    ],
    ids=["wrong-kind", "unsafe-path", "no-files"],
)
def test_bad_manifests_are_refused(digits_bundles, tmp_path: Path, changes: dict, match: str) -> None:
    bundle = _copy_bundle(digits_bundles, "pi4", tmp_path / "b")
    _edit_manifest(bundle, **changes)
    with pytest.raises(BundleError, match=match):
        verify_bundle(bundle)


def test_missing_or_broken_manifest(digits_bundles, tmp_path: Path) -> None:
    bundle = _copy_bundle(digits_bundles, "pi4", tmp_path / "b")
    (bundle / MANIFEST).write_text("{")
    with pytest.raises(BundleError, match="unreadable"):
        verify_bundle(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(bundle)


# --- the exporter's own check ------------------------------------------------------------------


def test_compare_outputs_names_each_failing_output() -> None:
    ref: list[np.ndarray] = [np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32), np.zeros(4, np.float32),
                             np.zeros(2)]
    cand = [ref[0] + 5e-5, ref[1] + 0.25, ref[2] - np.array([0, 0, 0, 3.0], np.float32), np.zeros(3)]
    with pytest.raises(ExportValidationError) as exc:
        compare_outputs(["ok_out", "logits", "gate1", "shaped"], ref, cand)
    message = str(exc.value)
    assert "logits: max abs difference 0.25 (at one element 0.25 > 0.0011 allowed there" in message
    assert "gate1: max abs difference 3 (at one element 3 > 0.0001 allowed there" in message
    assert "shaped: shape (3,) != reference (2,)" in message
    assert "ok_out" not in message
    assert exc.value.exit_code == 15


def test_compare_outputs_passes_within_tolerance() -> None:
    ref = [np.linspace(-1, 1, 10, dtype=np.float32)]
    diffs = compare_outputs(["logits"], ref, [ref[0] + 1e-5])
    assert diffs["logits"] == pytest.approx(1e-5, rel=1e-2)
    with pytest.raises(ExportValidationError, match="nan_out"):
        compare_outputs(["nan_out"], ref, [ref[0] * np.nan])


def test_compare_outputs_fits_the_tolerance_to_the_outputs_scale() -> None:
    """Logits of an unseen data set: scale 30, float32 rounding 1.1e-4 (a fixed 1e-4 stopped the export)."""
    rng = np.random.default_rng(0)
    ref = (rng.normal(0, 10, (64, 10)).clip(-30, 30)).astype(np.float32)
    ref[0, 0] = 30.0
    noise = rng.uniform(-1.1e-4, 1.1e-4, ref.shape).astype(np.float32)
    assert compare_outputs(["logits"], [ref], [ref + noise])["logits"] > 1e-4
    # the bound: 1e-4 x 30 (the scale) + 1e-3 x |element| -- near zero only the first term counts
    near_zero = ref.copy()
    near_zero[1, 1] = 0.0
    ok = near_zero.copy()
    ok[1, 1] = 2.9e-3
    compare_outputs(["logits"], [near_zero], [ok])
    bad = near_zero.copy()
    bad[1, 1] = 3.1e-3
    with pytest.raises(ExportValidationError, match=r"0.0031 > 0.003 allowed there"):
        compare_outputs(["logits"], [near_zero], [bad])
    # relative: a large element may move by 1e-3 of itself on top
    bad = ref.copy()
    bad[0, 0] = 30.0 + 0.034
    with pytest.raises(ExportValidationError, match="logits"):
        compare_outputs(["logits"], [ref], [bad])
    ok = ref.copy()
    ok[0, 0] = 30.0 + 0.032
    compare_outputs(["logits"], [ref], [ok])


# --- accuracy ----------------------------------------------------------------------------------


def test_accuracy_of_bank_and_pi4_submodel(digits_bank, digits_bundles, device_batch) -> None:
    _, info = digits_bank
    bank_acc = float(info.metrics["test_accuracy"])
    x, y = device_batch
    logits = _session(digits_bundles["pi4"][0] / "model.onnx").run(["logits"], {"input": x})[0]
    sub_acc = float(np.mean(logits.argmax(axis=1) == y))
    print(
        f"\ndigits bank test accuracy: {bank_acc:.4f} on {info.metrics['test_samples']} held-out samples"
        f"\npi4 sub-model (ONNX Runtime) accuracy on classes {DEVICE_CLASSES} of the device pool: "
        f"{sub_acc:.4f} on {len(y)} samples"
    )
    assert bank_acc >= 0.9
    assert sub_acc >= 0.9

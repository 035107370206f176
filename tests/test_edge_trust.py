"""Bundles a device trusts: with a trust key only signed bundles made for it serve, the first one included.

Each attack is a real bundle altered on disk the way an attacker did it; `eclm-edge serve` and `eclm-edge
verify` run as real processes where the finding involved them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from _eclm_testutil import DEVICE_CLASSES, ROOT
from test_edge_support import EdgeServer, child_env, edge_command, free_port, make_service

from eclm.archive import tar_bundle
from eclm.errors import BundleError
from eclm.hashing import sha256_file
from eclm.manifest import MANIFEST, bundle_digest, read_manifest, write_manifest
from eclm.signing import generate_keys, load_signer, load_verifier
from exporter.export import ExportRequest, export_bundle

DEVICE = "dev1"
PASSWD = Path("/etc/passwd")


@dataclass(frozen=True)
class Cloud:
    """The cloud's keys and the signed bundles it made for device ``dev1``."""

    priv: Path
    pub: Path
    pi4: Path  # pi4, classes 1, 4, 7
    zero: Path  # pi-zero-2w: another profile
    newer: Path  # pi4, classes 0, 2, 3, issued after ``pi4``


@pytest.fixture(scope="module")
def cloud(digits_bank, tmp_path_factory: pytest.TempPathFactory) -> Cloud:
    bank_dir, _ = digits_bank
    root = tmp_path_factory.mktemp("cloud")
    priv, pub = generate_keys(root)

    def export(name: str, profile: str, classes: list[int]) -> Path:
        out = root / name
        export_bundle(ExportRequest(bank_dir, profile=profile, out_dir=out, classes=classes, measure=False,
                                    signing_key=priv, device_id=DEVICE))
        return out

    return Cloud(priv, pub, export("pi4", "pi4", DEVICE_CLASSES), export("zero", "pi-zero-2w", DEVICE_CLASSES),
                 export("newer", "pi4", [0, 2, 3]))


def _edit(bundle: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    edit(data)
    (bundle / MANIFEST).write_text(json.dumps(data, indent=2))


def _rehash(bundle: Path, rel: str) -> None:
    """What an attacker does after replacing a file: put its sha256 in the manifest (the signature stays)."""
    _edit(bundle, lambda d: d["files"].update({rel: sha256_file(bundle / rel)}))


def _resign(src: Path, dst: Path, cloud: Cloud, **changes: object) -> Path:
    """A copy of ``src`` with manifest fields changed and signed again with the cloud's own key."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    for key, value in changes.items():
        setattr(manifest, key, value)
    write_manifest(dst, manifest, load_signer(cloud.priv))
    return dst


def _labels_edited(b: Path, c: Cloud) -> None:
    _edit(b, lambda d: d.update(labels=list(reversed(d["labels"]))))


def _signature_swapped(b: Path, c: Cloud) -> None:
    signature = read_manifest(c.zero).signature
    _edit(b, lambda d: d.update(signature=signature))


def _signature_removed(b: Path, c: Cloud) -> None:
    _edit(b, lambda d: d.update(signature=None))


def _other_model_rehashed(b: Path, c: Cloud) -> None:
    """Another model in the same graph: every weight of the first initializer negated (different by
    construction; two exports for other classes can select the same modules and give the same file)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    before = sha256_file(b / "model.onnx")
    model = onnx.load(str(b / "model.onnx"))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).size > 1)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init) - np.float32(1), init.name))
    onnx.save(model, str(b / "model.onnx"))
    assert sha256_file(b / "model.onnx") != before
    _rehash(b, "model.onnx")


def _selector_symlinked(b: Path, c: Cloud) -> None:
    (b / "selector.onnx").unlink()
    (b / "selector.onnx").symlink_to(PASSWD)
    _rehash(b, "selector.onnx")


# name -> (alteration, what the refusal must say)
ATTACKS: dict[str, tuple[Callable[[Path, Cloud], None] | None, str]] = {
    "labels-edited": (_labels_edited, "invalid signature"),
    "signature-swapped": (_signature_swapped, "invalid signature"),
    "signature-removed": (_signature_removed, "not signed"),
    "unsigned-export": (None, "not signed"),
    "other-model-rehashed": (_other_model_rehashed, "invalid signature"),
    "selector-symlinked": (_selector_symlinked, "selector.onnx is a symbolic link"),
}


def _attacked(name: str, cloud: Cloud, unsigned: Path, tmp_path: Path) -> Path:
    alter, _ = ATTACKS[name]
    bundle = tmp_path / "attacked"
    shutil.copytree(unsigned if alter is None else cloud.pi4, bundle, symlinks=True)
    if alter is not None:
        alter(bundle, cloud)
    return bundle


def _holds_no_copy_of_passwd(state: Path) -> None:
    secret = PASSWD.read_bytes()
    for p in state.rglob("*"):
        assert not p.is_symlink(), p
        if p.is_file():
            assert p.read_bytes() != secret, f"{p} is a copy of {PASSWD}"


def _nothing_installed(state: Path) -> None:
    assert not (state / "current.json").exists()
    # a failed start removes the state directory it created; a kept one holds no installed bundle
    assert not (state / "bundles").exists() or list((state / "bundles").iterdir()) == []
    _holds_no_copy_of_passwd(state)


# ----------------------------------------------------------------------------------------------------------------
# The first bundle


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_serve_refuses_an_attacked_first_bundle(attack: str, cloud: Cloud, pi4: Path, tmp_path: Path) -> None:
    bundle = _attacked(attack, cloud, pi4, tmp_path)
    state = tmp_path / "state"
    out = subprocess.run([*edge_command(), "serve", "--bundle", str(bundle), "--state-dir", str(state),
                          "--port", str(free_port()), "--device-id", DEVICE, "--trust-key", str(cloud.pub)],
                         capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 14, out.stdout + out.stderr
    assert ATTACKS[attack][1] in out.stderr, out.stderr
    _nothing_installed(state)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_service_refuses_an_attacked_first_bundle(attack: str, cloud: Cloud, pi4: Path, tmp_path: Path) -> None:
    bundle = _attacked(attack, cloud, pi4, tmp_path)
    with pytest.raises(BundleError, match=ATTACKS[attack][1]):
        make_service(tmp_path / "state", bundle, trust_key=cloud.pub, device_id=DEVICE)
    _nothing_installed(tmp_path / "state")


def test_a_symlink_is_refused_and_never_copied_without_a_trust_key(cloud: Cloud, pi4: Path, tmp_path: Path) -> None:
    bundle = _attacked("selector-symlinked", cloud, pi4, tmp_path)
    with pytest.raises(BundleError, match="selector.onnx is a symbolic link"):
        make_service(tmp_path / "state", bundle, device_id=DEVICE)
    _nothing_installed(tmp_path / "state")


def test_a_symlinked_folder_is_refused(cloud: Cloud, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(cloud.pi4, tmp_path / "bundle"))
    shutil.move(bundle / "training", tmp_path / "elsewhere")
    (bundle / "training").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(BundleError, match="training is a symbolic link"):
        make_service(tmp_path / "state", bundle, trust_key=cloud.pub, device_id=DEVICE)
    _nothing_installed(tmp_path / "state")


def test_a_signed_first_bundle_serves(cloud: Cloud, tmp_path: Path) -> None:
    svc = make_service(tmp_path / "state", cloud.pi4, trust_key=cloud.pub, device_id=DEVICE)
    try:
        assert svc.serving.digest == bundle_digest(cloud.pi4)
        trust = svc.status()["trust"]
        assert trust["signed_only"] is True and trust["key_id"] == load_verifier(cloud.pub).key_id
        assert trust["bundle_device"] == DEVICE and trust["bundle_profile"] == "pi4"
        assert b"eclm_edge_unsigned_bundles_allowed 0.0" in svc.metrics.render()
    finally:
        svc.close()


def test_a_first_bundle_made_for_another_device_is_refused(cloud: Cloud, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="made for device 'dev1'.*this device is 'dev9'"):
        make_service(tmp_path / "state", cloud.pi4, trust_key=cloud.pub, device_id="dev9")
    _nothing_installed(tmp_path / "state")


def test_a_first_bundle_of_another_profile_is_refused_when_the_profile_is_set(cloud: Cloud, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="made for profile 'pi-zero-2w'.*runs 'pi4'"):
        make_service(tmp_path / "state", cloud.zero, trust_key=cloud.pub, device_id=DEVICE, profile_name="pi4")
    _nothing_installed(tmp_path / "state")


# ----------------------------------------------------------------------------------------------------------------
# A bundle already installed in the state dir, at restart


def test_an_unsigned_installed_bundle_does_not_serve_under_a_trust_key(cloud: Cloud, pi4: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_service(state, pi4, device_id=DEVICE).close()  # installed before the key was configured
    with pytest.raises(BundleError, match="not signed"):
        make_service(state, trust_key=cloud.pub, device_id=DEVICE)
    svc = make_service(state, cloud.pi4, trust_key=cloud.pub, device_id=DEVICE)  # a signed one replaces it
    try:
        assert svc.serving.digest == bundle_digest(cloud.pi4)
    finally:
        svc.close()


def test_an_installed_copy_edited_in_place_does_not_serve(cloud: Cloud, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_service(state, cloud.pi4, trust_key=cloud.pub, device_id=DEVICE).close()
    installed = state / "bundles" / bundle_digest(cloud.pi4)
    _labels_edited(installed, cloud)
    _rehash(installed, "model.onnx")
    with pytest.raises(BundleError, match="invalid signature"):
        make_service(state, trust_key=cloud.pub, device_id=DEVICE)


# ----------------------------------------------------------------------------------------------------------------
# Without a trust key the runtime says so


def test_serving_unsigned_bundles_is_loud(pi4: Path, cloud: Cloud, tmp_path: Path) -> None:
    srv = EdgeServer(tmp_path / "state", pi4).start()
    try:
        trust = srv.status()["trust"]
        assert trust["signed_only"] is False and trust["key_id"] is None and trust["bundle_signed"] is False
        assert "eclm_edge_unsigned_bundles_allowed 1.0" in srv.request("GET", "/metrics").body.decode()
    finally:
        srv.stop()
    assert "WARNING" in srv.log() and "no --trust-key" in srv.log()

    signed = EdgeServer(tmp_path / "signed-state", cloud.pi4,
                        ["--train-every", "0", "--device-id", DEVICE, "--trust-key", str(cloud.pub)]).start()
    try:
        trust = signed.status()["trust"]
        assert trust["signed_only"] is True and trust["bundle_signed"] is True
        assert "eclm_edge_unsigned_bundles_allowed 0.0" in signed.request("GET", "/metrics").body.decode()
    finally:
        signed.stop()
    assert "no --trust-key" not in signed.log()


# ----------------------------------------------------------------------------------------------------------------
# eclm-edge verify


def _verify(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*edge_command(), "verify", "--bundle", str(bundle), *args], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT, timeout=300)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_verify_with_a_trust_key_says_what_failed(attack: str, cloud: Cloud, pi4: Path, tmp_path: Path) -> None:
    out = _verify(_attacked(attack, cloud, pi4, tmp_path), "--trust-key", str(cloud.pub))
    assert out.returncode == 14, out.stdout + out.stderr
    assert "verified" not in out.stdout
    assert ATTACKS[attack][1] in out.stderr, out.stderr


def test_verify_names_every_problem(cloud: Cloud, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(cloud.pi4, tmp_path / "b"))
    _selector_symlinked(bundle, cloud)
    (bundle / "model.onnx").write_bytes(b"not a model")
    (bundle / "training" / "extra.bin").write_bytes(b"x")
    os.mkfifo(bundle / "fifo")
    out = _verify(bundle, "--trust-key", str(cloud.pub))
    assert out.returncode == 14
    for problem in ("invalid signature", "selector.onnx is a symbolic link", "model.onnx does not match its sha256",
                    "training/extra.bin is not listed", "fifo is a special file"):
        assert problem in out.stderr, (problem, out.stderr)


def test_verify_a_good_bundle(cloud: Cloud, pi4: Path) -> None:
    key_id = load_verifier(cloud.pub).key_id
    out = _verify(cloud.pi4, "--trust-key", str(cloud.pub))
    assert out.returncode == 0, out.stderr
    assert "verified" in out.stdout and f"signed by {key_id}" in out.stdout and f"device {DEVICE}" in out.stdout
    out = _verify(pi4)  # unsigned, no key: the hashes hold, and it says the signature was not checked
    assert out.returncode == 0, out.stderr
    assert "signature NOT checked" in out.stdout and "unsigned" in out.stdout


# ----------------------------------------------------------------------------------------------------------------
# Updates from the cloud: made for this device and profile, and never a replay


def test_a_cloud_signed_bundle_of_another_profile_is_refused(cloud: Cloud, tmp_path: Path) -> None:
    state = tmp_path / "state"
    svc = make_service(state, cloud.pi4, trust_key=cloud.pub, device_id=DEVICE)  # no holdout samples
    verifier = load_verifier(cloud.pub)
    try:
        pointer = (state / "current.json").read_text()
        with pytest.raises(BundleError, match="made for profile 'pi-zero-2w'; this device runs 'pi4'"):
            svc.install_bundle_archive(tar_bundle(cloud.zero), verifier)
        other_device = _resign(cloud.newer, tmp_path / "dev2", cloud, device_id="dev2")
        with pytest.raises(BundleError, match="made for device 'dev2'; this device is 'dev1'"):
            svc.install_bundle_archive(tar_bundle(other_device), verifier)
        no_device = _resign(cloud.newer, tmp_path / "anyone", cloud, device_id=None)
        with pytest.raises(BundleError, match="names no device"):
            svc.install_bundle_archive(tar_bundle(no_device), verifier)
        assert svc.serving.digest == bundle_digest(cloud.pi4)
        assert (state / "current.json").read_text() == pointer
        assert sorted(p.name for p in (state / "bundles").iterdir()) == [bundle_digest(cloud.pi4)]
    finally:
        svc.close()


def test_replayed_bundles_are_refused(cloud: Cloud, xy, tmp_path: Path) -> None:
    state = tmp_path / "state"
    verifier = load_verifier(cloud.pub)
    svc = make_service(state, cloud.pi4, trust_key=cloud.pub, device_id=DEVICE)
    try:
        result = svc.install_bundle_archive(tar_bundle(cloud.newer), verifier)
        assert result["applied"] is True and svc.serving.digest == bundle_digest(cloud.newer)
        with pytest.raises(BundleError, match="already served"):
            svc.install_bundle_archive(tar_bundle(cloud.pi4), verifier)  # the bundle it replaced
        old = read_manifest(cloud.newer).issued_at - 60.0
        older = _resign(cloud.newer, tmp_path / "older", cloud, issued_at=old)  # new digest, older issue time
        with pytest.raises(BundleError, match="issued .* not after"):
            svc.install_bundle_archive(tar_bundle(older), verifier)
        svc.add_samples(xy[0][:40], xy[1][:40].tolist())
        svc.train_now()
        generation = svc.serving.generation
        again = svc.install_bundle_archive(tar_bundle(cloud.newer), verifier)  # the serving one: nothing changes
        assert again["applied"] is False and "already serving" in again["reason"]
        assert svc.serving.generation == generation and svc.serving.digest == bundle_digest(cloud.newer)
    finally:
        svc.close()
    served = json.loads((state / "served.json").read_text())
    assert [b["digest"] for b in served["bundles"]] == [bundle_digest(cloud.pi4), bundle_digest(cloud.newer)]

    restarted = make_service(state, trust_key=cloud.pub, device_id=DEVICE)  # the record survives a restart
    try:
        with pytest.raises(BundleError, match="already served"):
            restarted.install_bundle_archive(tar_bundle(cloud.pi4), verifier)
        assert restarted.serving.digest == bundle_digest(cloud.newer)
    finally:
        restarted.close()


def test_a_replaced_first_bundle_argument_does_not_undo_an_update(cloud: Cloud, tmp_path: Path) -> None:
    state = tmp_path / "state"
    svc = make_service(state, cloud.pi4, trust_key=cloud.pub, device_id=DEVICE)
    try:
        svc.install_bundle_archive(tar_bundle(cloud.newer), load_verifier(cloud.pub))
    finally:
        svc.close()
    again = make_service(state, cloud.pi4, trust_key=cloud.pub, device_id=DEVICE)  # same command line as before
    try:
        assert again.serving.digest == bundle_digest(cloud.newer)
    finally:
        again.close()


def test_updates_need_a_trust_key(cloud: Cloud, tmp_path: Path) -> None:
    svc = make_service(tmp_path / "state", cloud.pi4, device_id=DEVICE)
    try:
        with pytest.raises(BundleError, match="must be signed"):
            svc.install_bundle_archive(tar_bundle(cloud.newer), None)
    finally:
        svc.close()

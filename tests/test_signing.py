"""Ed25519 keys, signatures, signed bundles and safe bundle archives."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from eclm.archive import MAX_ARCHIVE_MEMBERS, MAX_UNPACKED_BYTES, tar_bundle, untar_bundle
from eclm.errors import BundleError, ConfigError
from eclm.hashing import sha256_file
from eclm.manifest import (
    MANIFEST,
    BundleManifest,
    MadeFor,
    bundle_digest,
    copy_bundle,
    hash_files,
    read_manifest,
    verify_bundle,
    write_manifest,
)
from eclm.signing import Signer, Verifier, generate_keys, key_id, load_signer, load_verifier
from exporter.export import ExportRequest, export_bundle

PROFILE = "pi-zero-2w"  # no on-device training: the cheapest bundle to export


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed_bundle(digits_bank: Any, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    bank_dir, _ = digits_bank
    out = tmp_path_factory.mktemp("signed") / "bundle"
    export_bundle(ExportRequest(bank_dir, profile=PROFILE, out_dir=out, measure=False, signing_key=keys[0]))
    return out


@pytest.fixture
def bundle(signed_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(signed_bundle, tmp_path / "bundle"))


# ----------------------------------------------------------------------------------------------------------------
# Keys


def test_generate_keys(tmp_path: Path) -> None:
    priv, pub = generate_keys(tmp_path)
    assert priv == tmp_path / "signing.key" and pub == tmp_path / "signing.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    signer, verifier = load_signer(priv), load_verifier(pub)
    assert signer.key_id == verifier.key_id and len(signer.key_id) == 16
    assert not list(tmp_path.glob(".*.tmp"))


def test_generate_keys_refuses_to_overwrite(tmp_path: Path) -> None:
    priv, pub = generate_keys(tmp_path)
    before = priv.read_bytes(), pub.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keys(tmp_path)
    assert (priv.read_bytes(), pub.read_bytes()) == before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_each_generation_is_a_new_key(tmp_path: Path) -> None:
    a = load_signer(generate_keys(tmp_path / "a")[0])
    b = load_signer(generate_keys(tmp_path / "b")[0])
    assert a.key_id != b.key_id


def test_load_errors(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    for loader in (load_signer, load_verifier):
        with pytest.raises(ConfigError):
            loader(junk)
        with pytest.raises(ConfigError):
            loader(tmp_path / "missing.pem")
    with pytest.raises(ConfigError):
        load_verifier(keys[0])  # a private key is not a public key
    with pytest.raises(ConfigError):
        load_signer(keys[1])


# ----------------------------------------------------------------------------------------------------------------
# Signatures


def _pair() -> tuple[Signer, Verifier]:
    private = Ed25519PrivateKey.generate()
    return Signer(private), Verifier(private.public_key())


def test_sign_and_verify() -> None:
    signer, verifier = _pair()
    data = b"module L0M1 version 3" * 10
    sig = signer.sign(data)
    assert sig["alg"] == "ed25519" and sig["key_id"] == signer.key_id == key_id(verifier.public)
    assert len(bytes.fromhex(sig["sig"])) == 64
    verifier.verify(data, sig, "test data")
    assert signer.sign(data) == sig  # Ed25519 is deterministic


def test_wrong_key_id() -> None:
    signer, _ = _pair()
    _, other = _pair()
    data = b"payload"
    with pytest.raises(BundleError, match="not the trusted key") as exc:
        other.verify(data, signer.sign(data), "update")
    assert signer.key_id in exc.value.message and other.key_id in exc.value.message


def test_other_key_claiming_the_trusted_key_id() -> None:
    signer, verifier = _pair()
    forger, _ = _pair()
    sig = {**forger.sign(b"payload"), "key_id": signer.key_id}
    with pytest.raises(BundleError, match="invalid signature"):
        verifier.verify(b"payload", sig, "update")


@pytest.mark.parametrize("tamper", ["flip", "append", "truncate", "empty"])
def test_tampered_data(tamper: str) -> None:
    signer, verifier = _pair()
    data = b"the merged head, version 7"
    sig = signer.sign(data)
    changed = {"flip": bytes([data[0] ^ 1]) + data[1:], "append": data + b"\x00", "truncate": data[:-1],
               "empty": b""}[tamper]
    with pytest.raises(BundleError, match="invalid signature"):
        verifier.verify(changed, sig, "update")


@pytest.mark.parametrize("mutate", ["sig_flip", "sig_not_hex", "sig_short", "sig_missing", "alg"])
def test_tampered_signature(mutate: str) -> None:
    signer, verifier = _pair()
    sig = signer.sign(b"data")
    raw = bytearray(bytes.fromhex(sig["sig"]))
    raw[5] ^= 1
    bad: dict[str, str] = {
        "sig_flip": {**sig, "sig": raw.hex()},
        "sig_not_hex": {**sig, "sig": "zz" * 64},
        "sig_short": {**sig, "sig": sig["sig"][:20]},
        "sig_missing": {k: v for k, v in sig.items() if k != "sig"},
        "alg": {**sig, "alg": "rsa"},
    }[mutate]
    with pytest.raises(BundleError):
        verifier.verify(b"data", bad, "update")


@pytest.mark.parametrize("sig", [None, {}])
def test_unsigned(sig: Any) -> None:
    _, verifier = _pair()
    with pytest.raises(BundleError, match="not signed"):
        verifier.verify(b"data", sig, "update")


@pytest.mark.parametrize("sig", ["deadbeef", ["ed25519"], 1, "int-sig"])
def test_malformed_signature_types(sig: Any) -> None:
    signer, verifier = _pair()
    if sig == "int-sig":
        sig = {"alg": "ed25519", "key_id": signer.key_id, "sig": 12345}
    with pytest.raises(BundleError):
        verifier.verify(b"data", sig, "update")


# ----------------------------------------------------------------------------------------------------------------
# Signed bundles


def _modified(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 0] if not value else value[:-1]
    if isinstance(value, dict):
        if not value:
            return {"tampered": 1}
        key = sorted(value)[0]
        return {**value, key: _modified(value[key])}
    return "tampered"


def test_signed_bundle_verifies(bundle: Path, keys: tuple[Path, Path]) -> None:
    manifest = verify_bundle(bundle, load_verifier(keys[1]))
    assert manifest.signature is not None and manifest.signature["key_id"] == load_signer(keys[0]).key_id
    assert {"model.onnx", "selector.onnx"} <= set(manifest.files)
    assert set(manifest.files) == {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                                   if p.is_file() and p.name != MANIFEST}
    assert verify_bundle(bundle).signature == manifest.signature  # without a verifier: hashes only


TOP_LEVEL_KEYS = sorted(f.name for f in dataclasses.fields(BundleManifest))


def test_the_manifest_holds_every_field(bundle: Path) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    assert sorted(data) == TOP_LEVEL_KEYS


@pytest.mark.parametrize("key", TOP_LEVEL_KEYS)
def test_modifying_any_manifest_field_fails(bundle: Path, keys: tuple[Path, Path], key: str) -> None:
    path = bundle / MANIFEST
    data = json.loads(path.read_text())
    data[key] = _modified(data[key])
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(BundleError):
        verify_bundle(bundle, load_verifier(keys[1]))


NESTED = [("modules", 0, "version"), ("profile", "name"), ("costs", "estimated", "flops"), ("training", "available"),
          ("importance", 0, 0), ("input", "normalisation", "mean", 0)]


@pytest.mark.parametrize("path", NESTED)
def test_modifying_a_nested_manifest_field_fails(bundle: Path, keys: tuple[Path, Path], path: tuple[Any, ...]) -> None:
    file = bundle / MANIFEST
    data = json.loads(file.read_text())
    node = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = _modified(node[path[-1]])
    file.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="invalid signature"):
        verify_bundle(bundle, load_verifier(keys[1]))


def test_reformatting_the_manifest_keeps_it_valid(bundle: Path, keys: tuple[Path, Path]) -> None:
    path = bundle / MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()), indent=7, sort_keys=False))
    verify_bundle(bundle, load_verifier(keys[1]))


def test_unsigned_bundle_is_refused_with_a_verifier(bundle: Path, keys: tuple[Path, Path]) -> None:
    write_manifest(bundle, read_manifest(bundle), signer=None)
    assert read_manifest(bundle).signature is None
    with pytest.raises(BundleError, match="not signed"):
        verify_bundle(bundle, load_verifier(keys[1]))
    verify_bundle(bundle)  # the hashes alone still hold


def test_bundle_signed_by_another_key_is_refused(bundle: Path, keys: tuple[Path, Path]) -> None:
    write_manifest(bundle, read_manifest(bundle), signer=Signer(Ed25519PrivateKey.generate()))
    with pytest.raises(BundleError, match="not the trusted key"):
        verify_bundle(bundle, load_verifier(keys[1]))


def test_modified_model_file_fails_despite_the_signature(bundle: Path, keys: tuple[Path, Path]) -> None:
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        verify_bundle(bundle, load_verifier(keys[1]))


def test_missing_and_unlisted_files_fail(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "selector.onnx").unlink()
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError) as exc:
        verify_bundle(bundle, load_verifier(keys[1]))
    assert "selector.onnx is missing" in exc.value.message and "extra.bin is not listed" in exc.value.message


# ----------------------------------------------------------------------------------------------------------------
# Archives


def test_archive_round_trip(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    archive = tar_bundle(bundle)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
    assert names == sorted(names) and set(names) == {MANIFEST, *read_manifest(bundle).files}
    target = tmp_path / "unpacked"
    untar_bundle(archive, target)
    for rel in names:
        assert (target / rel).read_bytes() == (bundle / rel).read_bytes()
    verify_bundle(target, load_verifier(keys[1]))


def test_archive_round_trip_with_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "training" / "deep").mkdir(parents=True)
    files = {"a.txt": b"alpha", "training/b.onnx": bytes(range(256)) * 10, "training/deep/c": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    target = tmp_path / "dst"
    untar_bundle(tar_bundle(src), target)
    assert {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} == set(files)
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _file(name: str, data: bytes = b"evil") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize("members", [
    [_file("manifest.json", b"{}"), _file("../evil")],
    [_file("sub/../../evil")],
    [_file("/tmp/eclm-absolute-evil")],
    [_file("manifest.json", b"{}"), _link("model.onnx", "/etc/passwd")],
    [_link("link", "../../outside")],
    [_file("a", b"a"), _link("b", "a", tarfile.LNKTYPE)],
    [_link("dev", "", tarfile.CHRTYPE)],
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-to-etc", "symlink-up", "hardlink", "device"])
def test_unsafe_archives_are_refused(members: list[tuple[tarfile.TarInfo, bytes | None]], tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "target"
    with pytest.raises(BundleError, match="unsafe entry"):
        untar_bundle(_tar(members), target)
    assert not target.exists()  # nothing was extracted
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "a" / "b" / "evil").exists()


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    archive = _tar([_file(f"f{i}", b"") for i in range(MAX_ARCHIVE_MEMBERS + 1)])
    with pytest.raises(BundleError, match="too many"):
        untar_bundle(archive, tmp_path / "t")


@pytest.mark.parametrize("data", [b"", b"not a tarball", b"\x1f\x8b\x08\x00" + b"\x00" * 20])
def test_unreadable_archives(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="unreadable"):
        untar_bundle(data, tmp_path / "t")


def test_truncated_archive(bundle: Path, tmp_path: Path) -> None:
    archive = tar_bundle(bundle)
    with pytest.raises(BundleError):
        untar_bundle(archive[: len(archive) // 2], tmp_path / "t")


def test_too_much_unpacked_data_is_refused(tmp_path: Path) -> None:
    assert MAX_UNPACKED_BYTES >= 64 * 2**20  # room for a real bundle
    archive = _tar([_file("a", b"x" * 600), _file("b", b"y" * 600)])
    with pytest.raises(BundleError, match="unpacks to more than 1000 bytes"):
        untar_bundle(archive, tmp_path / "t", max_bytes=1000)
    assert not (tmp_path / "t").exists()
    untar_bundle(archive, tmp_path / "t", max_bytes=1200)
    assert (tmp_path / "t" / "b").read_bytes() == b"y" * 600


def test_duplicate_archive_members_are_refused(tmp_path: Path) -> None:
    archive = _tar([_file("manifest.json", b"{}"), _file("manifest.json", b"{ }")])
    with pytest.raises(BundleError, match="twice"):
        untar_bundle(archive, tmp_path / "t")


# ----------------------------------------------------------------------------------------------------------------
# Regular files inside the bundle only


def test_a_symlink_with_its_hash_in_the_manifest_is_refused(bundle: Path) -> None:
    (bundle / "selector.onnx").unlink()
    (bundle / "selector.onnx").symlink_to("/etc/passwd")
    data = json.loads((bundle / MANIFEST).read_text())
    data["files"]["selector.onnx"] = sha256_file("/etc/passwd")
    (bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="selector.onnx is a symbolic link"):
        verify_bundle(bundle)


def test_a_symlink_to_a_file_inside_the_bundle_is_refused(bundle: Path) -> None:
    (bundle / "copy.onnx").symlink_to("model.onnx")
    with pytest.raises(BundleError, match="copy.onnx is a symbolic link"):
        verify_bundle(bundle)


def test_a_symlinked_manifest_is_refused(bundle: Path, tmp_path: Path) -> None:
    shutil.move(bundle / MANIFEST, tmp_path / "elsewhere.json")
    (bundle / MANIFEST).symlink_to(tmp_path / "elsewhere.json")
    for check in (verify_bundle, read_manifest, bundle_digest):
        with pytest.raises(BundleError, match="manifest.json is a symbolic link"):
            check(bundle)


def test_special_files_are_refused_without_blocking(bundle: Path) -> None:
    import os

    os.mkfifo(bundle / "pipe")
    with pytest.raises(BundleError, match="pipe is a special file"):
        verify_bundle(bundle)
    data = json.loads((bundle / MANIFEST).read_text())
    data["files"]["pipe"] = "0" * 64  # listed: opening it must not wait for a writer
    (bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="pipe is a special file"):
        verify_bundle(bundle)


def test_the_exporter_refuses_to_hash_a_symlink(bundle: Path) -> None:
    (bundle / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="link is a symbolic link"):
        hash_files(bundle)


def test_copy_never_follows_a_symlink(bundle: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    copy_bundle(bundle, good)
    verify_bundle(good)
    (bundle / "selector.onnx").unlink()
    (bundle / "selector.onnx").symlink_to(good / "selector.onnx")  # the very bytes the manifest expects
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(BundleError, match="selector.onnx is a symbolic link"):
        copy_bundle(bundle, bad)
    assert not (bad / "selector.onnx").exists()


def test_copy_checks_every_hash(bundle: Path, tmp_path: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"swapped after verification")
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        copy_bundle(bundle, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Who a bundle was made for


def test_an_export_names_its_device_profile_and_issue_time(digits_bank: Any, keys: tuple[Path, Path],
                                                          signed_bundle: Path, tmp_path: Path) -> None:
    unnamed = read_manifest(signed_bundle)
    assert unnamed.device_id is None and unnamed.profile["name"] == PROFILE and unnamed.issued_at > 0
    out = tmp_path / "named"
    export_bundle(ExportRequest(digits_bank[0], profile=PROFILE, out_dir=out, measure=False, signing_key=keys[0],
                                device_id="board-7"))
    named = verify_bundle(out, load_verifier(keys[1]))
    assert named.device_id == "board-7" and named.issued_at > unnamed.issued_at


def _manifest(device_id: str | None, profile: str = "pi4") -> BundleManifest:
    data = {f.name: f.default for f in dataclasses.fields(BundleManifest)
            if f.default is not dataclasses.MISSING}
    return BundleManifest(**{**data, "bank_id": "b", "config": "c", "profile": {"name": profile}, "selection": [],
                             "modules": [], "fixed_parts": [], "input": {}, "output": {}, "labels": [],
                             "derived_for": {}, "importance": [], "costs": {}, "training": {}, "selector": {},
                             "device_id": device_id, "issued_at": 1.0})


def test_made_for() -> None:
    MadeFor("dev1", "pi4", require_device=True).check(_manifest("dev1"))
    MadeFor("dev1", None).check(_manifest(None, "pi-zero-2w"))  # no device, any profile: a first bundle
    with pytest.raises(BundleError, match="made for device 'dev2'; this device is 'dev1'"):
        MadeFor("dev1", None).check(_manifest("dev2"))
    with pytest.raises(BundleError, match="names no device"):
        MadeFor("dev1", "pi4", require_device=True).check(_manifest(None))
    with pytest.raises(BundleError, match="made for profile 'pi-zero-2w'; this device runs 'pi4'"):
        MadeFor("dev1", "pi4").check(_manifest("dev1", "pi-zero-2w"))


@pytest.mark.parametrize(("key", "value"), [("device_id", 7), ("device_id", ""), ("issued_at", "yesterday"),
                                            ("issued_at", None), ("labels", "abc"), ("files", ["model.onnx"]),
                                            ("profile", {"no": "name"})])
def test_manifest_field_types_are_checked(bundle: Path, key: str, value: Any) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    data[key] = value
    (bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=key):
        read_manifest(bundle)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d["selector"].update(file="/etc/passwd"), "refers to '/etc/passwd'"),
    (lambda d: d["variants"].append({"name": "evil", "file": "../../etc/passwd"}), "refers to '../../etc/passwd'"),
    (lambda d: d["training"].update(folder="../../etc"), "training folder '../../etc'"),
], ids=["selector", "variant", "training-folder"])
def test_files_the_manifest_names_must_be_listed(bundle: Path, edit: Any, match: str) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    edit(data)
    (bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=match):
        verify_bundle(bundle)

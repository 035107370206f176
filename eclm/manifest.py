"""The bundle manifest: its schema, reading and writing, who a bundle is for, and verification of its files."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eclm.bundle_files import copy_regular, read_regular, safe_relpath, sha256_regular, walk, write_new
from eclm.errors import BundleError
from eclm.hashing import atomic_write_json, canonical_json
from eclm.signing import Signer, Verifier

MANIFEST_SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20
_TAMPERED = "do not serve it; re-export or re-download the bundle"


@dataclass
class BundleManifest:
    """What a bundle holds and how to use it; ``files`` maps each relative path to its sha256.

    ``device_id`` names the device the bundle was exported for (None: any device), ``profile["name"]``
    the device profile it was derived for, ``issued_at`` when it was made (seconds since the epoch);
    the signature covers all of them.
    """

    bank_id: str
    config: str
    profile: dict[str, Any]
    selection: list[list[int]]
    modules: list[dict[str, Any]]
    fixed_parts: list[dict[str, Any]]
    input: dict[str, Any]
    output: dict[str, Any]
    labels: list[str]
    derived_for: dict[str, Any]
    importance: list[list[float]]
    costs: dict[str, Any]
    training: dict[str, Any]
    selector: dict[str, Any]
    validation: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)  # cheaper models for resource drops
    files: dict[str, str] = field(default_factory=dict)
    signature: dict[str, str] | None = None
    device_id: str | None = None
    issued_at: float = 0.0
    schema_version: int = MANIFEST_SCHEMA_VERSION
    kind: str = "eclm-bundle"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def profile_name(self) -> str:
        return str(self.profile["name"])

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BundleManifest:
        if not isinstance(data, dict) or data.get("kind") != "eclm-bundle":
            raise BundleError("not an ECLM bundle manifest", hint="point at a folder made by eclm-export")
        version = data.get("schema_version")
        if version != MANIFEST_SCHEMA_VERSION:
            raise BundleError(
                f"bundle manifest schema version {version!r}; this ECLM reads {MANIFEST_SCHEMA_VERSION}",
                hint="re-export the bundle with a matching eclm-export, or upgrade this runtime",
            )
        known = set(BundleManifest.__dataclass_fields__)
        missing = known - set(data) - {"validation", "files", "signature", "variants"}
        if missing:
            raise BundleError(f"bundle manifest lacks {sorted(missing)}", hint="re-export the bundle")
        _check_types(data)
        return BundleManifest(**{k: v for k, v in data.items() if k in known})


_TYPES: dict[str, type | tuple[type, ...]] = {
    "bank_id": str, "config": str, "profile": dict, "selection": list, "modules": list, "fixed_parts": list,
    "input": dict, "output": dict, "labels": list, "derived_for": dict, "importance": list, "costs": dict,
    "training": dict, "selector": dict, "validation": dict, "variants": list, "files": dict,
}


def _check_types(data: dict[str, Any]) -> None:
    """Refuse a manifest whose fields have the wrong JSON types (each error names the field)."""
    def bad(key: str, what: str) -> BundleError:
        return BundleError(f"bundle manifest field {key} {what}", hint="re-export the bundle")

    for key, kind in _TYPES.items():
        if key in data and not isinstance(data[key], kind):
            raise bad(key, f"is {type(data[key]).__name__}, not {getattr(kind, '__name__', kind)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.get("files", {}).items()):
        raise bad("files", "must map paths to sha256 strings")
    if not all(isinstance(label, str) for label in data["labels"]):
        raise bad("labels", "must be a list of strings")
    if not isinstance(data["profile"].get("name"), str) or not data["profile"]["name"]:
        raise bad("profile", "lacks the profile name")
    device = data["device_id"]
    if device is not None and (not isinstance(device, str) or not device):
        raise bad("device_id", "must be a device id or null")
    issued = data["issued_at"]
    if isinstance(issued, bool) or not isinstance(issued, int | float) or not math.isfinite(issued):
        raise bad("issued_at", "must be a time in seconds since the epoch")
    if data.get("signature") is not None and not isinstance(data["signature"], dict):
        raise bad("signature", "must be an object or null")


@dataclass(frozen=True)
class MadeFor:
    """Which device and profile a bundle must have been made for to serve here.

    ``profile`` None accepts any profile; ``require_device`` refuses a bundle that names no device
    (every update the cloud sends is made for one device).
    """

    device_id: str
    profile: str | None
    require_device: bool = False

    def check(self, manifest: BundleManifest) -> None:
        if manifest.device_id is None:
            if self.require_device:
                raise BundleError(f"the bundle names no device; an update must be made for this device "
                                  f"{self.device_id!r}", hint="the cloud derives bundles per device; refused")
        elif manifest.device_id != self.device_id:
            raise BundleError(f"the bundle was made for device {manifest.device_id!r}; this device is "
                              f"{self.device_id!r}",
                              hint=f"export one for this device (eclm-export --device-id {self.device_id}), "
                                   "or start this runtime with the bundle's --device-id")
        if self.profile is not None and manifest.profile_name != self.profile:
            raise BundleError(f"the bundle was made for profile {manifest.profile_name!r}; this device runs "
                              f"{self.profile!r}",
                              hint=f"export one with --profile {self.profile}, or change this device's profile_name")


def bundle_digest(folder: Path) -> str:
    """Identity of a bundle: the sha256 of its manifest (which holds every file's sha256)."""
    return hashlib.sha256(_manifest_bytes(Path(folder))).hexdigest()[:16]


def hash_files(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file below ``root`` except the manifest, by POSIX relative path.

    A link or special file in the folder is an error: a bundle holds regular files only.
    """
    entries = walk(root)
    odd = [f"{rel} is a {kind}" for rel, kind in entries.items() if kind != "file"]
    if odd:
        raise BundleError(f"cannot hash bundle {root}: " + "; ".join(odd), hint="a bundle holds regular files only")
    return {rel: sha256_regular(root, rel) for rel in entries if rel not in exclude}


def signed_content(manifest: BundleManifest) -> bytes:
    """The bytes a bundle signature covers: the manifest (with every file's sha256) minus the signature."""
    data = manifest.to_dict()
    data.pop("signature", None)
    return canonical_json(data)


def write_manifest(root: Path, manifest: BundleManifest, signer: Signer | None = None) -> None:
    """Hash every file of the bundle into the manifest, sign it if a signer is given, write it atomically."""
    manifest.files = hash_files(root)
    manifest.signature = signer.sign(signed_content(manifest)) if signer is not None else None
    atomic_write_json(root / MANIFEST, manifest.to_dict())


def _manifest_bytes(root: Path) -> bytes:
    try:
        return read_regular(root, MANIFEST, MAX_MANIFEST_BYTES)
    except BundleError as exc:
        if exc.message == f"{MANIFEST} is missing":
            raise BundleError(f"no {MANIFEST} in {root}", hint="point at a folder made by eclm-export") from exc
        raise
    except OSError as exc:
        raise BundleError(f"unreadable {root / MANIFEST}: {exc.strerror}", hint="re-export the bundle") from exc


def parse_manifest(raw: bytes, where: Path) -> BundleManifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"unreadable {where / MANIFEST}: {exc}", hint="re-export the bundle") from exc
    return BundleManifest.from_dict(data)


def read_manifest(root: Path) -> BundleManifest:
    root = Path(root)
    return parse_manifest(_manifest_bytes(root), root)


def bundle_problems(root: Path, manifest: BundleManifest, verifier: Verifier | None) -> list[str]:
    """Everything wrong with the bundle in ``root``: signature, links, special, missing, altered or unlisted files."""
    problems: list[str] = []
    if verifier is not None:
        try:
            verifier.verify(signed_content(manifest), manifest.signature, "the manifest")
        except BundleError as exc:
            problems.append(exc.message)
    if not manifest.files:
        problems.append(f"manifest of {root} lists no files")
    problems.extend(f"the manifest refers to {rel!r}, which it does not list" for rel in _referenced(manifest)
                    if rel not in manifest.files)
    folder = manifest.training.get("folder")
    if folder is not None and not (isinstance(folder, str) and any(r.startswith(f"{folder}/") for r in manifest.files)
                                   and ".." not in folder.split("/") and not folder.startswith("/")):
        problems.append(f"the manifest's training folder {folder!r} holds none of its listed files")
    entries = walk(root)
    for rel in sorted(manifest.files):
        try:
            safe_relpath(rel)
        except BundleError as exc:
            problems.append(exc.message)
            continue
        kind = entries.get(rel)
        if kind is None:
            problems.append(f"{rel} is missing")
        elif kind == "file":
            try:
                if sha256_regular(root, rel) != manifest.files[rel]:
                    problems.append(f"{rel} does not match its sha256")
            except BundleError as exc:  # changed into something else since the walk
                problems.append(exc.message)
    for rel, kind in entries.items():
        if kind != "file":
            problems.append(f"{rel} is a {kind} (a bundle holds regular files only)")
        elif rel != MANIFEST and rel not in manifest.files:
            problems.append(f"{rel} is not listed in the manifest")
    return problems


def _referenced(manifest: BundleManifest) -> list[str]:
    """Every file the runtime opens by a name the manifest gives: each must be one of the listed files."""
    refs = ["model.onnx", str(manifest.selector.get("file", "selector.onnx"))]
    return refs + [str(v.get("file")) for v in manifest.variants if isinstance(v, dict)]


def verify_bundle(root: str | Path, verifier: Verifier | None = None) -> BundleManifest:
    """Read the manifest and check every listed file's sha256; refuse links, special and unlisted files.

    With a ``verifier`` the manifest must also carry that key's valid signature. The error lists
    every problem found.
    """
    root = Path(root)
    manifest = read_manifest(root)
    problems = bundle_problems(root, manifest, verifier)
    if problems:
        raise BundleError(f"bundle {root} failed verification: " + "; ".join(problems), hint=_TAMPERED)
    return manifest


def copy_bundle(source: Path, target: Path) -> BundleManifest:
    """Copy a bundle into the empty folder ``target`` without following any link: the manifest is read once,
    each file it lists is copied and checked against its sha256 on the copied bytes, then the same manifest
    bytes are written. Returns the manifest.
    """
    raw = _manifest_bytes(Path(source))
    manifest = parse_manifest(raw, Path(source))
    for rel, digest in sorted(manifest.files.items()):
        copy_regular(Path(source), rel, Path(target), digest)
    write_new(Path(target) / MANIFEST, raw)
    return manifest

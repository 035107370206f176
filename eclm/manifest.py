"""The bundle manifest: its schema, reading and writing, and verification of every file's sha256."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from eclm.errors import BundleError
from eclm.hashing import atomic_write_json, canonical_json, sha256_file
from eclm.signing import Signer, Verifier

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class BundleManifest:
    """What a bundle holds and how to use it; ``files`` maps each relative path to its sha256."""

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
    schema_version: int = MANIFEST_SCHEMA_VERSION
    kind: str = "eclm-bundle"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        return BundleManifest(**{k: v for k, v in data.items() if k in known})


def _safe_relpath(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"manifest lists unsafe path {rel!r}", hint="the bundle was tampered with; re-export")
    return p


def bundle_digest(folder: Path) -> str:
    """Identity of a bundle: the sha256 of its manifest (which holds every file's sha256)."""
    import hashlib

    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()[:16]


def hash_files(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file below ``root`` except the manifest, by POSIX relative path."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(path)
    return out


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


def read_manifest(root: Path) -> BundleManifest:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"no {MANIFEST} in {root}", hint="point at a folder made by eclm-export") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable {path}: {exc}", hint="re-export the bundle") from exc
    return BundleManifest.from_dict(data)


def verify_bundle(root: str | Path, verifier: Verifier | None = None) -> BundleManifest:
    """Read the manifest and check every listed file's sha256; also refuse unlisted files.

    With a ``verifier`` the manifest must also carry that key's valid signature.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if verifier is not None:
        verifier.verify(signed_content(manifest), manifest.signature, f"bundle {root}")
    if not manifest.files:
        raise BundleError(f"manifest of {root} lists no files", hint="re-export the bundle")
    problems = []
    for rel, digest in manifest.files.items():
        path = root / _safe_relpath(rel)
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} does not match its sha256")
    unlisted = sorted(set(hash_files(root)) - set(manifest.files))
    problems.extend(f"{rel} is not listed in the manifest" for rel in unlisted)
    if problems:
        raise BundleError(
            f"bundle {root} failed verification: " + "; ".join(problems),
            hint="do not serve it; re-export or re-download the bundle",
        )
    return manifest

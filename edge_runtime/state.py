"""The state directory: installed bundles, trained generations, and the pointer to what serves.

Layout::

    STATE/current.json          which bundle and generation serve (written atomically, last)
    STATE/bundles/<digest>/     verified copies of installed bundles
    STATE/gens/<n>/             params.safetensors (the parameters it changed) and generation.json
    STATE/samples.sqlite        the sample store
    STATE/outbox/               deltas waiting to be sent

Every write lands in a temporary folder first and is renamed into place, and the pointer is
replaced last, so ``kill -9`` at any moment leaves the last good model reachable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import BundleError, DataError
from eclm.hashing import atomic_write_json, sha256_file
from eclm.manifest import BundleManifest, bundle_digest, verify_bundle
from eclm.tensors import encode_tensors, read_tensors

POINTER = "current.json"
PARAMS = "params.safetensors"


def write_params(folder: Path, values: dict[str, np.ndarray]) -> None:
    """Store a generation's own parameter values (safetensors; never pickle) in ``folder``."""
    (folder / PARAMS).write_bytes(encode_tensors(values))


def read_params(folder: Path, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A generation's own parameter values, each checked to replace one of ``base`` (same shape, float32)."""
    try:
        values = read_tensors(folder / PARAMS)
    except (OSError, DataError) as exc:
        raise BundleError(f"{folder.name}: unreadable parameters ({exc})", hint="it will be skipped") from exc
    for name, value in values.items():
        ref = base.get(name)
        if ref is None or ref.shape != value.shape or value.dtype != ref.dtype:
            raise BundleError(f"{folder.name}: parameter {name} does not fit the bundle", hint="it will be skipped")
    return {n: np.array(v, copy=True) for n, v in values.items()}  # owned, writable, aligned


@dataclass(frozen=True)
class Pointer:
    """What serves: a bundle digest and a generation (0 = the bundle's own weights)."""

    bundle: str
    generation: int

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "generation": self.generation}


class StateDir:
    """Reads and writes the state directory's bundles, generations and pointer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("bundles", "gens", "outbox"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.clean_temporaries()

    def clean_temporaries(self) -> None:
        """Remove half-written folders a crash left behind."""
        for sub in ("bundles", "gens"):
            for p in (self.root / sub).glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    # bundles
    def bundle_dir(self, digest: str) -> Path:
        return self.root / "bundles" / digest

    def install_bundle(self, source: Path) -> tuple[str, BundleManifest]:
        """Verify ``source``, copy it in, verify the copy; returns its digest and manifest."""
        verify_bundle(source)
        digest = bundle_digest(source)
        target = self.bundle_dir(digest)
        if target.is_dir():
            try:
                return digest, verify_bundle(target)
            except BundleError:  # the installed copy was damaged: replace it from the intact source
                shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / "bundles"))
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            manifest = verify_bundle(tmp)
            tmp.replace(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return digest, manifest

    # generations
    def gen_dir(self, n: int) -> Path:
        return self.root / "gens" / f"{n:06d}"

    def next_generation(self) -> int:
        nums = [int(p.name) for p in (self.root / "gens").iterdir() if p.name.isdigit()]
        return max(nums, default=0) + 1

    def new_generation_workdir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / "gens"))

    def commit_generation(self, work: Path, n: int, info: dict[str, Any]) -> Path:
        """Record the hashes of the generation's files and move it into place."""
        files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()}
        atomic_write_json(work / "generation.json", {**info, "generation": n, "files": files})
        target = self.gen_dir(n)
        work.replace(target)
        return target

    def generations(self) -> list[int]:
        """Committed generation numbers, ascending."""
        return sorted(int(p.name) for p in (self.root / "gens").iterdir() if p.name.isdigit())

    def discard_generation(self, n: int) -> None:
        shutil.rmtree(self.gen_dir(n), ignore_errors=True)

    def verify_generation(self, n: int) -> dict[str, Any]:
        """The generation's record, after checking every file's sha256."""
        folder = self.gen_dir(n)
        try:
            info = json.loads((folder / "generation.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"generation {n} is unreadable: {exc}", hint="it will be skipped") from exc
        for name, digest in info.get("files", {}).items():
            p = folder / name
            if not p.is_file() or sha256_file(p) != digest:
                raise BundleError(f"generation {n}: {name} is missing or altered", hint="it will be skipped")
        return dict(info)

    # pointer
    def read_pointer(self) -> Pointer | None:
        try:
            data = json.loads((self.root / POINTER).read_text())
            return Pointer(str(data["bundle"]), int(data["generation"]))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def write_pointer(self, pointer: Pointer) -> None:
        atomic_write_json(self.root / POINTER, pointer.to_dict())

"""The state directory: installed bundles, trained generations, and the pointer to what serves.

Layout::

    STATE/current.json          which bundle and generation serve (written atomically, last)
    STATE/bundles/<digest>/     verified copies of installed bundles
    STATE/gens/<n>/             model.onnx + checkpoint of a fine-tuned generation, generation.json
    STATE/samples.sqlite        the sample store
    STATE/outbox/               deltas waiting to be sent
    STATE/.lock                 held (flock) by the one runtime that uses the directory; holds its pid

Every write lands in a temporary folder first and is renamed into place, and the pointer is
replaced last, so ``kill -9`` at any moment leaves the last good model reachable.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eclm.errors import BundleError, ConfigError
from eclm.hashing import atomic_write_json, sha256_file
from eclm.manifest import BundleManifest, bundle_digest, verify_bundle

POINTER = "current.json"
LOCK = ".lock"


class StateLock:
    """An exclusive ``flock`` on ``STATE/.lock``: one runtime per state directory. The kernel drops it when
    the process ends, however it ends, so a crash never leaves the directory locked.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"state directory {self.path.parent} is in use by another runtime (pid {holder})",
                              hint="stop that process, or give this one its own --state-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


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
        root.mkdir(parents=True, exist_ok=True)
        self.lock = StateLock(root).acquire()  # before anything is cleaned or written
        for sub in ("bundles", "gens", "outbox"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.clean_temporaries()

    def close(self) -> None:
        """Let another runtime use the directory."""
        self.lock.release()

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

"""The state directory: installed bundles, trained generations, and the pointer to what serves.

Layout::

    STATE/current.json          which bundle and generation serve (written atomically, last)
    STATE/served.json           every bundle that served, with its issue time (refuses replays)
    STATE/bundles/<digest>/     verified copies of installed bundles (copied without following links)
    STATE/gens/<n>/             params.safetensors (the parameters it changed) and generation.json
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import BundleError, ConfigError, DataError
from eclm.hashing import atomic_write_json, sha256_file
from eclm.manifest import BundleManifest, MadeFor, bundle_digest, copy_bundle, read_manifest, verify_bundle
from eclm.signing import Verifier
from eclm.tensors import encode_tensors, read_tensors

POINTER = "current.json"
SERVED = "served.json"
MAX_SERVED_RECORDS = 256
PARAMS = "params.safetensors"
LOCK = ".lock"


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

    def install_bundle(self, source: Path, verifier: Verifier | None = None, made_for: MadeFor | None = None,
                       newer_only: bool = False) -> tuple[str, BundleManifest]:
        """Verify ``source``, copy it in without following links, verify the copy; returns its digest and manifest.

        With a ``verifier`` the bundle must carry its valid signature; ``made_for`` checks the device and
        profile it names; ``newer_only`` refuses a bundle this device already served or one issued no
        later than the newest it served (a replay).
        """
        digest = bundle_digest(source)
        self._admit(digest, verify_bundle(source, verifier), made_for, newer_only)
        target = self.bundle_dir(digest)
        if target.is_dir():
            try:
                manifest = verify_bundle(target, verifier)
            except BundleError:  # the installed copy was damaged: replaced below from the intact source
                pass
            else:
                self._admit(digest, manifest, made_for, newer_only)
                return digest, manifest
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / "bundles"))
        try:
            copy_bundle(source, tmp)
            manifest = verify_bundle(tmp, verifier)  # what serves is the copy: check it, not the source
            if bundle_digest(tmp) != digest:
                raise BundleError(f"bundle {source} changed while it was installed", hint="install it again")
            self._admit(digest, manifest, made_for, newer_only)
            if target.exists():
                shutil.rmtree(target)
            tmp.replace(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return digest, manifest

    def _admit(self, digest: str, manifest: BundleManifest, made_for: MadeFor | None, newer_only: bool) -> None:
        if made_for is not None:
            made_for.check(manifest)
        if newer_only:
            reason = self.replay_reason(digest, manifest)
            if reason is not None:
                raise BundleError(reason, hint="a bundle update must be newer than every bundle this device served")

    # what served
    def served(self) -> list[dict[str, Any]]:
        """Every bundle that served here, oldest first (digest, issue time, device, profile, since)."""
        try:
            data = json.loads((self.root / SERVED).read_text())
            return [dict(b) for b in data["bundles"]]
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.root / SERVED} is unreadable: {exc}",
                              hint="it protects against replayed bundles; restore it or start a fresh state dir"
                              ) from exc

    def newest_issued(self) -> float:
        try:
            return float(json.loads((self.root / SERVED).read_text())["newest_issued_at"])
        except FileNotFoundError:
            return 0.0
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.root / SERVED} is unreadable: {exc}",
                              hint="it protects against replayed bundles; restore it or start a fresh state dir"
                              ) from exc

    def replay_reason(self, digest: str, manifest: BundleManifest) -> str | None:
        """Why the bundle would be a replay (None if it is not): served and replaced before, or issued no
        later than the newest bundle that served here.
        """
        current = self.read_pointer()
        if current is not None and current.bundle == digest:
            return None
        for record in self.served():
            if record.get("digest") == digest:
                return (f"bundle {digest} was already served here (from {_when(record.get('since'))}) and has been "
                        "replaced; a replayed bundle is refused")
        newest = self.newest_issued()
        if manifest.issued_at <= newest:
            return (f"bundle {digest} was issued {_when(manifest.issued_at)}, not after the newest bundle this "
                    f"device served (issued {_when(newest)}); a replayed bundle is refused")
        return None

    def _record_served(self, digest: str) -> None:
        records = self.served()
        if records and records[-1].get("digest") == digest:
            return
        manifest = read_manifest(self.bundle_dir(digest))
        records.append({"digest": digest, "issued_at": manifest.issued_at, "device_id": manifest.device_id,
                        "profile": manifest.profile_name, "since": time.time()})
        newest = max(self.newest_issued(), manifest.issued_at)
        atomic_write_json(self.root / SERVED, {"bundles": records[-MAX_SERVED_RECORDS:], "newest_issued_at": newest})

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
        """Make ``pointer`` serve; a bundle that starts serving is recorded first."""
        current = self.read_pointer()
        if current is None or current.bundle != pointer.bundle:
            self._record_served(pointer.bundle)
        atomic_write_json(self.root / POINTER, pointer.to_dict())


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"

"""What the board test makes on the host: the committed tree, the digits bank and bundle, the device's data."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import chroot
from eclm.errors import EclmError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (1, 4, 7)
CORRUPTION = "rotation"  # the shift the device sees and the cloud model never did
BANK_INPUTS = ("pyproject.toml", "eclm", "exporter", "device_profiles")  # what the cached bank and bundle depend on


def say(msg: str) -> None:
    print(f"board: {msg}", file=sys.stderr, flush=True)


def run_main(prog: str, job: Callable[[], int], interrupted: str = "interrupted") -> None:
    """Exit with ``job()``'s code; a project error is one line with its hint and exit code, Ctrl-C is 130."""
    try:
        sys.exit(job())
    except EclmError as exc:
        print(f"{prog}: error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        sys.exit(130)


def board_install_command(readme: str) -> str:
    """The first ``$ ... pip install ...`` line of a console block in the README's "Raspberry Pi" section."""
    section = re.search(r"^## Raspberry Pi\b.*?(?=^## |\Z)", readme, re.M | re.S)
    if section:
        for block in re.findall(r"```console\n(.*?)```", section.group(0), re.S):
            for line in block.splitlines():
                if line.startswith("$ ") and "pip install" in line:
                    return line[2:].strip()
    raise EclmError("README.md has no board install command",
                    hint="its '## Raspberry Pi' section needs a ```console block with a '$ ... pip install' line")


def committed_tree(dest: Path) -> str:
    """Unpack the repository's HEAD into ``dest``; returns the commit (uncommitted changes are not included)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        raise EclmError(f"{ROOT} is not a git checkout", hint="the board test installs the committed tree: "
                        "run it from a clone of the repository")
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                      capture_output=True, text=True).stdout.strip():
        say("uncommitted changes are not part of the board install: it installs HEAD")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise EclmError("git archive HEAD failed", hint=f"check the repository at {ROOT}")
    return head.stdout.strip()


def _bank_key() -> str:
    """A digest of the files bank and bundle are made from: the cached ones are reused only while these hold."""
    h = hashlib.sha256()
    for name in BANK_INPUTS:
        p = ROOT / name
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def host_bundle(cache: Path, work: Path, timings: dict[str, float]) -> tuple[Path, list[str]]:
    """A digits pi4 bundle for ``CLASSES``, made on the host; bank and bundle are cached while their sources hold."""
    bin_dir = Path(sys.executable).parent
    folder = cache / f"digits-{_bank_key()}"
    for old in cache.glob("digits-*"):
        if old != folder:
            shutil.rmtree(old)
    bank, bundle = folder / "bank", folder / "bundle-pi4"
    train = [str(bin_dir / "eclm-cloud"), "train", "--dataset", "digits", "--bank", str(bank)]
    export = [str(bin_dir / "eclm-export"), "--bank", str(bank), "--profile", "pi4", "--out", str(bundle),
              "--classes", ",".join(map(str, CLASSES))]
    for key, cmd, out, done in (("host_train_bank_s", train, bank, "bank.json"),
                                ("host_export_s", export, bundle, "manifest.json")):
        if (out / done).exists():
            say(f"reusing {out} (made by: {shlex.join(cmd)})")
            continue
        shutil.rmtree(out, ignore_errors=True)
        say(f"host: {shlex.join(cmd)}")
        t0 = time.perf_counter()
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _host([str(partial) if a == str(out) else a for a in cmd], work / f"{out.name}.log")
        partial.rename(out)  # only a finished bank or bundle is ever reused
        timings[key] = time.perf_counter() - t0
    shown = [[Path(cmd[0]).name, *cmd[1:]] for cmd in (train, export)]  # as a user types them
    return bundle, [shlex.join(cmd) for cmd in shown]


def _host(cmd: list[str], log: Path) -> None:
    chroot.run_logged(cmd, log, say, Path(cmd[0]).name)


def device_data(seed: int = 0) -> dict[str, np.ndarray]:
    """The device's local samples and held-out test samples: pool digits of ``CLASSES``, rotated."""
    from bench.corruptions import corrupt
    from exporter.data import load_dataset, split

    pool = split(load_dataset("digits"), 0).pool
    mask = np.isin(pool.y, CLASSES)
    x = corrupt(pool.x[mask].astype(np.float32), CORRUPTION, 1.0, seed)
    y = pool.y[mask].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    local, test = order[: len(y) // 2], order[len(y) // 2:]
    return {"x_local": x[local], "y_local": y[local], "x_test": x[test], "y_test": y[test]}


# Every platform tag pip accepts in bookworm's arm64 userland (glibc 2.36), best first.
AARCH64_PLATFORMS = (*(f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)), "manylinux2014_aarch64",
                     "linux_aarch64")


def fetched_wheels(install_log: str) -> list[str]:
    """The wheel files pip downloaded during an install (its ``Downloading x.whl`` lines)."""
    return sorted(set(re.findall(r"Downloading (?:\S*/)?([^\s/]+\.whl)", install_log)))


WHEELHOUSE_DAYS = 7  # after this, or when pyproject.toml changes, the install asks the index again
BUILD_TOOLS = ("setuptools", "wheel")  # pip's isolated build of the project fetches them out of sight


def wheelhouse_ready(wheels: Path) -> bool:
    """The wheelhouse was filled for the current pyproject.toml less than ``WHEELHOUSE_DAYS`` ago."""
    try:
        record = json.loads((wheels / "record.json").read_text())
    except (OSError, ValueError):
        return False
    fresh = time.time() - float(record.get("filled", 0)) < WHEELHOUSE_DAYS * 86400
    return bool(fresh and record.get("pyproject") == _pyproject_key())


def _pyproject_key() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]


def fill_wheelhouse(wheels: Path, downloaded: list[str], python: str) -> list[str]:
    """Fetch, natively on the host, the aarch64 wheel files an install downloaded (and the build tools)
    into a folder of wheels, and record that it serves the current pyproject.toml: the next install runs
    offline from it (``PIP_NO_INDEX``). pip's own HTTP cache keeps nothing behind a proxy that strips
    Cache-Control, and with both a local wheel and the index's equal one it takes the index's. Returns
    the requirements fetched; a failure is only a warning.
    """
    have = {f.name for f in wheels.glob("*.whl")}
    want = [f"{name}=={version}" for name, version, *_ in (f.split("-") for f in downloaded if f not in have)]
    major_minor = ".".join(python.split(".")[:2])
    common = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--only-binary=:all:",
              "--index-url", "https://pypi.org/simple", "--dest", str(wheels)]
    if Path("/" + chroot.CA_BUNDLE).exists():
        common += ["--cert", "/" + chroot.CA_BUNDLE]
    target = ["--python-version", major_minor, "--implementation", "cp", "--abi", "cp" + major_minor.replace(".", ""),
              *(f"--platform={p}" for p in AARCH64_PLATFORMS)]
    wheels.mkdir(parents=True, exist_ok=True)
    for cmd in ([*common, *target, *want] if want else None, [*common, *BUILD_TOOLS]):
        if cmd is None:
            continue
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            say(f"warning: could not keep the downloaded wheels for the next run: {done.stderr.strip()[-200:]}")
            return []
    (wheels / "record.json").write_text(json.dumps({"pyproject": _pyproject_key(), "filled": time.time()}) + "\n")
    say(f"kept {len(want)} downloaded wheels and the build tools in {wheels}: the next install runs offline from it")
    return want

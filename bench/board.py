"""`make board-test`: the edge runtime installed and driven on an emulated arm64 Debian board (qemu-user).

Run as root: ``python -m bench.board [--cache DIR] [--out docs/benchmarks]``. It builds or reuses an
arm64 Debian bookworm rootfs (``bench/chroot.py``), installs the committed tree there with the
README's Raspberry Pi command, checks the install (aarch64, no torch), exports a digits pi4 bundle on
the host with ``eclm-cloud train`` and ``eclm-export``, runs ``eclm-edge serve`` inside, and drives it
over HTTP from the host: predict, bad input, samples, a training run, the new generation served, the
delta in the outbox, held-out accuracy. Writes ``board.json`` and ``board.md``; exits 1 when a check
fails. Every time it reports is emulated: it is not a Raspberry Pi figure.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench import chroot
from bench.board_host import (
    CLASSES,
    CORRUPTION,
    ROOT,
    board_install_command,
    committed_tree,
    device_data,
    fetched_wheels,
    fill_wheelhouse,
    host_bundle,
    run_main,
    say,
    wheelhouse_ready,
)
from bench.board_report import Check, render
from bench.broker import free_port
from eclm.errors import EclmError

DEFAULT_CACHE = "/var/cache/eclm-board"
SRC, RUN = "/opt/eclm/src", "/opt/eclm/run"  # inside the rootfs
PIP_DIR = "/var/cache/eclm-pip"  # inside; bound to <cache>/pip: pip's cache and a folder of wheels
PROBE = ("import importlib.metadata as md, importlib.util, json, platform; import onnxruntime as ort; "
         "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
         "'torch_installed': importlib.util.find_spec('torch') is not None, 'onnxruntime': ort.__version__, "
         "'providers': ort.get_available_providers(), "
         "'distributions': sorted(d.metadata['Name'].lower() for d in md.distributions())}))")


class Board:
    """HTTP client of the runtime inside the rootfs (the chroot shares the host's loopback)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=600) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        code, out = self.post("/v1/predict", {"inputs": x.tolist()})
        if code != 200:
            raise EclmError(f"POST /v1/predict answered {code}: {out}", hint="see serve.log in the cache folder")
        pred = np.array([out["labels"].index(p) for p in out["predictions"]])
        return float((pred == y).mean())


def install(root: Path, cache: Path, command: str, timings: dict[str, float]) -> tuple[Path, str, bool]:
    """Fresh source copy and the README's install command inside: offline from the cache folder's wheels
    when they serve this pyproject.toml, else (or when that fails) from the index. Returns the venv's bin
    folder inside, the commit and whether the install went to the index.
    """
    src = root / SRC.lstrip("/")
    if src.parent.exists():
        shutil.rmtree(src.parent)
    commit = committed_tree(src)
    chroot.prepare_network(root)
    env = {"PIP_CACHE_DIR": f"{PIP_DIR}/cache", "PIP_FIND_LINKS": f"{PIP_DIR}/wheels",
           "PIP_CERT": "/" + chroot.CA_BUNDLE, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off"}
    online = not wheelhouse_ready(cache / "pip" / "wheels")
    t0 = time.perf_counter()
    for attempt in ("offline", "online"):
        if attempt == "offline" and online:
            continue
        say(f"installing commit {commit[:10]} inside ({attempt}) with the README's command: {command}")
        try:
            chroot.run_logged(chroot.inside(root, ["/bin/sh", "-c", command], cwd=SRC,
                                            env={**env, "PIP_NO_INDEX": "1"} if attempt == "offline" else env),
                              cache / "install.log", say, f"pip install (emulated, {attempt})", heartbeat=20)
            online = attempt == "online"
            break
        except EclmError as exc:
            if attempt == "online":
                raise
            say(f"the offline install failed ({exc.message[:120]}); asking the index")
            shutil.rmtree(src / ".venv", ignore_errors=True)
    timings["install_s"] = time.perf_counter() - t0
    found = sorted(src.glob("*/bin/eclm-edge"))
    if not found:
        raise EclmError("the README's board install command left no eclm-edge in a virtualenv in the source folder",
                        hint=f"see {cache / 'install.log'}")
    return Path("/") / found[0].parent.relative_to(root), commit, online


def probe(root: Path, venv_bin: Path) -> dict[str, Any]:
    done = subprocess.run(chroot.inside(root, [str(venv_bin / "python"), "-c", PROBE]), capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise EclmError(f"the installed runtime does not import: {done.stderr.strip()[-300:]}",
                        hint="see the install log in the cache folder")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def start_edge(root: Path, venv_bin: Path, bundle: Path, cache: Path, timings: dict[str, float]) -> tuple[Board, Any]:
    """``eclm-edge serve`` inside the rootfs on a free host port, driven over HTTP from the host."""
    run = root / RUN.lstrip("/")
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copytree(bundle, run / "bundle")
    port = free_port()
    argv = serve_argv(venv_bin / "eclm-edge", Path(RUN) / "bundle", Path(RUN) / "state", port)
    say(f"inside: {shlex.join(argv)}")
    t0 = time.perf_counter()
    board, proc = launch(chroot.inside(root, argv, env=SERVE_ENV), port, cache / "serve.log",
                         "eclm-edge serve (emulated)")
    timings["serve_start_s"] = time.perf_counter() - t0
    say(f"serving after {timings['serve_start_s']:.0f} s (emulated)")
    return board, proc


# Automatic training and resource monitors off: the run decides when to train, and emulated CPU and
# latency readings would step the variant ladder down for reasons no board has.
SERVE_ENV = {"ECLM_EDGE_RESOURCE_INTERVAL_S": "0", "ECLM_EDGE_DRIFT": "false"}


def serve_argv(edge_bin: Path, bundle: Path, state: Path, port: int, device: str = "board-arm64") -> list[str]:
    return [str(edge_bin), "serve", "--bundle", str(bundle), "--state-dir", str(state), "--port", str(port),
            "--device-id", device, "--train-every", "0"]


def launch(cmd: list[str], port: int, log_path: Path, what: str, env: dict[str, str] | None = None,
           timeout: float = 600) -> tuple[Board, Any]:
    """Start a server process and wait (with progress lines) until it answers /healthz."""
    board = Board(port)
    t0 = last_say = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while time.perf_counter() - t0 < timeout:
        if time.perf_counter() - last_say > 30:
            say(f"starting {what}: {time.perf_counter() - t0:.0f} s")
            last_say = time.perf_counter()
        try:
            board.get("/healthz")
            return board, proc
        except OSError:
            if proc.poll() is not None:
                raise EclmError(f"{what} exited", hint=f"see {log_path}") from None
            time.sleep(0.5)
    stop_edge(proc)
    raise EclmError(f"{what} did not answer within {timeout:.0f} s", hint=f"see {log_path}")


def native_step(bundle: Path, data: dict[str, np.ndarray], work: Path) -> dict[str, Any]:
    """The same bundle, samples and run on this host, natively: what the emulated figures compare with."""
    port = free_port()
    argv = serve_argv(Path(sys.executable).parent / "eclm-edge", bundle, work / "native-state", port)
    env = {**os.environ, **SERVE_ENV}
    board, proc = launch(argv, port, work / "native-serve.log", "eclm-edge serve (native)", env=env)
    try:
        board.post("/v1/samples", {"inputs": data["x_local"].tolist(), "labels": [int(v) for v in data["y_local"]]})
        last = train(board, [], "native")
    finally:
        stop_edge(proc)
    say(f"native reference: {last.get('steps')} steps, median {_f(last.get('step_ms_median'))} ms")
    return last


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def stop_edge(proc: Any) -> None:
    """SIGTERM (the server shuts down cleanly), then SIGKILL to whatever is left of its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            say("stopping eclm-edge serve: it lets a running training run finish (up to 60 s)")
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
    chroot.kill_group(proc)


def drive(edge: Board, state: Path, data: dict[str, np.ndarray], checks: list[Check], what: str = "emulated"
          ) -> dict[str, Any]:
    """Every HTTP check against the running runtime whose state directory is ``state``; returns the figures."""
    figures: dict[str, Any] = {}
    st = edge.get("/v1/status")
    gen0 = st["bundle"]["generation"]
    figures["status_trainable"] = st["bundle"]["trainable"]
    checks.append(Check("serves the pi4 bundle", st["bundle"]["profile"] == "pi4", f"generation {gen0}, "
                        f"trainable reported {st['bundle']['trainable']} {st['bundle']['training_reason']}".strip()))
    before = edge.accuracy(data["x_test"], data["y_test"])
    figures["acc_before"] = before
    checks.append(Check("predict", True, f"{len(data['y_test'])} held-out samples, accuracy {before:.3f}"))
    lat = []
    for i in range(20):
        t0 = time.perf_counter()
        code, _ = edge.post("/v1/predict", {"inputs": data["x_test"][i:i + 1].tolist()})
        lat.append((time.perf_counter() - t0) * 1e3)
    figures["predict_http_ms_p50"] = float(np.median(lat))
    code, out = edge.post("/v1/predict", {"inputs": [[1.0, 2.0, 3.0]]})
    alive = edge.get("/healthz") is not None
    checks.append(Check("bad input refused, still serving", code == 400 and alive, f"{code} {out.get('error', '')}"))
    code, out = edge.post("/v1/samples", {"inputs": data["x_local"].tolist(),
                                          "labels": [int(v) for v in data["y_local"]]})
    held = edge.get("/v1/status")["samples"]["held"]
    checks.append(Check("samples stored", code == 200 and held == len(data["y_local"]), f"{code}, {held} held"))
    last = train(edge, checks, what)
    figures["training"] = last
    st = edge.get("/v1/status")
    gen1 = st["bundle"]["generation"]
    _, served = edge.post("/v1/predict", {"inputs": data["x_test"][:1].tolist()})
    hb, ha = last.get("holdout_before"), last.get("holdout_after")
    checks.append(Check("training run accepted", bool(last.get("accepted")), str(last.get("reason") or (
        f"holdout accuracy {hb:.3f} -> {ha:.3f}, {last.get('steps')} steps" if hb is not None and ha is not None
        else ""))))
    checks.append(Check("new generation served", gen1 > gen0 and served.get("generation") == gen1,
                        f"generation {gen0} -> {gen1}, predict answers generation {served.get('generation')}"))
    files = sorted((state / "outbox").glob("*.delta"))
    checks.append(Check("delta in the outbox", st["outbox"]["entries"] >= 1 and len(files) >= 1,
                        f"{st['outbox']['entries']} entries, {st['outbox']['bytes']} bytes, {len(files)} files"))
    after = edge.accuracy(data["x_test"], data["y_test"])
    figures["acc_after"] = after
    checks.append(Check("held-out accuracy up", after > before, f"{before:.3f} -> {after:.3f}"))
    steps, seconds = last.get("steps") or 0, last.get("seconds") or 0.0
    figures["step_ms_emulated"] = last.get("step_ms_median") or (seconds / steps * 1e3 if steps else None)
    return figures


def train(edge: Board, checks: list[Check], what: str = "emulated", timeout: float = 1800) -> dict[str, Any]:
    """POST /v1/train and wait (with progress lines) for the run's result."""
    code, out = edge.post("/v1/train", {})
    checks.append(Check("training run started", code == 202, f"{code} {json.dumps(out)[:200]}"))
    if code != 202:
        return {"accepted": False, "reason": f"POST /v1/train answered {code}: {out.get('error', out)}"}
    t0 = last_say = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tr = edge.get("/v1/status")["training"]
        if not tr["running"] and tr["last"]:
            say(f"training finished in {time.monotonic() - t0:.0f} s ({what})")
            return dict(tr["last"])
        if time.monotonic() - last_say > 30:
            say(f"training ({what}): {time.monotonic() - t0:.0f} s")
            last_say = time.monotonic()
        time.sleep(1)
    return {"accepted": False, "reason": f"no result within {timeout:.0f} s"}


def run(cache: Path, out: Path) -> int:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    chroot.check_host()
    cache.mkdir(parents=True, exist_ok=True)
    lock = open(cache / "lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise EclmError(f"another board test is using {cache}", hint="wait for it, or set ECLM_BOARD_CACHE") from None
    for stale in cache.glob("work-*"):  # a killed run's bundle
        shutil.rmtree(stale, ignore_errors=True)
    command = board_install_command((ROOT / "README.md").read_text())
    t0 = time.perf_counter()
    root, rootfs = chroot.ensure_rootfs(cache, say)
    timings["rootfs_s"] = time.perf_counter() - t0
    chroot.check_network("https://pypi.org/simple/")
    work = Path(tempfile.mkdtemp(prefix="work-", dir=cache))
    checks: list[Check] = []
    figures: dict[str, Any] = {}
    try:
        bundle, host_commands = host_bundle(cache, work, timings)
        data = device_data()
        (cache / "pip" / "wheels").mkdir(parents=True, exist_ok=True)
        with chroot.mounted(root, {PIP_DIR: cache / "pip"}, say):
            venv_bin, commit, online = install(root, cache, command, timings)
            info = probe(root, venv_bin)
            downloaded = fetched_wheels((cache / "install.log").read_text(errors="replace"))
            if online:
                fill_wheelhouse(cache / "pip" / "wheels", downloaded, info["python"])
            checks.append(Check("runs as aarch64", info["machine"] == "aarch64", f"platform.machine() = "
                                f"{info['machine']}, Python {info['python']}"))
            checks.append(Check("torch not installed", not info["torch_installed"], "importlib finds no torch"))
            training_dists = [d for d in info["distributions"] if "training" in d]
            checks.append(Check("plain onnxruntime", not training_dists and "onnxruntime" in info["distributions"],
                                f"onnxruntime {info['onnxruntime']}; training packages: {training_dists or 'none'}"))
            edge, proc = start_edge(root, venv_bin, bundle, cache, timings)
            try:
                t0 = time.perf_counter()
                figures = drive(edge, root / RUN.lstrip("/") / "state", data, checks)
                timings["drive_s"] = time.perf_counter() - t0
            finally:
                stop_edge(proc)
        t0 = time.perf_counter()
        figures["native"] = native_step(bundle, data, work)
        figures["pip"] = {"online": online, "downloaded_wheels": downloaded}
        timings["native_reference_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t_start
    results = {"command": "python -m bench.board " + shlex.join(sys.argv[1:]),
               "checks": [vars(c) for c in checks], "figures": figures, "timings": timings, "rootfs": rootfs,
               "install_command": command, "commit": commit, "host_commands": host_commands, "probe": info,
               "classes": list(CLASSES), "load_avg_1m": os.getloadavg()[0], "corruption": CORRUPTION, "samples": {
                   "local": len(data["y_local"]), "test": len(data["y_test"])}}
    render(out, results)
    failed = [c.name for c in checks if not c.ok]
    say(f"{len(checks) - len(failed)} of {len(checks)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "") + f"; {timings['total_s']:.0f} s; report in {out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.board", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("ECLM_BOARD_CACHE") or DEFAULT_CACHE),
                   help="rootfs, bank and pip cache, logs (outside the repository) [env ECLM_BOARD_CACHE]")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="where board.json/.md go")
    args = p.parse_args(argv)

    def on_signal(signum: int, _frame: Any) -> None:
        say(f"signal {signum}: stopping what runs in the rootfs and unmounting")
        raise SystemExit(128 + signum)  # unwinds through every finally: the server stops, mounts go

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    run_main("board-test", lambda: run(args.cache.resolve(), args.out),
             "interrupted; nothing left mounted or running")

if __name__ == "__main__":
    main()

"""The daemon and edge runtimes as real subprocesses, and HTTP helpers to drive them (demo, benchmarks, tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.broker import free_port
from bench.reaper import track

CLI = "import sys; from {mod} import main; sys.argv[0] = '{name}'; main()"


def _cmd(mod: str, name: str, *args: str) -> list[str]:
    return [sys.executable, "-c", CLI.format(mod=mod, name=name), *args]


class Proc:
    """A subprocess with its log file; killed on close."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self.env = env or {}
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        f = open(self.log, "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = track(subprocess.Popen(self.args, stdout=f, stderr=f, env=env))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_connected(proc: Proc, timeout: float = 90) -> None:
    """Block until a daemon's log says it is connected (so it is subscribed before devices publish)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "connected to mqtt" in proc.tail(200):  # mqtt:// or mqtts://
            return
        if not proc.alive():
            raise RuntimeError(f"the sync daemon died:\n{proc.tail()}")
        time.sleep(0.2)
    raise TimeoutError(f"the sync daemon did not connect:\n{proc.tail()}")


def daemon(bank: Path, broker: str, key: Path, log: Path, *extra: str) -> Proc:
    """``eclm-cloud sync`` as a process; its Prometheus port is ``proc.metrics_port``."""
    port = free_port()
    proc = Proc(_cmd("cloud_sync.cli", "eclm-cloud", "sync", "--bank", str(bank), "--broker", broker,
                     "--signing-key", str(key), "--metrics-port", str(port), *extra), log)
    proc.metrics_port = port
    return proc


class Edge:
    """One ``eclm-edge serve`` process and its HTTP address."""

    def __init__(self, device_id: str, bundle: Path, state: Path, broker: str, trust: Path, log: Path,
                 *extra: str, env: dict[str, str] | None = None) -> None:
        self.device_id = device_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(_cmd("edge_runtime.cli", "eclm-edge", "serve", "--bundle", str(bundle), "--state-dir",
                              str(state), "--port", str(self.port), "--device-id", device_id, "--broker", broker,
                              "--trust-key", str(trust), "--train-every", "0", *extra), log, env)

    def start(self, timeout: float = 60) -> None:
        self.proc.start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self.get("/healthz")
                return
            except OSError:
                if not self.proc.alive():
                    raise RuntimeError(f"edge {self.device_id} died:\n{self.proc.tail()}") from None
                time.sleep(0.1)
        raise TimeoutError(f"edge {self.device_id} did not come up:\n{self.proc.tail()}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples from GET /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        code, out = self.post("/v1/predict", {"inputs": x.tolist()})
        assert code == 200, out
        labels = out["labels"]
        pred = np.array([labels.index(p) for p in out["predictions"]])
        return float((pred == y).mean())

    def train_and_wait(self, timeout: float = 120) -> dict[str, Any]:
        before = (self.get("/v1/status")["training"]["last"] or {}).get("finished")
        code, out = self.post("/v1/train", {})
        assert code in (202, 409), out
        deadline = time.time() + timeout
        while time.time() < deadline:
            last = self.get("/v1/status")["training"]["last"]
            if last and last.get("finished") != before:
                return dict(last)
            time.sleep(0.2)
        raise TimeoutError(f"training on {self.device_id} did not finish")

    def feed_and_train(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n: int = 40) -> str | None:
        """Post ``n`` labelled samples drawn from (x, y), run one training and wait for it; its delta id, if any."""
        pick = rng.choice(len(y), size=n, replace=False)
        code, out = self.post("/v1/samples", {"inputs": x[pick].tolist(), "labels": y[pick].tolist()})
        if code != 200:
            raise RuntimeError(f"samples answered {code}: {out}")
        last = self.train_and_wait(timeout=180)
        return str(last["delta_id"]) if last.get("delta_id") else None

    def wait_outbox_empty(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.get("/v1/status")["outbox"]["entries"] == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"outbox of {self.device_id} not acknowledged:\n{self.proc.tail()}")


def ledger_rows(bank: Path | str) -> list[tuple[str, str, str, str]]:
    """(delta_id, device_id, status, reason) of every delta the ledger knows, read beside the running daemon."""
    from module_bank import read_ledger

    ledger = read_ledger(bank)
    try:
        return ledger.delta_rows()
    finally:
        ledger.close()


def ledger_versions(bank: Path | str) -> dict[str, int]:
    from module_bank import read_ledger

    ledger = read_ledger(bank)
    try:
        return ledger.versions()
    finally:
        ledger.close()


def wait_until(cond: Any, timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")

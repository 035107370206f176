"""Helpers shared by the edge runtime tests (``test_edge_*.py``); this module holds no tests.

Everything is real: services on real state directories, `eclm-edge serve` as a real child process
on a real socket, and real bytes flipped in real files.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _eclm_testutil import ROOT, subprocess_env

from eclm.hashing import sha256_file
from edge_runtime.config import load_config
from edge_runtime.http_api import wait_ready
from edge_runtime.service import EdgeService


def make_service(state_dir: Path, bundle: Path | None = None, **overrides: Any) -> EdgeService:
    """An :class:`EdgeService` on ``state_dir`` that never trains by itself unless told to.

    ``environ={}`` keeps ECLM_EDGE_* variables of the caller's shell out of the test.
    """
    values: dict[str, Any] = {"bundle": bundle, "state_dir": state_dir, "train_every_samples": 0, **overrides}
    return EdgeService(load_config(overrides=values, environ={}))


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of ``path`` in place (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def temporaries(state_dir: Path) -> list[Path]:
    """Half-written folders (``.tmp-*``) under the state's gens/ and bundles/."""
    return sorted(p for sub in ("gens", "bundles") for p in (state_dir / sub).glob(".tmp-*"))


def generation_problems(state_dir: Path, n: int) -> list[str]:
    """What is wrong with generation ``n`` (missing record, altered or missing files); [] when it verifies.

    Checked here by hand (not with ``StateDir``, whose constructor would clean up the evidence).
    """
    folder = state_dir / "gens" / f"{n:06d}"
    try:
        info = json.loads((folder / "generation.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"generation.json: {exc}"]
    problems = []
    if not info.get("files"):
        problems.append("generation.json lists no files")
    for name, digest in info.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name} altered")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edge_command() -> list[str]:
    """The `eclm-edge` console script of this interpreter's environment (or the same entry point via -c)."""
    script = Path(sys.executable).parent / "eclm-edge"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from edge_runtime.cli import main; main()"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items()
           if not k.startswith("ECLM_EDGE_") and k not in ("ECLM_BUNDLE", "ECLM_BROKER", "ECLM_TRUST_KEY")}
    env.update(extra)
    return env


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# The resource monitor steps down to a cheaper variant when the machine is busy for a few seconds, which
# on a shared test machine would change which model answers in the middle of a test: keep it off.
PINNED_ENV = {"ECLM_EDGE_RESOURCE_INTERVAL_S": "0"}


@dataclass
class EdgeServer:
    """`eclm-edge serve` as a child process on a free port."""

    state_dir: Path
    bundle: Path | None = None
    args: list[str] = field(default_factory=lambda: ["--train-every", "0"])
    env: dict[str, str] = field(default_factory=lambda: dict(PINNED_ENV))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}-serve.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 60.0) -> EdgeServer:
        for _attempt in range(3):  # another process may grab the free port between probe and bind
            self.port = free_port()
            cmd = [*edge_command(), "serve", "--state-dir", str(self.state_dir), "--port", str(self.port), *self.args]
            if self.bundle is not None:
                cmd += ["--bundle", str(self.bundle)]
            with open(self.log_path, "ab") as log:
                log.write(f"\n$ {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(**self.env),
                                             cwd=ROOT)
            deadline = time.time() + timeout
            while True:
                if self.proc.poll() is not None:
                    if "address already in use" in self.log().lower():
                        break
                    raise AssertionError(f"eclm-edge serve exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    wait_ready(self.url, timeout=0.3)
                    return self
                except OSError:
                    if time.time() > deadline:
                        self.kill()
                        raise AssertionError(f"eclm-edge serve not ready after {timeout} s:\n{self.log()}") from None
        raise AssertionError(f"could not bind a free port:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def raw(self, request: bytes, timeout: float = 5.0) -> bytes:
        """Send bytes as they are on a fresh connection; returns whatever arrives until close or timeout."""
        out = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(request)
            try:
                while chunk := s.recv(65536):
                    out += chunk
                    head, sep, body = out.partition(b"\r\n\r\n")
                    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                    if sep and lengths and len(body) >= int(lengths[0].split(b":")[1]):
                        break
            except TimeoutError:
                pass
        return out

    def status(self) -> dict[str, Any]:
        r = self.request("GET", "/v1/status")
        assert r.status == 200, r.body
        return dict(r.json())

    def wait_training(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll the status until no run is going and a last run is reported."""
        deadline = time.time() + timeout
        while True:
            st = self.status()
            if not st["training"]["running"] and st["training"]["last"] is not None:
                return st
            if time.time() > deadline:
                raise AssertionError(f"training did not finish in {timeout} s: {st['training']}")
            time.sleep(0.05)

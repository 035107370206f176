"""What the edge's HTTP server costs in memory: RSS of a bare server process, idle and after a short load,
for the runtime's own server (standard library) and, optionally, waitress from another interpreter.

    python -m bench.http_rss [--seconds 5] [--clients 8] [--waitress-python /tmp/venv/bin/python]
                             [--bundle DIR]

Each server answers the same three endpoints (``/healthz``, ``GET /v1/status`` with a fixed JSON
object, ``POST /v1/predict`` parsing a JSON batch into a numpy array) with numpy and
prometheus-client imported, so the difference is the server. With ``--bundle`` the whole runtime
(`eclm-edge serve`) is measured the same way. The waitress interpreter needs ``waitress``, ``numpy``
and ``prometheus-client`` (a throwaway virtualenv; the project does not depend on waitress).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = {"bundle": "x" * 16, "generation": 0, "samples": 0, "training": {"running": False}}

STDLIB_SERVER = """
import json, sys, types
import numpy as np
from edge_runtime.http_api import EdgeHttpServer
from edge_runtime.metrics import EdgeMetrics

class Stub:
    cfg = types.SimpleNamespace(max_body_bytes=8 * 2**20)
    metrics = EdgeMetrics()
    def status(self): return STATUS
    def predict(self, x): return {"predictions": [0] * len(x)}

server = EdgeHttpServer("127.0.0.1", int(sys.argv[1]), 8, 1024, 10.0)
server.service = Stub()
print("ready", flush=True)
server.serve_forever()
"""

WAITRESS_SERVER = """
import json, sys
import numpy as np
import prometheus_client
import waitress

def app(environ, start_response):
    path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
    if path == "/healthz":
        body = {"ok": True}
    elif path == "/v1/status":
        body = STATUS
    elif path == "/v1/predict" and method == "POST":
        n = int(environ.get("CONTENT_LENGTH") or 0)
        x = np.asarray(json.loads(environ["wsgi.input"].read(n))["inputs"], dtype=np.float32)
        body = {"predictions": [0] * len(x)}
    else:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"error": "no endpoint"}\\n']
    data = (json.dumps(body) + "\\n").encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]

print("ready", flush=True)
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=8, _quiet=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _wait(port: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def _load(port: int, seconds: float, clients: int, headers: dict[str, str]) -> int:
    """``clients`` keep-alive connections alternating status and predict (8 rows of 64) for ``seconds``."""
    body = json.dumps({"inputs": [[0.5] * 64] * 8})
    done = [0] * clients
    stop = time.time() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.time() < stop:
            if done[i] % 2:
                conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json", **headers})
            else:
                conn.request("GET", "/v1/status", headers=headers)
            r = conn.getresponse()
            r.read()
            assert r.status == 200, r.status
            done[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def _imports_only(cmd: list[str], env: dict[str, str]) -> float:
    """RSS (MiB) of the server's script stopped just before it builds the server: what its imports cost."""
    code = cmd[2].split("\nclass Stub" if "class Stub" in cmd[2] else "\ndef app")[0]
    proc = subprocess.Popen([cmd[0], "-c", code + "\nimport time; print('ready', flush=True); time.sleep(60)"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(1.0)
        return _kib(proc.pid, "VmRSS") / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def measure(cmd: list[str], port: int, seconds: float, clients: int, env: dict[str, str],
            headers: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _wait(port)
        time.sleep(1.0)
        idle = _kib(proc.pid, "VmRSS")
        n = _load(port, seconds, clients, headers or {})
        out = {"idle_mib": idle / 1024, "after_load_mib": _kib(proc.pid, "VmRSS") / 1024,
               "peak_mib": _kib(proc.pid, "VmHWM") / 1024, "requests_per_s": n / seconds}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out["imports_mib"] = _imports_only(cmd, env) if cmd[1] == "-c" else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="load duration per server (default 5)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent keep-alive clients (default 8)")
    ap.add_argument("--waitress-python", help="an interpreter with waitress, numpy and prometheus-client")
    ap.add_argument("--bundle", help="also measure `eclm-edge serve` on this bundle")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prelude = f"STATUS = {STATUS!r}\n"
    rows: dict[str, dict[str, float]] = {}
    port = _free_port()
    rows["stdlib (EdgeHttpServer)"] = measure([sys.executable, "-c", prelude + STDLIB_SERVER, str(port)], port,
                                              args.seconds, args.clients, env)
    if args.waitress_python:
        port = _free_port()
        rows["waitress 8 threads"] = measure([args.waitress_python, "-c", prelude + WAITRESS_SERVER, str(port)],
                                             port, args.seconds, args.clients, env)
    if args.bundle:
        port = _free_port()
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(Path(sys.executable).parent / "eclm-edge"), "serve", "--bundle", args.bundle, "--state-dir",
                   str(Path(tmp) / "state"), "--port", str(port), "--train-every", "0"]
            rows["eclm-edge serve (whole runtime)"] = measure(
                cmd, port, args.seconds, args.clients, {**env, "ECLM_EDGE_RESOURCE_INTERVAL_S": "0"})
    print(f"| server | RSS of its imports alone (MiB) | RSS idle (MiB) | RSS after {args.seconds:g} s of load (MiB) "
          f"| peak RSS (MiB) | requests/s ({args.clients} clients) |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, r in rows.items():
        print(f"| {name} | {r['imports_mib']:.1f} | {r['idle_mib']:.1f} | {r['after_load_mib']:.1f} "
              f"| {r['peak_mib']:.1f} | {r['requests_per_s']:.0f} |")


if __name__ == "__main__":
    main()

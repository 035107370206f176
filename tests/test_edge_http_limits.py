"""`eclm-edge serve` under hostile clients, over real sockets: bounded JSON, strict JSON answers, a bounded
worker pool, idle timeouts and a real listen backlog.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_edge_support import PINNED_ENV, EdgeServer

from eclm.manifest import BundleManifest

Bundles = dict[str, tuple[Path, BundleManifest]]
ONE = [1.0] * 64


def strict(body: bytes) -> Any:
    """JSON as RFC 8259 has it: NaN, Infinity and -Infinity are not JSON (JavaScript's JSON.parse refuses them)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in a JSON answer")

    return json.loads(body, parse_constant=refuse)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture(scope="module")
def server(digits_bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    srv = EdgeServer(tmp_path_factory.mktemp("limits") / "state", digits_bundles["pi4"][0],
                     ["--train-every", "0"]).start()
    yield srv
    srv.stop()


def _still_serving(srv: EdgeServer) -> None:
    assert srv.proc is not None and srv.proc.poll() is None
    r = srv.request("POST", "/v1/predict", {"inputs": [ONE]})
    assert r.status == 200, r.body


@pytest.mark.parametrize("case,raw", [
    ("huge-integer-input", b'{"inputs": [[' + b"9" * 400 + b", 1" * 63 + b"]]}"),
    ("integer-beyond-python's-limit", b'{"inputs": [[' + b"1" * 5000 + b", 1" * 63 + b"]]}"),
    ("huge-negative-integer", b'{"inputs": [[-' + b"9" * 60 + b", 1" * 63 + b"]]}"),
    ("deep-nesting", b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("deep-objects", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
    ("nan-literal", b'{"inputs": [[NaN' + b", 1" * 63 + b"]]}"),
])
def test_hostile_json_is_a_400_and_the_server_keeps_serving(case: str, raw: bytes, server: EdgeServer) -> None:
    for path in ("/v1/predict", "/v1/samples"):
        r = server.request("POST", path, raw=raw)
        assert r.status == 400, (case, path, r.status, r.body[:300])
        body = strict(r.body)
        assert body["error"] and body["hint"]
    _still_serving(server)


def test_a_huge_integer_label_is_a_400(server: EdgeServer) -> None:
    raw = b'{"inputs": [[' + b"1, " * 63 + b'1]], "labels": [' + b"7" * 400 + b"]}"
    r = server.request("POST", "/v1/samples", raw=raw)
    assert r.status == 400, r.body
    assert "digits" in strict(r.body)["error"]


def test_every_answer_is_strict_json(digits_bundles: Bundles, xy, tmp_path: Path) -> None:
    """Before the first predict the latency readings are unknown: null, not NaN (JSON.parse failed on it)."""
    x, y = xy
    env = {**PINNED_ENV, "ECLM_EDGE_RESOURCE_INTERVAL_S": "0.1"}
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi4"][0], ["--train-every", "0"], env=env).start()
    try:
        deadline = time.time() + 30
        while strict(srv.request("GET", "/v1/status").body)["variant"]["readings"] is None:
            assert time.time() < deadline, "no resource readings"
            time.sleep(0.1)
        status = strict(srv.request("GET", "/v1/status").body)
        assert status["variant"]["readings"]["latency_ms_p95"] is None  # no predictions yet
        answers = [
            srv.request("GET", "/healthz"),
            srv.request("POST", "/v1/predict", {"inputs": x[:4].reshape(4, -1).tolist()}),
            srv.request("POST", "/v1/samples", {"inputs": x[:40].reshape(40, -1).tolist(), "labels": y[:40].tolist()}),
            srv.request("POST", "/v1/predict", raw=b"nope"),
            srv.request("GET", "/v1/predict"),
            srv.request("GET", "/nowhere"),
            srv.request("POST", "/v1/train"),
        ]
        srv.wait_training()
        answers += [srv.request("GET", "/v1/status"), srv.request("PUT", "/v1/status")]
        for r in answers:
            assert r.headers["content-type"] == "application/json"
            strict(r.body)
    finally:
        srv.stop()


def _hold(port: int, n: int) -> list[socket.socket]:
    """Connections that say nothing: each occupies a worker until the idle timeout closes it."""
    return [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(n)]


def test_idle_connections_are_closed_and_threads_stay_bounded(digits_bundles: Bundles, tmp_path: Path) -> None:
    env = {**PINNED_ENV, "ECLM_EDGE_HTTP_WORKERS": "3", "ECLM_EDGE_HTTP_IDLE_TIMEOUT_S": "1"}
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi4"][0], env=env).start()
    try:
        assert srv.proc is not None
        before = threads(srv.proc.pid)
        idle = _hold(srv.port, 12)
        counts = []
        for s in idle:  # the server hangs up on every idle connection (recv returns b"" on a close)
            counts.append(threads(srv.proc.pid))
            assert s.recv(1) == b""
            s.close()
        # at most the pool's three workers on top of what the idle server ran (one thread per connection: 12+)
        assert max(counts) <= before + 3, (before, counts)
        _still_serving(srv)
    finally:
        srv.stop()


def test_connections_beyond_the_workers_wait_in_the_backlog_and_are_all_answered(
    digits_bundles: Bundles, tmp_path: Path
) -> None:
    env = {**PINNED_ENV, "ECLM_EDGE_HTTP_WORKERS": "2", "ECLM_EDGE_HTTP_IDLE_TIMEOUT_S": "60"}
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi4"][0], env=env).start()
    try:
        holders = _hold(srv.port, 3)  # both workers, and the accept loop waiting for one
        body = json.dumps({"inputs": [ONE, ONE]}).encode()
        request = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # The kernel completes these handshakes only while the listen backlog has room (a backlog of 5 dropped
        # the rest: their connect never finished while every worker was busy).
        waiting = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(200)]
        for s in waiting:
            s.sendall(request)
        for s in holders:
            s.close()  # the workers come free
        statuses = []
        for s in waiting:
            s.settimeout(60)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            s.close()
            statuses.append(int(answer.split(b" ", 2)[1]) if answer else 0)
        assert statuses == [200] * len(waiting), sorted(set(statuses))
    finally:
        srv.stop()


def test_concurrent_predicts_are_all_answered(server: EdgeServer) -> None:
    results: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(150)

    def one() -> None:
        go.wait()
        try:
            status = server.request("POST", "/v1/predict", {"inputs": [ONE]}, timeout=120).status
        except OSError as exc:  # a reset connection
            status = -1
            print(exc)
        with lock:
            results.append(status)

    workers = [threading.Thread(target=one) for _ in range(150)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert results == [200] * 150, {s: results.count(s) for s in set(results)}


def test_samples_answer_says_why_no_run_started(server: EdgeServer, xy) -> None:
    x, y = xy
    r = server.request("POST", "/v1/samples", {"inputs": x[:5].reshape(5, -1).tolist(), "labels": y[:5].tolist()})
    out = strict(r.body)
    assert out["training_started"] is False and out["training_paused"] is False
    assert "train_every_samples = 0" in out["training_reason"]
    status = strict(server.request("GET", "/v1/status").body)["training"]
    assert status["paused"] is False and status["paused_reason"] is None and status["pause_policy"] == "headroom"


def test_sigterm_does_not_wait_for_idle_connections(digits_bundles: Bundles, tmp_path: Path) -> None:
    env = {**PINNED_ENV, "ECLM_EDGE_HTTP_IDLE_TIMEOUT_S": "600"}
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi4"][0], env=env).start()
    idle = _hold(srv.port, 2)
    try:
        assert srv.request("GET", "/healthz").status == 200  # the workers hold the idle ones, this one too
        assert srv.stop(timeout=60) == 0  # not after the 600 s an idle connection may last
        assert all(s.recv(1) == b"" for s in idle)
    finally:
        for s in idle:
            s.close()

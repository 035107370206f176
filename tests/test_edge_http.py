"""`eclm-edge serve` over a real socket: every endpoint's bad input is a JSON error, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_edge_support import EdgeServer, Response

from eclm.manifest import BundleManifest, bundle_digest

Bundles = dict[str, tuple[Path, BundleManifest]]


@pytest.fixture(scope="module")
def server(digits_bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    srv = EdgeServer(tmp_path_factory.mktemp("http") / "state", digits_bundles["pi4"][0],
                     ["--train-every", "0", "--device-id", "board-http"]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def zero_server(digits_bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    srv = EdgeServer(tmp_path_factory.mktemp("http-zero") / "state", digits_bundles["pi-zero-2w"][0]).start()
    yield srv
    srv.stop()


def _rows(x: np.ndarray) -> list:
    return x.reshape(len(x), -1).tolist()


def _assert_error(r: Response, status: int) -> dict:
    assert r.status == status, (r.status, r.body)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    return body


def _assert_still_serving(srv: EdgeServer, x: np.ndarray) -> None:
    assert srv.proc is not None and srv.proc.poll() is None
    assert srv.request("GET", "/healthz").json() == {"ok": True}
    r = srv.request("POST", "/v1/predict", {"inputs": _rows(x[:2])})
    assert r.status == 200 and len(r.json()["predictions"]) == 2


# --- bad input on every endpoint -------------------------------------------------------------------

ONE = [1.0] * 64
BAD_PREDICT: dict[str, bytes] = {
    "not-json": b"this is not json",
    "truncated-json": b'{"inputs": [[1, 2',
    "invalid-utf8": b'{"inputs": "\xff\xfe"}',
    "json-array": json.dumps([ONE]).encode(),
    "json-string": b'"inputs"',
    "json-null": b"null",
    "empty-body": b"",
    "missing-inputs": json.dumps({"input": [ONE]}).encode(),
    "inputs-null": json.dumps({"inputs": None}).encode(),
    "inputs-object": json.dumps({"inputs": {"a": 1}}).encode(),
    "inputs-word": json.dumps({"inputs": [["one"] * 64]}).encode(),
    "inputs-mixed": json.dumps({"inputs": [[1, "a"] * 32]}).encode(),
    "ragged": json.dumps({"inputs": [ONE, ONE[:10]]}).encode(),
    "wrong-shape": json.dumps({"inputs": [[1.0] * 63]}).encode(),
    "wrong-image": json.dumps({"inputs": np.ones((1, 1, 8, 7)).tolist()}).encode(),
    "empty-list": json.dumps({"inputs": []}).encode(),
    "empty-batch": json.dumps({"inputs": [[]]}).encode(),
    # Python's json writes NaN/Infinity for non-finite floats and reads them back: they must be refused
    "nan": json.dumps({"inputs": [[float("nan")] + ONE[1:]]}).encode(),
    "infinity": json.dumps({"inputs": [ONE[:-1] + [float("inf")]]}).encode(),
    "-infinity": json.dumps({"inputs": [[float("-inf")] * 64]}).encode(),
    "nan-string": json.dumps({"inputs": [["NaN"] + ONE[1:]]}).encode(),
    "overflow-to-inf": b'{"inputs": [[1e999' + b", 1" * 63 + b"]]}",
    "float32-overflow": json.dumps({"inputs": [[1e39] + ONE[1:]]}).encode(),
}


@pytest.mark.parametrize("case", list(BAD_PREDICT))
def test_predict_refuses_bad_input(case: str, server: EdgeServer, xy) -> None:
    if case == "nan":
        assert b"NaN" in BAD_PREDICT[case] and json.loads(BAD_PREDICT[case])  # valid for Python's json
    body = _assert_error(server.request("POST", "/v1/predict", raw=BAD_PREDICT[case]), 400)
    assert "hint" in body
    _assert_still_serving(server, xy[0])


def test_samples_refuse_bad_input_and_store_nothing(server: EdgeServer, xy) -> None:
    x, y = xy
    held = server.status()["samples"]["held"]
    rows, labels = _rows(x[:3]), y[:3].tolist()
    cases = {
        "not-json": b"{labels",
        "json-array": json.dumps([rows, labels]).encode(),
        "missing-labels": json.dumps({"inputs": rows}).encode(),
        "labels-not-list": json.dumps({"inputs": rows, "labels": 1}).encode(),
        "labels-object": json.dumps({"inputs": rows, "labels": {"0": 1}}).encode(),
        "missing-inputs": json.dumps({"labels": labels}).encode(),
        "unknown-index": json.dumps({"inputs": rows, "labels": [1, 4, 10]}).encode(),
        "negative-index": json.dumps({"inputs": rows, "labels": [1, -4, 7]}).encode(),
        "unknown-name": json.dumps({"inputs": rows, "labels": [1, "four", 7]}).encode(),
        "bool-label": json.dumps({"inputs": rows, "labels": [1, True, 7]}).encode(),
        "float-label": json.dumps({"inputs": rows, "labels": [1, 4.5, 7]}).encode(),
        "null-label": json.dumps({"inputs": rows, "labels": [1, None, 7]}).encode(),
        "too-few-labels": json.dumps({"inputs": rows, "labels": labels[:2]}).encode(),
        "too-many-labels": json.dumps({"inputs": rows, "labels": [*labels, 1]}).encode(),
        "wrong-shape": json.dumps({"inputs": [[1.0] * 10] * 3, "labels": labels}).encode(),
        "nan": json.dumps({"inputs": [[float("nan")] * 64] * 3, "labels": labels}).encode(),
        "empty": json.dumps({"inputs": [], "labels": []}).encode(),
    }
    for case, raw in cases.items():
        r = server.request("POST", "/v1/samples", raw=raw)
        assert r.status == 400, (case, r.status, r.body)
        _assert_error(r, 400)
    assert server.status()["samples"]["held"] == held
    _assert_still_serving(server, x)


def test_train_refuses_a_bad_body(server: EdgeServer, xy) -> None:
    for raw in (b"not json", b"[1, 2]"):
        _assert_error(server.request("POST", "/v1/train", raw=raw), 400)
    assert server.status()["training"]["running"] is False
    _assert_still_serving(server, xy[0])


def test_train_on_an_inference_only_bundle_is_409(zero_server: EdgeServer, xy) -> None:
    body = _assert_error(zero_server.request("POST", "/v1/train"), 409)
    assert "cannot train" in body["error"] and body["hint"]
    assert zero_server.status()["training"]["last"] is None
    _assert_still_serving(zero_server, xy[0])


def test_inference_only_bundle_serves_and_stores_samples(zero_server: EdgeServer, xy) -> None:
    x, y = xy
    r = zero_server.request("POST", "/v1/samples", {"inputs": _rows(x[:10]), "labels": y[:10].tolist()})
    assert r.status == 200, r.body
    assert r.json()["stored"] == 10
    st = zero_server.status()
    assert st["samples"]["held"] == 10
    assert st["bundle"]["trainable"] is False and st["bundle"]["profile"] == "pi-zero-2w"


def test_inference_only_bundle_accepts_samples_with_default_auto_training(
    digits_bundles: Bundles, xy, tmp_path: Path
) -> None:
    x, y = xy
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi-zero-2w"][0], []).start()  # defaults: every 64
    try:
        r = srv.request("POST", "/v1/samples", {"inputs": _rows(x[:70]), "labels": y[:70].tolist()})
        assert r.status == 200, (r.status, r.body)
        assert r.json()["training_started"] is False
        st = srv.status()
        assert st["samples"]["held"] == 70 and st["training"]["last"] is None
    finally:
        srv.stop()


@pytest.mark.parametrize("method,path", [
    ("GET", "/"), ("GET", "/v1"), ("GET", "/v1/predictions"), ("GET", "/v2/status"), ("GET", "/v1/status/extra"),
    ("POST", "/v1/predictions"),
])
def test_unknown_endpoints_are_404(method: str, path: str, server: EdgeServer, xy) -> None:
    body = _assert_error(server.request(method, path, raw=b"{}" if method == "POST" else None), 404)
    assert "/v1/predict" in body["hint"]
    _assert_still_serving(server, xy[0])


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/v1/predict", "POST"), ("GET", "/v1/samples", "POST"), ("GET", "/v1/train", "POST"),
    ("POST", "/v1/status", "GET"), ("POST", "/metrics", "GET"), ("POST", "/healthz", "GET"),
    ("PUT", "/v1/predict", "POST"), ("DELETE", "/v1/status", "GET"),
])
def test_a_known_endpoint_with_the_wrong_method_is_405(method: str, path: str, allowed: str, server: EdgeServer,
                                                        xy) -> None:
    r = server.request(method, path, raw=b"{}" if method in ("POST", "PUT") else None)
    body = _assert_error(r, 405)
    assert r.headers["allow"] == allowed
    assert f"{allowed} {path}" in body["hint"] or allowed in body["hint"]
    _assert_still_serving(server, xy[0])


def test_oversized_body_is_413(server: EdgeServer, xy) -> None:
    limit = 8 * 2**20  # EdgeConfig.max_body_bytes
    # announce one byte too many and send only the start: the server must answer without reading it all
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n").encode()
    answer = server.raw(head + b'{"inputs": [[' + b"1, " * 1000)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert "exceeds" in body["error"]
    _assert_error(server.request("POST", "/v1/samples", raw=b"{}", headers={"Content-Length": str(limit + 1)}), 413)
    _assert_still_serving(server, xy[0])


def _raw_answer(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b"\r\n", 1)[0].split()[1]), json.loads(body)


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1.5", b""])
def test_malformed_content_length_is_a_client_error(length: bytes, server: EdgeServer, xy) -> None:
    # a negative length once meant read(-1): the handler waited for the client to hang up; hence the timeout
    answer = server.raw(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}",
                        timeout=3)
    status, body = _raw_answer(answer)
    assert status == 400, answer[:300]
    # an empty header reads as "no body", which then lacks 'inputs'
    assert ("inputs" if length == b"" else "Content-Length") in body["error"], body
    _assert_still_serving(server, xy[0])


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_answer_json(method: str, server: EdgeServer, xy) -> None:
    r = server.request(method, "/v1/predict", raw=b"{}")
    _assert_error(r, 405)
    _assert_still_serving(server, xy[0])


def test_server_keeps_serving_after_a_burst_of_bad_requests(server: EdgeServer, xy) -> None:
    for raw in BAD_PREDICT.values():
        server.request("POST", "/v1/predict", raw=raw)
        server.request("POST", "/v1/samples", raw=raw)
    _assert_still_serving(server, xy[0])


# --- good paths ---------------------------------------------------------------------------------------


def test_predict(server: EdgeServer, xy, digits_bundles: Bundles) -> None:
    x, y = xy
    r = server.request("POST", "/v1/predict", {"inputs": x[:16].tolist()})  # (N, 1, 8, 8)
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    probs = np.asarray(out["probabilities"])
    assert probs.shape == (16, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert out["labels"] == [str(i) for i in range(10)]
    assert out["predictions"] == [out["labels"][i] for i in probs.argmax(axis=1)]
    assert out["bundle"] == bundle_digest(digits_bundles["pi4"][0])
    flat = server.request("POST", "/v1/predict", {"inputs": _rows(x[:16])}).json()
    assert np.allclose(flat["probabilities"], probs, atol=1e-6)
    single = server.request("POST", "/v1/predict", {"inputs": x[0].tolist()}).json()  # one (1, 8, 8) sample
    assert len(single["predictions"]) == 1


def test_samples_train_and_status(server: EdgeServer, xy) -> None:
    x, y = xy
    held = server.status()["samples"]["held"]
    r = server.request("POST", "/v1/samples", {"inputs": _rows(x[:200]), "labels": y[:200].tolist()})
    assert r.status == 200, r.body
    out = r.json()
    assert (out["stored"], out["held"], out["training_started"]) == (200, held + 200, False)
    names = [str(v) for v in y[200:]]  # label names work as well as indices
    r = server.request("POST", "/v1/samples", {"inputs": _rows(x[200:]), "labels": names})
    assert r.status == 200 and r.json()["held"] == held + len(y)

    r = server.request("POST", "/v1/train")
    assert r.status == 202, r.body
    assert r.json()["started"] is True
    st = server.wait_training()
    last = st["training"]["last"]
    assert last["trigger"] == "api" and last["delta_id"] and last["steps"] > 0
    assert last["holdout_before"] is not None and last["holdout_after"] is not None
    assert st["outbox"]["entries"] >= 1 and st["outbox"]["bytes"] > 0
    assert st["bundle"]["generation"] == (last["generation"] if last["accepted"] else 0)
    assert st["samples"]["new_since_training"] == 0

    assert st["device_id"] == "board-http"
    assert set(st["bundle"]) >= {"digest", "bank_id", "profile", "generation", "trainable", "training_reason"}
    assert st["bundle"]["profile"] == "pi4" and st["bundle"]["trainable"] is True
    assert st["modules"] and all(set(m) == {"part_id", "version", "trainable"} for m in st["modules"])
    assert st["samples"]["held"] == held + len(y) and st["samples"]["holdout_every"] == 5
    assert set(st["training"]["settings"]) == {"epochs", "batch_size", "learning_rate", "seed"}
    assert st["resources"]["pid"] == server.proc.pid and st["resources"]["vmrss_bytes"] > 0
    assert st["uptime_s"] > 0
    pred = server.request("POST", "/v1/predict", {"inputs": _rows(x[:2])}).json()
    assert pred["generation"] == st["bundle"]["generation"]


def test_status_ignores_the_query_string(server: EdgeServer) -> None:
    r = server.request("GET", "/v1/status?verbose=1")
    assert r.status == 200 and "samples" in r.json()


def test_metrics_are_prometheus_text(server: EdgeServer, xy) -> None:
    server.request("POST", "/v1/predict", {"inputs": _rows(xy[0][:3])})
    server.request("POST", "/v1/predict", raw=b"nope")
    r = server.request("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert "eclm_edge_requests_total" in text and "eclm_edge_predict_seconds_bucket" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses, or raises
    requests = {(s.labels["endpoint"], s.labels["code"]): s.value for s in families["eclm_edge_requests"].samples
                if s.name == "eclm_edge_requests_total"}
    assert requests[("/v1/predict", "200")] >= 1 and requests[("/v1/predict", "400")] >= 1
    buckets = [s for s in families["eclm_edge_predict_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets and max(s.value for s in buckets) >= 1
    assert "eclm_edge_samples_held" in families and "eclm_edge_generation" in families


def test_sigterm_stops_cleanly(digits_bundles: Bundles, tmp_path: Path) -> None:
    srv = EdgeServer(tmp_path / "state", digits_bundles["pi4"][0]).start()
    assert srv.stop(timeout=30) == 0
    assert (tmp_path / "state" / "current.json").is_file()

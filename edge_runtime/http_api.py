"""The runtime's HTTP API (localhost by default): predict, samples, train, status, metrics."""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from eclm.errors import DataError, EclmError
from edge_runtime.service import EdgeService

log = logging.getLogger("eclm.edge.http")
KNOWN_PATHS = ("/v1/predict", "/v1/samples", "/v1/train", "/v1/status", "/metrics", "/healthz")


class ApiError(Exception):
    """An HTTP error with a JSON body."""

    def __init__(self, status: HTTPStatus, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint


def _inputs(body: dict[str, Any], key: str = "inputs") -> np.ndarray:
    if key not in body:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing '{key}'", "send {\"inputs\": [[...], ...]}")
    try:
        x = np.asarray(body[key], dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' is not a numeric array: {exc}",
                       "send nested lists of numbers of one shape") from exc
    return x


def make_handler(service: EdgeService) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``service``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "eclm-edge/0.1"
        protocol_version = "HTTP/1.1"
        # Headers and body are written separately; with Nagle's algorithm the body would wait for
        # the client's delayed ACK (~40 ms per request).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: HTTPStatus, payload: Any, content_type: str = "application/json") -> None:
            data = payload if isinstance(payload, bytes) else (json.dumps(payload) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            service.metrics.bytes_out.inc(len(data))
            path = self.path.split("?")[0]
            endpoint = path if path in KNOWN_PATHS else "other"  # bounded label values
            service.metrics.requests.labels(endpoint, str(int(status))).inc()

        def _body(self) -> dict[str, Any]:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                raise ApiError(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported",
                               "send the body with a Content-Length")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative integer",
                               "send the body's size in bytes")
            if length > service.cfg.max_body_bytes:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body of {length} bytes exceeds {service.cfg.max_body_bytes}", "send smaller batches")
            raw = self.rfile.read(length) if length else b""
            service.metrics.bytes_in.inc(len(raw))
            if not raw:
                return {}
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}", "send a JSON object") from exc
            if not isinstance(body, dict):
                raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object", "send {\"inputs\": ...}")
            return body

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?")[0]
            try:
                if method == "GET" and path == "/v1/status":
                    self._send(HTTPStatus.OK, service.status())
                elif method == "GET" and path == "/metrics":
                    self._send(HTTPStatus.OK, service.metrics.render(), "text/plain; version=0.0.4")
                elif method == "GET" and path == "/healthz":
                    self._send(HTTPStatus.OK, {"ok": True})
                elif method == "POST" and path == "/v1/predict":
                    self._send(HTTPStatus.OK, service.predict(_inputs(self._body())))
                elif method == "POST" and path == "/v1/samples":
                    body = self._body()
                    labels = body.get("labels")
                    if not isinstance(labels, list):
                        raise ApiError(HTTPStatus.BAD_REQUEST, "missing 'labels' list", "one label per input")
                    self._send(HTTPStatus.OK, service.add_samples(_inputs(body), labels))
                elif method == "POST" and path == "/v1/train":
                    self._body()
                    started = service.start_training("api")
                    self._send(HTTPStatus.ACCEPTED if started else HTTPStatus.CONFLICT,
                               {"started": started, "running": service.training_now,
                                **({} if started else {"error": "a training run is already running"})})
                else:
                    known = "GET /v1/status, GET /metrics, POST /v1/predict, POST /v1/samples, POST /v1/train"
                    raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {method} {path}", f"endpoints: {known}")
            except ApiError as exc:
                self.close_connection = True  # the body may be unread: do not parse it as the next request
                self._send(exc.status, {"error": exc.message, "hint": exc.hint})
            except DataError as exc:
                self._send(HTTPStatus.BAD_REQUEST, {"error": exc.message, "hint": exc.hint or ""})
            except EclmError as exc:
                self._send(HTTPStatus.CONFLICT, {"error": exc.message, "hint": exc.hint or ""})
            except Exception as exc:  # the process keeps serving whatever one request does
                log.exception("request %s %s failed", method, path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"})

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def _not_allowed(self) -> None:
            self.close_connection = True
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {self.command} is not supported",
                                                       "hint": "use GET or POST"})

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed  # noqa: N815

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

    return Handler


def serve(service: EdgeService, host: str, port: int) -> ThreadingHTTPServer:
    """A started-but-not-running server; call ``serve_forever`` on it."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Block until ``url``/healthz answers (used by scripts and tests)."""
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)

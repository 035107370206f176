"""The runtime's HTTP API (localhost by default): predict, samples, train, status, metrics.

With an API token every endpoint but ``/healthz`` wants ``Authorization: Bearer <token>``; with a
certificate the API speaks HTTPS, the TLS handshake done by the worker that takes the connection
(:mod:`edge_runtime.api_security`).

The server is bounded: a fixed pool of workers handles connections; while every worker is busy
new connections wait in the kernel's listen backlog; an idle or stalled connection is closed after
``http_idle_timeout_s``. Bodies are limited in size, JSON nesting and number length.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np

from eclm import jsonsafe
from eclm.errors import ConfigError, DataError, EclmError
from edge_runtime.api_security import ApiGuard
from edge_runtime.config import EdgeConfig
from edge_runtime.service import EdgeService

log = logging.getLogger("eclm.edge.http")
ROUTES = {"/v1/predict": "POST", "/v1/samples": "POST", "/v1/train": "POST", "/v1/environment": "POST",
          "/v1/status": "GET",
          "/metrics": "GET", "/healthz": "GET"}
KNOWN_PATHS = tuple(ROUTES)


class ApiError(Exception):
    """An HTTP error with a JSON body."""

    def __init__(self, status: HTTPStatus, message: str, hint: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.headers = headers or {}


def _inputs(body: dict[str, Any], key: str = "inputs") -> np.ndarray:
    if key not in body:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing '{key}'", "send {\"inputs\": [[...], ...]}")
    try:
        x = np.asarray(body[key], dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' is not a numeric array: {exc}",
                       "send nested lists of numbers of one shape") from exc
    return x


class EdgeHttpServer(HTTPServer):
    """An HTTP server with a bounded worker pool, a real listen backlog and idle timeouts.

    ``service`` is attached after the socket is bound, so that a port in use is reported before the
    state directory is touched.
    """

    def __init__(self, host: str, port: int, workers: int, backlog: int, idle_timeout_s: float,
                 guard: ApiGuard | None = None) -> None:
        self.request_queue_size = backlog  # listen(2) backlog, read by server_activate
        self.idle_timeout_s = idle_timeout_s
        self.guard = guard or ApiGuard()
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.service: EdgeService | None = None
        self._slots = threading.BoundedSemaphore(workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eclm-http")
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()  # connections a worker holds, shut down on close
        self._open_lock = threading.Lock()
        try:
            super().__init__((host, port), make_handler(idle_timeout_s))
        except OSError as exc:  # the base class has closed the socket
            raise ConfigError(f"cannot listen on {host}:{port}: {_why(exc)}",
                              hint="stop the process that uses the port, or pass another --port (0: any free one)"
                              ) from None

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall without DNS; not needed.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Wait for a free worker; meanwhile the kernel queues further connections in the backlog.
        while not self._slots.acquire(timeout=0.5):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            self._pool.submit(self._work, request, client_address)
        except RuntimeError:  # the pool is shut down
            self._slots.release()
            self.shutdown_request(request)

    def _work(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        conn = request
        try:
            if not self._stopping.is_set():
                if self.guard.tls is not None:
                    conn = self._handshake(request, client_address)
                if conn is not None:
                    self.finish_request(conn, client_address)
        except Exception:  # noqa: BLE001 - one connection never stops the server
            log.debug("connection from %s failed", client_address, exc_info=True)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.shutdown_request(conn if conn is not None else request)
            self._slots.release()

    def _handshake(self, request: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        """The TLS connection on ``request`` (in this worker, bounded by the idle timeout), or None if it failed."""
        assert self.guard.tls is not None
        request.settimeout(self.idle_timeout_s)
        try:
            return self.guard.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            if self.service is not None:
                self.service.metrics.http_refused.labels("tls_handshake").inc()
            return None

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    def server_close(self) -> None:
        self._stopping.set()
        super().server_close()
        with self._open_lock:  # wake workers waiting on an idle keep-alive connection: exit does not wait
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.shutdown(wait=False, cancel_futures=True)


def _why(exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


def make_handler(idle_timeout_s: float = 10.0) -> type[BaseHTTPRequestHandler]:
    """A request handler class; it serves ``self.server.service``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "eclm-edge/0.1"
        protocol_version = "HTTP/1.1"
        timeout = idle_timeout_s  # every read: an idle keep-alive connection or a stalled body is closed
        # Headers and body are written separately; with Nagle's algorithm the body would wait for
        # the client's delayed ACK (~40 ms per request).
        disable_nagle_algorithm = True

        @property
        def service(self) -> EdgeService:
            svc = getattr(self.server, "service", None)
            assert svc is not None, "the server has no service attached"
            return svc

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if self.request_version == "HTTP/0.9":  # its answer would be a bare body without a status line
                self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not supported")
                return False
            return True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The base class's errors (a malformed request line or header, an unknown method, a request
            line or header too long) as JSON like every other answer, never HTML; the connection closes.
            """
            status = HTTPStatus(code)
            headers = {}
            if status == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method: the client's mistake, not a failure here
                status, headers = HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, POST"}
            elif status == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # 5xx would read as this server failing
                status = HTTPStatus.BAD_REQUEST
            self.close_connection = True
            if getattr(self, "request_version", "") == "HTTP/0.9":  # answer with a status line and headers
                self.request_version = "HTTP/1.0"
            if not isinstance(getattr(self, "path", None), str):
                self.path = ""
            self.log_error("code %d, message %s", int(status), message)
            self._send(status, {"error": message or status.phrase,
                                "hint": "send HTTP/1.1: METHOD /v1/... HTTP/1.1, headers, then a JSON body"},
                       headers=headers)

        def _send(self, status: HTTPStatus, payload: Any, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else (jsonsafe.dumps(payload) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            metrics = self.service.metrics
            metrics.bytes_out.inc(len(data))
            path = self.path.split("?")[0]
            endpoint = path if path in ROUTES else "other"  # bounded label values
            metrics.requests.labels(endpoint, str(int(status))).inc()

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
            limit = self.service.cfg.max_body_bytes
            if length > limit:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds {limit}",
                               "send smaller batches")
            raw = self.rfile.read(length) if length else b""
            self.service.metrics.bytes_in.inc(len(raw))
            if not raw:
                return {}
            try:
                body = jsonsafe.loads(raw)
            except jsonsafe.JsonLimitError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"body refused: {exc}",
                               "send plain JSON: numbers as floats or small integers, no NaN or Infinity, "
                               f"nesting at most {jsonsafe.MAX_DEPTH} deep") from exc
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}", "send a JSON object") from exc
            if not isinstance(body, dict):
                raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object", "send {\"inputs\": ...}")
            return body

        def _route(self, method: str, path: str) -> None:
            service = self.service
            if path in ROUTES and ROUTES[path] != method:
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}",
                               f"use {ROUTES[path]} {path}", {"Allow": ROUTES[path]})
            if path == "/v1/status":
                self._send(HTTPStatus.OK, service.status())
            elif path == "/metrics":
                self._send(HTTPStatus.OK, service.metrics.render(), "text/plain; version=0.0.4")
            elif path == "/healthz":
                self._send(HTTPStatus.OK, {"ok": True})
            elif path == "/v1/predict":
                self._send(HTTPStatus.OK, service.predict(_inputs(self._body())))
            elif path == "/v1/samples":
                body = self._body()
                labels = body.get("labels")
                if not isinstance(labels, list):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "missing 'labels' list", "one label per input")
                self._send(HTTPStatus.OK, service.add_samples(_inputs(body), labels))
            elif path == "/v1/train":
                self._body()
                started = service.start_training("api")
                self._send(HTTPStatus.ACCEPTED if started else HTTPStatus.CONFLICT,
                           {"started": started, "running": service.training_now,
                            **({} if started else {"error": "a training run is already running"})})
            elif path == "/v1/environment":
                name = self._body().get("environment")
                if not isinstance(name, str):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "missing 'environment' string",
                                   "send {\"environment\": \"line-3\"} ('' for the shared line)")
                self._send(HTTPStatus.OK, service.set_environment(name))
            else:
                known = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
                raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {method} {path}", f"endpoints: {known}")

        def _guard(self, path: str) -> None:
            """Refuse the request (401) unless it carries the API token, when the server has one."""
            why = self.server.guard.allows(path, self.headers.get("Authorization"))  # type: ignore[attr-defined]
            if why is not None:
                self.service.metrics.http_refused.labels(f"token_{why}").inc()
                raise ApiError(HTTPStatus.UNAUTHORIZED, f"{why} API token",
                               "send the header 'Authorization: Bearer <token>' with the token of --api-token-file",
                               {"WWW-Authenticate": 'Bearer realm="eclm-edge"'})

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?")[0]
            try:
                self._guard(path)
                self._route(method, path)
            except ApiError as exc:
                self.close_connection = True  # the body may be unread: do not parse it as the next request
                self._send(exc.status, {"error": exc.message, "hint": exc.hint}, headers=exc.headers)
            except DataError as exc:
                self._send(HTTPStatus.BAD_REQUEST, {"error": exc.message, "hint": exc.hint or ""})
            except EclmError as exc:
                self._send(HTTPStatus.CONFLICT, {"error": exc.message, "hint": exc.hint or ""})
            except (TimeoutError, ConnectionError):  # the client stalled or went away mid-request
                self.close_connection = True
            except Exception as exc:  # the process keeps serving whatever one request does
                log.exception("request %s %s failed", method, path)
                self.close_connection = True
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"})

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def _not_allowed(self) -> None:
            self.close_connection = True
            path = self.path.split("?")[0]
            try:
                self._guard(path)
            except ApiError as exc:
                self._send(exc.status, {"error": exc.message, "hint": exc.hint}, headers=exc.headers)
                return
            allow = ROUTES.get(path, "GET, POST")
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {self.command} is not supported",
                                                       "hint": f"use {allow}"}, headers={"Allow": allow})

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed  # noqa: N815

    return Handler


def bind(cfg: EdgeConfig, guard: ApiGuard | None = None) -> EdgeHttpServer:
    """Bind the listening socket (a port in use is a :class:`ConfigError`); attach a service before serving."""
    return EdgeHttpServer(cfg.host, cfg.port, cfg.http_workers, cfg.http_backlog, cfg.http_idle_timeout_s, guard)


def serve(service: EdgeService, host: str | None = None, port: int | None = None) -> EdgeHttpServer:
    """A bound server for ``service`` (its config's address unless given); call ``serve_forever`` on it."""
    cfg = service.cfg
    server = EdgeHttpServer(cfg.host if host is None else host, cfg.port if port is None else port,
                            cfg.http_workers, cfg.http_backlog, cfg.http_idle_timeout_s)
    server.service = service
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

"""Who may use the edge's HTTP API: the bearer token, TLS beyond loopback, and refusals to start unguarded.

Real files with real modes, real `eclm-edge serve` processes, real HTTPS with a certificate made here.
"""

from __future__ import annotations

import datetime
import errno
import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_edge_serve import assert_one_line_error, serve
from test_edge_support import PINNED_ENV, EdgeServer, Response, child_env, edge_command, free_port

from eclm.errors import ConfigError
from edge_runtime.api_security import ApiGuard, check_exposure, is_loopback, read_token, tls_context, write_token
from edge_runtime.config import EdgeConfig, load_config

# --- the rules, as functions ------------------------------------------------------------------------


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("192.168.1.20", False), ("board.local", False),
])
def test_loopback_is_127_8_and_ipv6_one_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _cfg(**values: object) -> EdgeConfig:
    return load_config(overrides=values, environ={})


def test_beyond_loopback_needs_a_token_then_tls_or_explicit_plain_http(tmp_path: Path) -> None:
    assert EdgeConfig().host == "127.0.0.1" and _cfg().host == "127.0.0.1"  # loopback unless told otherwise
    check_exposure(_cfg())  # so nothing is needed by default
    with pytest.raises(ConfigError, match="needs an API token") as e:
        check_exposure(_cfg(host="0.0.0.0"))
    assert "eclm-edge token --out" in str(e.value.hint)
    with pytest.raises(ConfigError, match="needs TLS") as e:
        check_exposure(_cfg(host="0.0.0.0", api_token_file=tmp_path / "t"))
    assert "--api-insecure-http" in str(e.value.hint) and "--api-tls-cert" in str(e.value.hint)
    check_exposure(_cfg(host="0.0.0.0", api_token_file=tmp_path / "t", api_insecure_http=True))
    check_exposure(_cfg(host="0.0.0.0", api_token_file=tmp_path / "t", api_tls_cert=tmp_path / "c",
                        api_tls_key=tmp_path / "k"))
    with pytest.raises(ConfigError, match="both api_tls_cert and api_tls_key"):
        check_exposure(_cfg(api_tls_cert=tmp_path / "c"))


def test_the_settings_come_from_env_and_config_file(tmp_path: Path) -> None:
    cfg = load_config(environ={"ECLM_EDGE_API_TOKEN_FILE": "/etc/eclm/token", "ECLM_EDGE_API_INSECURE_HTTP": "1"})
    assert cfg.api_token_file == Path("/etc/eclm/token") and cfg.api_insecure_http is True
    toml = tmp_path / "edge.toml"
    toml.write_text('[edge]\napi_tls_cert = "c.pem"\napi_tls_key = "k.pem"\n')
    cfg = load_config(toml, environ={})
    assert (cfg.api_tls_cert, cfg.api_tls_key) == (Path("c.pem"), Path("k.pem"))


def _token_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("text,mode,words", [
    ("", 0o600, "is empty"),
    ("\n  \n", 0o600, "is empty"),
    ("short", 0o600, "usable token"),
    ("a b c d e f g h i j k l m n o p q", 0o600, "usable token"),
    ("x" * 40, 0o644, "readable by others (mode 0644)"),
    ("x" * 40, 0o640, "readable by others (mode 0640)"),
    ("x" * 40, 0o604, "readable by others"),
])
def test_a_bad_token_file_is_a_clear_error(tmp_path: Path, text: str, mode: int, words: str) -> None:
    with pytest.raises(ConfigError, match="API token file") as e:
        read_token(_token_file(tmp_path, text, mode))
    assert words in e.value.message
    assert e.value.hint


def test_a_missing_or_unreadable_token_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read API token file"):
        read_token(tmp_path / "absent")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token(tmp_path)


def test_write_token_is_private_random_and_never_overwrites(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        token = write_token(tmp_path / "t1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t1").stat().st_mode) == 0o600
    assert read_token(tmp_path / "t1") == token and len(token) >= 40
    assert write_token(tmp_path / "t2") != token
    with pytest.raises(ConfigError, match="exists"):
        write_token(tmp_path / "t1")
    assert read_token(tmp_path / "t1") == token


@pytest.mark.parametrize("header,verdict", [
    (None, "missing"), ("", "missing"), ("Bearer", "invalid"), ("Bearer wrong-token-0123456789", "invalid"),
    ("Basic c2VjcmV0LXRva2VuLTAxMjM0NTY3ODk=", "invalid"), ("Bearer secret-token-0123456789", None),
    ("bearer   secret-token-0123456789 ", None), ("Bearer secret-token-0123456789x", "invalid"),
    ("Bearer sécret", "invalid"),
])
def test_the_guard_compares_the_bearer_token(header: str | None, verdict: str | None) -> None:
    guard = ApiGuard(token="secret-token-0123456789")
    assert guard.allows("/v1/status", header) == verdict
    assert guard.allows("/healthz", header) is None
    assert ApiGuard().allows("/v1/status", None) is None


# --- `eclm-edge token` and refusals to start --------------------------------------------------------


def test_token_command_writes_a_0600_token(tmp_path: Path) -> None:
    out = tmp_path / "api.token"
    r = subprocess.run([*edge_command(), "token", "--out", str(out)], capture_output=True, text=True, timeout=60,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and len(read_token(out)) >= 40
    assert read_token(out) not in r.stdout + r.stderr  # the secret is not printed into logs
    again = subprocess.run([*edge_command(), "token", "--out", str(out)], capture_output=True, text=True,
                           timeout=60, env=child_env())
    assert_one_line_error(again, ConfigError.exit_code, "exists")


@pytest.mark.parametrize("case", ["no-token", "no-tls", "open-token-file", "half-tls"])
def test_serving_beyond_loopback_unguarded_refuses_to_start(case: str, pi4: Path, tmp_path: Path) -> None:
    token = _token_file(tmp_path, "y" * 43, 0o644 if case == "open-token-file" else 0o600)
    args = {"no-token": [], "no-tls": ["--api-token-file", str(token)],
            "open-token-file": ["--api-token-file", str(token), "--api-insecure-http"],
            "half-tls": ["--api-token-file", str(token), "--api-tls-cert", str(token)]}[case]
    words = {"no-token": ("beyond loopback", "API token"), "no-tls": ("beyond loopback", "TLS"),
             "open-token-file": ("readable by others",), "half-tls": ("api_tls_key",)}[case]
    result = serve("--bundle", str(pi4), "--state-dir", str(tmp_path / "state"), "--host", "0.0.0.0",
                   "--port", str(free_port()), *args)
    assert_one_line_error(result, ConfigError.exit_code, *words)
    assert not (tmp_path / "state").exists()


# --- a real server with a token ---------------------------------------------------------------------

TOKEN = "test-token-" + "k" * 32


@pytest.fixture(scope="module")
def guarded(pi4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    root = tmp_path_factory.mktemp("auth")
    token = _token_file(root, TOKEN + "\n")
    srv = EdgeServer(root / "state", pi4, ["--train-every", "0", "--api-token-file", str(token)]).start()
    yield srv
    srv.stop()


def _assert_401(r: Response, why: str) -> None:
    assert r.status == 401, (r.status, r.body)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["content-type"] == "application/json"
    assert r.body.count(b"\n") == 1 and r.body.endswith(b"\n")  # one line of JSON
    body = json.loads(r.body)
    assert body["error"] == f"{why} API token" and "Authorization: Bearer" in body["hint"]
    assert TOKEN not in r.body.decode()


@pytest.mark.parametrize("method,path", [("GET", "/v1/status"), ("GET", "/metrics"), ("POST", "/v1/predict"),
                                         ("POST", "/v1/samples"), ("POST", "/v1/train"), ("GET", "/nowhere"),
                                         ("DELETE", "/v1/status")])
def test_every_endpoint_but_health_wants_the_token(guarded: EdgeServer, method: str, path: str) -> None:
    _assert_401(guarded.request(method, path, {"inputs": [[0.0] * 64]}), "missing")
    _assert_401(guarded.request(method, path, {"inputs": [[0.0] * 64]},
                                headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}), "invalid")


def test_health_is_open_and_the_token_opens_the_rest(guarded: EdgeServer) -> None:
    assert guarded.request("GET", "/healthz").json() == {"ok": True}
    auth = {"Authorization": "Bearer " + TOKEN}
    r = guarded.request("GET", "/v1/status", headers=auth)
    assert r.status == 200 and r.json()["bundle"]
    r = guarded.request("POST", "/v1/predict", {"inputs": [[0.0] * 64]}, headers=auth)
    assert r.status == 200 and len(r.json()["predictions"]) == 1


def test_refusals_are_counted(guarded: EdgeServer) -> None:
    for _ in range(3):
        guarded.request("GET", "/v1/status", headers={"Authorization": "Bearer nope-nope-nope-nope"})
    text = guarded.request("GET", "/metrics", headers={"Authorization": "Bearer " + TOKEN}).body.decode()
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("eclm_edge_api_refused_total")}
    assert counts['eclm_edge_api_refused_total{reason="token_invalid"}'] >= 3


# --- HTTPS beyond loopback --------------------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eclm-edge test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_the_tls_context_wants_tls_1_2_and_a_private_key(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    assert tls_context(cert, key).minimum_version == ssl.TLSVersion.TLSv1_2
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="TLS key .* readable by others"):
        tls_context(cert, key)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        tls_context(key, key)


class _Proc:
    """`eclm-edge serve` on all interfaces, with its log."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([*edge_command(), "serve", "--host", "0.0.0.0", "--port", str(self.port),
                                          *args], stdout=f, stderr=subprocess.STDOUT, env=child_env(**PINNED_ENV))

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while "serving bundle" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def https(pi4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Proc, ssl.SSLContext]]:
    root = tmp_path_factory.mktemp("https")
    cert, key = _self_signed(root)
    token = _token_file(root, TOKEN)
    srv = _Proc(["--bundle", str(pi4), "--state-dir", str(root / "state"), "--train-every", "0",
                 "--api-token-file", str(token), "--api-tls-cert", str(cert), "--api-tls-key", str(key)],
                root / "serve.log")
    client = ssl.create_default_context(cafile=str(cert))
    try:
        srv.wait_listening()
        yield srv, client
    finally:
        assert srv.stop() == 0


def _https(port: int, ctx: ssl.SSLContext, method: str, path: str, body: object = None,
           token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes, str | None]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        r = conn.getresponse()
        version = conn.sock.version() if conn.sock is not None else None
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read(), version
    finally:
        conn.close()


def test_https_with_a_token_serves_real_requests(https: tuple[_Proc, ssl.SSLContext]) -> None:
    srv, ctx = https
    status, _, body, version = _https(srv.port, ctx, "GET", "/healthz", token=None)
    assert status == 200 and json.loads(body) == {"ok": True} and version in ("TLSv1.2", "TLSv1.3")
    status, headers, body, _ = _https(srv.port, ctx, "GET", "/v1/status", token=None)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, _, body, _ = _https(srv.port, ctx, "POST", "/v1/predict", {"inputs": [[0.0] * 64]})
    assert status == 200 and len(json.loads(body)["predictions"]) == 1
    assert "on https://0.0.0.0:" in srv.log.read_text()


def test_https_refuses_plain_http_and_old_tls_and_keeps_serving(https: tuple[_Proc, ssl.SSLContext]) -> None:
    srv, ctx = https
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # plain HTTP on the TLS port
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert b"HTTP/1.1 200" not in answer and b"bundle" not in answer
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # a client that offers TLS 1.1 at most
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _https(srv.port, old, "GET", "/healthz", token=None)
    status, _, body, _ = _https(srv.port, ctx, "GET", "/metrics")
    assert status == 200
    assert 'eclm_edge_api_refused_total{reason="tls_handshake"}' in body.decode()


def test_plain_http_beyond_loopback_when_asked_for_explicitly(pi4: Path, tmp_path: Path) -> None:
    token = _token_file(tmp_path, TOKEN)
    srv = _Proc(["--bundle", str(pi4), "--state-dir", str(tmp_path / "state"), "--train-every", "0",
                 "--api-token-file", str(token), "--api-insecure-http"], tmp_path / "serve.log")
    try:
        srv.wait_listening()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("garbage", [b"", b"\x16\x03\x01\x00\x05hello", b"\x16\x03\x03" + bytes(range(256)) * 4,
                                     b"\x00" * 10_000, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
def test_garbage_on_the_tls_port_costs_one_connection(https: tuple[_Proc, ssl.SSLContext], garbage: bytes) -> None:
    srv, ctx = https
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        try:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        # The server may drop the connection before we are done sending or shutting down our side: that is
        # its answer to garbage (ENOTCONN, EPIPE, a reset), not a failure.
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
    status, _, _, _ = _https(srv.port, ctx, "GET", "/v1/status")
    assert status == 200 and srv.proc.poll() is None

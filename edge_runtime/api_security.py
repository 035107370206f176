"""Who may use the edge's HTTP API: the bearer token, TLS, and the rule that nothing leaves loopback unguarded.

Beyond loopback (a host other than 127.0.0.0/8, ::1 or ``localhost``) the API needs an API token and
either TLS (``api_tls_cert`` and ``api_tls_key``) or an explicit ``api_insecure_http`` (a
TLS-terminating reverse proxy in front). With a token every endpoint but ``/healthz`` asks for
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from eclm.errors import ConfigError
from edge_runtime.config import EdgeConfig

MIN_TOKEN_CHARS = 16
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
OPEN_PATHS = ("/healthz",)  # answered without a token: a liveness probe carries no secret


def is_loopback(host: str) -> bool:
    """True when ``host`` only answers this machine: 127.0.0.0/8, ::1 or ``localhost``."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): it may reach the network


def check_exposure(cfg: EdgeConfig) -> None:
    """Refuse an API beyond loopback without a token, or without TLS unless plain HTTP was asked for."""
    if (cfg.api_tls_cert is None) != (cfg.api_tls_key is None):
        raise ConfigError("TLS for the API needs both api_tls_cert and api_tls_key",
                          hint="pass --api-tls-cert CERT.pem and --api-tls-key KEY.pem together")
    if is_loopback(cfg.host):
        return
    if cfg.api_token_file is None:
        raise ConfigError(f"serving the API on {cfg.host!r} (beyond loopback) needs an API token",
                          hint="create one with `eclm-edge token --out FILE` and pass --api-token-file FILE, "
                               "or serve on --host 127.0.0.1")
    if cfg.api_tls_cert is None and not cfg.api_insecure_http:
        raise ConfigError(f"serving the API on {cfg.host!r} (beyond loopback) needs TLS",
                          hint="pass --api-tls-cert CERT.pem --api-tls-key KEY.pem, or --api-insecure-http when "
                               "a TLS-terminating reverse proxy forwards to this port")


def _private_file(path: Path, what: str, forbidden: int, chmod: str) -> bytes:
    """The bytes of ``path``, refused when its mode grants any of ``forbidden`` (like ssh refuses open keys)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}",
                          hint="check the path and that this user may read it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file", hint="point at the file itself")
        if st.st_mode & forbidden:
            raise ConfigError(f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                              hint=f"run `chmod {chmod} {path}`")
        return os.read(fd, 64 * 1024)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}", hint="check the file") from None
    finally:
        os.close(fd)


def read_token(path: Path) -> str:
    """The API token in ``path``: one line of at least 16 token characters, the file private to its owner."""
    raw = _private_file(path, "API token file", 0o077, "600")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = "\x00"
    if not token:
        raise ConfigError(f"API token file {path} is empty", hint="create one with `eclm-edge token --out FILE`")
    if len(token) < MIN_TOKEN_CHARS or not set(token) <= _TOKEN_CHARS:
        raise ConfigError(f"API token file {path} does not hold a usable token "
                          f"(at least {MIN_TOKEN_CHARS} letters, digits or -._~+/= on one line)",
                          hint="create one with `eclm-edge token --out FILE`")
    return token


def write_token(path: Path) -> str:
    """Write a new random token (256 bits) to the new file ``path`` with mode 0600; returns the token."""
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists", hint="refusing to overwrite a token; remove it or pick another --out") \
            from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}", hint="check the folder exists and is writable") \
            from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(token + "\n")
    return token


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer) with the certificate chain ``cert`` and the private key ``key``."""
    _private_file(key, "TLS key", 0o007, "640")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} with key {key}: {exc}",
                          hint="pass a PEM certificate (chain) and its matching unencrypted PEM private key") from None
    return ctx


@dataclass(frozen=True)
class ApiGuard:
    """What the HTTP server enforces: the token (None: no token asked) and the TLS context (None: plain HTTP)."""

    token: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def allows(self, path: str, authorization: str | None) -> str | None:
        """None when the request may go on, else why not (``missing`` or ``invalid``: metric label values)."""
        if self.token is None or path in OPEN_PATHS:
            return None
        if not authorization:
            return "missing"
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return "invalid"
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.token.encode()):
            return "invalid"
        return None


def load_guard(cfg: EdgeConfig) -> ApiGuard:
    """Check the exposure rules and read the token and TLS files of ``cfg``; a problem is a :class:`ConfigError`."""
    check_exposure(cfg)
    token = read_token(cfg.api_token_file) if cfg.api_token_file is not None else None
    tls = tls_context(cfg.api_tls_cert, cfg.api_tls_key) if cfg.api_tls_cert and cfg.api_tls_key else None
    return ApiGuard(token, tls)

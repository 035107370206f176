"""Runtime settings: defaults, then a TOML config file, then ECLM_EDGE_* variables, then the command line."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eclm.errors import ConfigError
from eclm.ids import is_environment

ENV_PREFIX = "ECLM_EDGE_"


@dataclass(frozen=True)
class EdgeConfig:
    """Everything `eclm-edge serve` can be told."""

    bundle: Path | None = None
    state_dir: Path = Path("eclm-state")
    host: str = "127.0.0.1"
    port: int = 8080
    device_id: str = "device"
    train_every_samples: int = 64  # start fine-tuning after this many new samples (0: never)
    train_interval_s: float = 0.0  # also fine-tune on this schedule when new samples arrived (0: off)
    min_train_samples: int = 16
    epochs: int | None = None  # None: the bundle's value
    batch_size: int | None = None
    learning_rate: float | None = None
    max_samples: int = 10_000
    holdout_every: int = 5  # every n-th sample is held out (20%)
    max_body_bytes: int = 8 * 2**20
    seed: int = 0
    # Models whose weights total at most this: the serving session keeps its own optimized copy (about 2x
    # faster on digits); larger ones are shared in place with training (held once). 0: always shared.
    serving_copy_max_mb: float = 16.0
    broker: str | None = None  # mqtt://HOST:PORT or mqtts://HOST:PORT; unset: no sync
    tls_dir: Path | None = None  # for mqtts://: cert.pem, key.pem, ca.pem from `eclm-cloud pki enroll`
    trust_key: Path | None = None  # the cloud's Ed25519 public key; updates must be signed by it
    codec: str = "int8+zlib"  # tensor compression of deltas: 12.5x below FedAvg at no measured accuracy cost
    max_payload: int = 256 * 2**10  # deltas above this are sent in chunks
    resend_s: float = 30.0  # resend an unacknowledged delta after this long
    max_reassembly_bytes: int = 16 * 2**20  # incomplete chunked messages from the broker held at most
    profile_name: str = ""  # the device profile the cloud derives bundles for (default: the bundle's)
    # Where the device works (a line, a site, a camera's scene; eclm.ids): devices that share one merge into
    # that environment's line of each module and receive it (docs/method.md). Unset: what the device last
    # recorded (POST /v1/environment, or an earlier setting); "" is the shared line.
    environment: str | None = None
    # Fine-tune a module update from the cloud on this device's samples before judging it against what serves:
    # the received modules are a starting point (trained where others were), not a replacement for local
    # training. Costs one training run per update. Off: the update is judged as it came.
    refine_updates: bool = False
    drift: bool = True  # watch importance and accuracy drift and act on it
    resource_interval_s: float = 1.0  # how often free memory, CPU and latency are read (0: never)
    min_free_memory_mb: float = 64.0  # below this: step down to a cheaper variant
    # Share of all cores busy above which we step down (0: off). Off by default: a board running a camera
    # pipeline is busy all the time; the runtime judges its own latency against its budget instead.
    max_cpu_busy: float = 0.0
    max_latency_ms: float = 0.0  # p95 of our per-sample predict time above which we step down (0: the profile's)
    resource_patience: int = 3  # consecutive readings before a step down or up
    # When automatic training (sample count, drift, schedule) waits: "headroom" while our own latency is
    # over its budget or free memory is short of what a run needs; "variant" also whenever a cheaper
    # variant serves; "never". A run asked for with POST /v1/train always starts.
    train_pause: str = "headroom"
    http_workers: int = 8  # requests handled at once; further connections wait in the listen backlog
    http_backlog: int = 1024  # connections the kernel queues while every worker is busy
    http_idle_timeout_s: float = 10.0  # an idle or stalled connection is closed after this long
    # Who may use the API (edge_runtime/api_security.py): beyond loopback a token and TLS (or an explicit
    # api_insecure_http behind a TLS-terminating proxy) are required.
    api_token_file: Path | None = None  # with a token every endpoint but /healthz wants "Authorization: Bearer"
    api_tls_cert: Path | None = None  # PEM certificate (chain): the API speaks HTTPS (TLS 1.2 or newer)
    api_tls_key: Path | None = None  # its PEM private key
    api_insecure_http: bool = False  # allow plain HTTP beyond loopback (a TLS-terminating reverse proxy in front)


_FIELDS = {f.name: f for f in dataclasses.fields(EdgeConfig)}


def _coerce(name: str, value: Any) -> Any:
    kind = str(_FIELDS[name].type)
    try:
        if value is None:
            return None
        if "Path" in kind:
            return Path(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name} has an invalid value {value!r}", hint=f"expected {kind}") from exc


def load_config(file: Path | None = None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> EdgeConfig:
    """Merge the layers; unknown keys in the file are an error that names them."""
    values: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}", hint="fix the TOML file") from exc
        section = data.get("edge", data)
        unknown = sorted(set(section) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown settings in {file}: {unknown}", hint=f"known: {sorted(_FIELDS)}")
        values.update({k: _coerce(k, v) for k, v in section.items()})
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _coerce(name, env[key])
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    cfg = EdgeConfig(**values)
    check_config(cfg)
    return cfg


TRAIN_PAUSE_POLICIES = ("headroom", "variant", "never")


def check_config(cfg: EdgeConfig) -> None:
    """Values in range; a setting out of range is a :class:`ConfigError` naming it."""
    if cfg.environment is not None and not is_environment(cfg.environment):
        raise ConfigError(f"environment {cfg.environment[:80]!r} is not a name of 1-64 characters of A-Z a-z 0-9 _ . -",
                          hint="e.g. line-3 or site_a.cam2; '' is the shared line")
    if not 0 <= cfg.port < 65536:
        raise ConfigError(f"port {cfg.port} is out of range", hint="use 1..65535 (0: any free port)")
    if cfg.train_pause not in TRAIN_PAUSE_POLICIES:
        raise ConfigError(f"train_pause {cfg.train_pause!r} is not a policy",
                          hint=f"use one of {', '.join(TRAIN_PAUSE_POLICIES)}")
    for name in ("http_workers", "http_backlog"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}", hint="e.g. 8")
    if not cfg.http_idle_timeout_s > 0:
        raise ConfigError(f"http_idle_timeout_s must be above 0, got {cfg.http_idle_timeout_s}", hint="e.g. 10")
    if not 0 <= cfg.max_cpu_busy <= 1.0:
        raise ConfigError(f"max_cpu_busy must be 0 (off) or a share up to 1, got {cfg.max_cpu_busy}",
                          hint="e.g. 0.95")

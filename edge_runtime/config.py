"""Runtime settings: defaults, then a TOML config file, then ECLM_EDGE_* variables, then the command line."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eclm.errors import ConfigError

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
    broker: str | None = None  # mqtt://HOST:PORT; unset: no sync
    trust_key: Path | None = None  # the cloud's Ed25519 public key; updates must be signed by it
    codec: str = "int8+zlib"  # tensor compression of deltas: 12.5x below FedAvg at no measured accuracy cost
    max_payload: int = 256 * 2**10  # deltas above this are sent in chunks
    resend_s: float = 30.0  # resend an unacknowledged delta after this long
    profile_name: str = ""  # the device profile the cloud derives bundles for (default: the bundle's)
    drift: bool = True  # watch importance and accuracy drift and act on it
    resource_interval_s: float = 1.0  # how often free memory, CPU and latency are read (0: never)
    min_free_memory_mb: float = 64.0  # below this: step down to a cheaper variant
    max_cpu_busy: float = 0.9  # share of all cores busy above which we step down
    max_latency_ms: float = 0.0  # p95 of our predictions above which we step down (0: the profile's target)
    resource_patience: int = 3  # consecutive readings before a step down or up


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
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port {cfg.port} is out of range", hint="use 1..65535")
    return cfg

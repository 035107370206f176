"""Loads device profiles from the built-in folder and from folders the user names."""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eclm.errors import ProfileFormatError, UnknownProfileError

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
ENV_VAR = "ECLM_PROFILES_DIR"

PROFILE_KEYS: dict[str, type] = {
    "name": str,
    "description": str,
    "arch": str,
    "ram_mb": int,
    "cores": int,
    "sustained_gflops": float,
    "runtime_memory_budget_mb": float,
    "latency_target_ms": float,
    "uplink_mbps": float,
    "sync_window_s": float,
    "ort_training": bool,
    "training_memory_budget_mb": float,
}


@dataclass(frozen=True)
class DeviceProfile:
    """A board's resources and the budgets a sub-model for it must respect."""

    name: str
    description: str
    arch: str
    ram_mb: int
    cores: int
    sustained_gflops: float
    runtime_memory_budget_mb: float
    latency_target_ms: float
    uplink_mbps: float
    sync_window_s: float
    ort_training: bool
    training_memory_budget_mb: float
    source: str = ""

    @property
    def memory_budget_bytes(self) -> float:
        """Bytes the model and its inference may take on the board."""
        return self.runtime_memory_budget_mb * 2**20

    @property
    def training_budget_bytes(self) -> float:
        """Bytes on-device training may take on the board."""
        return self.training_memory_budget_mb * 2**20

    @property
    def flops_budget(self) -> float:
        """FLOPs one batch-1 inference may cost to meet the latency target at sustained throughput."""
        return self.sustained_gflops * 1e9 * self.latency_target_ms / 1e3

    @property
    def transfer_budget_bytes(self) -> float:
        """Bytes a sub-model transfer may take within the sync window at the uplink rate."""
        return self.uplink_mbps * 1e6 / 8 * self.sync_window_s

    def budgets(self) -> dict[str, float]:
        """The budgets a sub-model is derived against, by cost dimension."""
        return {
            "memory_bytes": self.memory_budget_bytes,
            "flops": self.flops_budget,
            "transfer_bytes": self.transfer_budget_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_dirs(extra: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for profiles, later ones overriding earlier: built-in, $ECLM_PROFILES_DIR, extra.

    Both may list several folders separated by ``os.pathsep``; a folder named twice is searched once
    (``eclm-export --profiles-dir`` also reads $ECLM_PROFILES_DIR).
    """
    dirs = [BUILTIN_DIR]
    for source in (os.environ.get(ENV_VAR), extra):
        if source is not None:
            dirs.extend(Path(p) for p in os.fspath(source).split(os.pathsep) if p)
    return list(dict.fromkeys(dirs))


def _scan(extra: str | os.PathLike[str] | None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in profile_dirs(extra):
        if not folder.is_dir():
            if folder != BUILTIN_DIR:
                raise ProfileFormatError(
                    f"profiles folder {folder} does not exist",
                    hint=f"create it, or fix --profiles-dir / ${ENV_VAR}",
                )
            continue
        for path in sorted(folder.glob("*.toml")):
            found[path.stem] = path
    return found


def available_profiles(extra: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of every profile in the registry, sorted."""
    return sorted(_scan(extra))


def parse_profile(path: Path) -> DeviceProfile:
    """Parse and check one profile file; every key present, typed and in range."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileFormatError(f"cannot read profile {path}: {exc}", hint="fix the TOML syntax") from exc
    missing = [k for k in PROFILE_KEYS if k not in data]
    unknown = [k for k in data if k not in PROFILE_KEYS]
    if missing or unknown:
        raise ProfileFormatError(
            f"profile {path}: missing keys {missing}, unknown keys {unknown}",
            hint="see device_profiles/profiles/README.md for the keys a profile must have",
        )
    values: dict[str, Any] = {}
    for key, typ in PROFILE_KEYS.items():
        value = data[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ProfileFormatError(
                f"profile {path}: {key} must be {typ.__name__}, got {value!r}", hint="fix the value"
            )
        if isinstance(value, float | int) and not isinstance(value, bool):
            if not math.isfinite(value) or value < 0:
                raise ProfileFormatError(
                    f"profile {path}: {key} must be finite and >= 0, got {value!r}", hint="fix the value"
                )
        values[key] = value
    if values["name"] != path.stem:
        raise ProfileFormatError(
            f"profile {path}: name {values['name']!r} differs from the file name {path.stem!r}",
            hint="name the file <name>.toml",
        )
    if values["training_memory_budget_mb"] > values["runtime_memory_budget_mb"] * 4:
        raise ProfileFormatError(
            f"profile {path}: training budget is implausibly larger than the runtime budget",
            hint="training_memory_budget_mb should not exceed 4x runtime_memory_budget_mb",
        )
    return DeviceProfile(**values, source=str(path))


def load_profile(name: str, extra_dir: str | os.PathLike[str] | None = None) -> DeviceProfile:
    """The profile called ``name``; an unknown name raises an error listing the known ones."""
    found = _scan(extra_dir)
    if name not in found:
        known = ", ".join(sorted(found)) or "(none)"
        raise UnknownProfileError(
            f"unknown device profile {name!r}; known profiles: {known}",
            hint="pick one of those, or drop <name>.toml into a folder given by --profiles-dir "
            f"or ${ENV_VAR}",
        )
    return parse_profile(found[name])

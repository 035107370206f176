"""Constants and helpers of the edge benchmark, safe in every process (cloud venv, edge venv, children).

Top-level imports: the standard library and numpy only; ONNX Runtime and the runtime are imported
inside the functions that need them, so the edge venv's children can import this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVING_COPY_ENV = "ECLM_BENCH_SERVING_COPY_MAX_MB"
MiB = 2**20
PROFILE = "pi4"
DEVICES: list[dict[str, Any]] = [  # E: class subset and corruption of each simulated device
    {"device": "dev-a", "classes": [1, 4, 7], "corruption": "rotate"},
    {"device": "dev-b", "classes": [0, 2, 5, 8], "corruption": "noise"},
    {"device": "dev-c", "classes": [3, 6, 9], "corruption": "contrast"},
]
CORRUPTIONS = {"rotate": "rotation by +20..30 degrees", "noise": "gaussian noise sigma 2 (of 0..16)",
               "contrast": "contrast x0.5 about the image mean"}


# ---------------------------------------------------------------- helpers (safe in every process)
def status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def pcts(ms: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    return {f"p{q}_ms": float(v) for q, v in zip(qs, np.percentile(ms, qs), strict=True)}


def ort_default_threads() -> int:
    """ONNX Runtime's default intra-op thread count on Linux: the number of physical cores."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        try:
            cores.add(((cpu / "topology/physical_package_id").read_text().strip(),
                       (cpu / "topology/core_id").read_text().strip()))
        except OSError:
            pass
    return len(cores) or (os.cpu_count() or 1)


def quiet_ort() -> None:
    from eclm.ort import load_onnxruntime

    load_onnxruntime().set_default_logger_severity(3)


# Settings turned off in the in-process runs (where the runtime has them): the drift monitor starts
# training runs of its own when add_samples sees accuracy drop, and the resource monitor swaps in
# cheaper model variants when the host is busy; either would change what is measured. They are set
# on the loaded config, and only where EdgeConfig has them.
QUIET_SETTINGS: dict[str, Any] = {"drift": False, "resource_interval_s": 0.0}


def edge_cfg(bundle: Path, state: Path, monitors: bool = False, **extra: Any) -> Any:
    import dataclasses

    from edge_runtime.config import EdgeConfig, load_config

    copy_max = os.environ.get(SERVING_COPY_ENV)  # --serving-copy-max-mb, handed to the children this way
    if copy_max is not None:
        extra.setdefault("serving_copy_max_mb", float(copy_max))
    cfg = load_config(overrides={"bundle": bundle, "state_dir": state, "train_every_samples": 0, **extra},
                      environ={})
    if monitors:
        return cfg
    known = {f.name for f in dataclasses.fields(EdgeConfig)}
    return dataclasses.replace(cfg, **{k: v for k, v in QUIET_SETTINGS.items() if k in known})


def read_manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())

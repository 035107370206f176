"""Set-up of the edge benchmark: the edge venv, machine facts, banks and bundles, and running a child.

``EDGE_VENV``, ``EDGE_PY`` and ``ORT_TRAINING_PY`` are set once by ``configure`` (from ``--edge-venv``
and ``--ort-training-venv``); the sections read them from this module.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.edge_common import DEVICES, PROFILE, ROOT, ort_default_threads

DEFAULT_EDGE_VENV = Path("/tmp/eclm-edge-venv")
EDGE_VENV = DEFAULT_EDGE_VENV  # set by --edge-venv
ORT_TRAINING_PY: Path | None = None  # set by --ort-training-venv: the artifacts baseline of D
EDGE_PY = EDGE_VENV / "bin" / "python"


def configure(edge_venv: Path, ort_training_venv: Path | None) -> None:
    """Point the benchmark at the edge venv and (optionally) the ONNX Runtime training baseline venv."""
    global EDGE_VENV, EDGE_PY, ORT_TRAINING_PY
    EDGE_VENV, EDGE_PY = edge_venv.resolve(), edge_venv.resolve() / "bin" / "python"
    ORT_TRAINING_PY = ort_training_venv.resolve() / "bin" / "python" if ort_training_venv else None


def run_child(python: Path | str, mode: str, spec: dict[str, Any], work: Path, timeout: float = 600) -> dict[str, Any]:
    """Run ``mode`` in a fresh process of ``python``; its last stdout line is the JSON result."""
    spec_path = work / f"spec-{mode}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLM_EDGE_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([str(python), "-m", "bench.edge_bench", "--child", mode, str(spec_path)],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {mode} ({python}) failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- setup
def ensure_edge_venv(say: Any) -> dict[str, Any]:
    """The edge-only virtualenv (created if missing); whether torch imports there, and its versions."""
    created = installed = False
    if not EDGE_PY.exists():
        say(f"creating {EDGE_VENV} (python3 -m venv)")
        subprocess.run(["python3", "-m", "venv", str(EDGE_VENV)], check=True)
        created = True
    env = {**os.environ, "PYTHONPATH": ""}
    check = [str(EDGE_PY), "-c", "import edge_runtime.service, edge_runtime.http_api, eclm.train_step"]
    if created or subprocess.run(check, capture_output=True, env=env, check=False).returncode != 0:
        # (Re)install: new or changed dependencies of the project's edge extra.
        say(f"pip install -e '{ROOT}[edge]' into {EDGE_VENV}")
        subprocess.run([str(EDGE_PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[edge]"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        installed = True
        subprocess.run(check, check=True, env=env)
    probe = ("import json, importlib.metadata as m, platform\n"
             "try:\n    import torch\n    t = 'imported ' + torch.__version__\n"
             "except ImportError as e:\n    t = 'ImportError: ' + str(e)\n"
             "v = {}\nfor p in ('onnxruntime', 'onnxruntime-training-cpu', 'numpy', 'torch'):\n"
             "    try:\n        v[p] = m.version(p)\n    except m.PackageNotFoundError:\n        v[p] = None\n"
             "print(json.dumps({'import_torch': t, 'versions': v, 'python': platform.python_version()}))")
    out = subprocess.run([str(EDGE_PY), "-c", probe], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info.update(path=str(EDGE_VENV), created_now=created, installed_now=installed,
                install=f"pip install -e '{ROOT}[edge]'")
    return info


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "physical_cores": ort_default_threads(), "commit": commit,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
            "load_avg_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def prepare(work: Path, say: Any, quick: bool = False) -> dict[str, Any]:
    """Banks (random resnet18, trained digits) and pi4 bundles; reused when ``work`` already holds them."""
    from exporter.cloud import TrainOptions, random_bank, train_bank
    from exporter.export import ExportRequest, export_bundle
    from exporter.importance import write_importance_file
    from exporter.torchio import model_from_bank
    from module_bank import DirectoryBank

    t0 = time.perf_counter()
    rbank, dbank = work / "bank-resnet18", work / "bank-digits"
    timing: dict[str, Any] = {}
    if not (rbank / "bank.json").exists():
        say("random resnet18 bank")
        random_bank("resnet18", rbank, seed=0)
    imp = work / "importance-uniform.json"
    if not imp.exists():
        full = model_from_bank(DirectoryBank(rbank))
        write_importance_file(imp, [np.ones(ls.num_modules) for ls in full.cfg.layers], samples=0)
        del full
    if not (dbank / "bank.json").exists():
        # --quick trains a shorter schedule (accuracies in E then differ from a full run's).
        short = {"epochs": 10, "enhance_epochs": 4} if quick else {}
        say(f"training the digits bank (train_bank, seed 0{', ' + str(short) if short else ''})")
        t = time.perf_counter()
        train_bank(TrainOptions(dataset="digits", bank_dir=dbank, seed=0, **short))  # type: ignore[arg-type]
        timing["digits_bank_schedule"] = short or "default"
        timing["train_digits_bank_s"] = time.perf_counter() - t
    bundles: dict[str, Path] = {}

    def export(key: str, **kw: Any) -> None:
        out = work / "bundles" / key
        if not (out / "manifest.json").exists():
            say(f"exporting {key}")
            t = time.perf_counter()
            export_bundle(ExportRequest(profile=PROFILE, out_dir=out, **kw))
            timing[f"export_{key}_s"] = time.perf_counter() - t
        bundles[key] = out

    export("resnet18-pi4", bank_dir=rbank, importance_file=imp)
    export("digits-pi4", bank_dir=dbank)
    for d in DEVICES:
        export(f"digits-pi4-{d['device']}", bank_dir=dbank, classes=d["classes"])
    timing["prepare_s"] = time.perf_counter() - t0
    return {"banks": {"resnet18": rbank, "digits": dbank}, "bundles": bundles, "timing": timing}

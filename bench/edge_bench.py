"""Benchmark the edge runtime against baselines measured in the same run: memory, predict, HTTP, training, adaptation.

Run as ``python -m bench.edge_bench [--out docs/benchmarks] [--quick] [--work DIR]`` from the cloud
virtualenv (torch installed). Writes ``edge.json`` and ``edge.md`` to ``--out`` and prints the tables.

A. Peak RSS of the torch-free runtime (``EdgeService`` in an edge-only virtualenv) predicting,
   storing samples and fine-tuning, vs the same work done with PyTorch.
B. ``EdgeService.predict`` vs a bare ONNX Runtime session on the same model, in one process.
C. HTTP latency of ``eclm-edge serve`` (POST /v1/predict, batch 1, keep-alive).
D. The runtime's training step vs a bare session on the same step graph and vs a PyTorch step.
E. On-device adaptation of three digits devices with corrupted, class-skewed local data.

The edge virtualenv is created at ``/tmp/eclm-edge-venv`` (``pip install -e '.[edge]'``) if missing.
Child processes re-enter this module with ``--child MODE SPEC``; the edge children import nothing
but numpy, ONNX Runtime and the runtime.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EDGE_VENV = Path("/tmp/eclm-edge-venv")
EDGE_VENV = DEFAULT_EDGE_VENV  # set by --edge-venv
ORT_TRAINING_PY: Path | None = None  # set by --ort-training-venv: the artifacts baseline of D
EDGE_PY = EDGE_VENV / "bin" / "python"
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
def _status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _pcts(ms: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
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


def _quiet_ort() -> None:
    from eclm.ort import load_onnxruntime

    load_onnxruntime().set_default_logger_severity(3)


# Settings turned off in the in-process runs (where the runtime has them): the drift monitor starts
# training runs of its own when add_samples sees accuracy drop, and the resource monitor swaps in
# cheaper model variants when the host is busy; either would change what is measured. They are set
# on the loaded config, and only where EdgeConfig has them.
QUIET_SETTINGS: dict[str, Any] = {"drift": False, "resource_interval_s": 0.0}


def _edge_cfg(bundle: Path, state: Path, monitors: bool = False, **extra: Any) -> Any:
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


# ---------------------------------------------------------------- A: children
def child_edge_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv: EdgeService predicts, stores samples and fine-tunes once; peak RSS of the process."""
    rss_start = _status_bytes("VmRSS")
    from edge_runtime.service import EdgeService

    rss_imports = _status_bytes("VmRSS")
    from eclm.ort import load_onnxruntime

    load_onnxruntime()
    rss_ort = _status_bytes("VmRSS")
    phases: dict[str, dict[str, int]] = {}

    def mark(name: str) -> None:
        phases[name] = {"rss_bytes": _status_bytes("VmRSS"), "peak_bytes": _status_bytes("VmHWM")}

    data = np.load(spec["data"])
    service = EdgeService(_edge_cfg(Path(spec["bundle"]), Path(spec["state"]), epochs=spec["epochs"],
                                    batch_size=spec["batch_size"]))
    mark("service_open")
    preds = [service.predict(x[None])["predictions"][0] for x in data["x_pred"]]
    mark("predictions")
    service.add_samples(data["x"], [int(v) for v in data["y"]])
    mark("samples_added")
    result = service.train_now()
    mark("trained")
    preds += [service.predict(x[None])["predictions"][0] for x in data["x_pred"][:4]]
    mark("predictions_after")
    out = {"rss_start_bytes": rss_start, "rss_after_imports_bytes": rss_imports, "phases": phases,
           "rss_after_ort_import_bytes": rss_ort, "peak_bytes": _status_bytes("VmHWM"),
           "rss_end_bytes": _status_bytes("VmRSS"), "predictions": len(preds), "training": result,
           "torch_in_sys_modules": "torch" in sys.modules, "torch_importable": _torch_importable()}
    try:
        import torch  # noqa: F401
        out["import_torch"] = "succeeded"
    except ImportError as exc:
        out["import_torch"] = f"failed: {type(exc).__name__}: {exc}"
    service.close()
    return out


def _trainable_prefixes(parts: list[str]) -> list[str]:
    """Sub-model parameter prefixes of bundle part ids (``L{l}M{i}`` and ``head``)."""
    from eclm.parts import onnx_prefixes

    return [prefix for p in parts for prefix in onnx_prefixes(p)]


def torch_submodel(spec: dict[str, Any]) -> Any:
    """The bundle's sub-model in PyTorch, BatchNorm in eval mode, the bundle's trainable parts trainable."""
    import torch

    from exporter.modular import ModularNet, SubModel
    from exporter.onnx_export import Normalised

    if spec["build"] == "bank":  # as the exporter builds it: the full model, then the sub-model
        from exporter.bank import DirectoryBank
        from exporter.torchio import model_from_bank

        sub = Normalised(SubModel(model_from_bank(DirectoryBank(Path(spec["bank"]))), spec["selection"]),
                         spec["mean"], spec["std"])
    else:  # only the sub-model's own tensors: no full model in memory
        from safetensors.torch import load_file

        from exporter.config import ModelConfig

        cfg = ModelConfig.from_dict(spec["config"])
        with torch.device("meta"):
            sub = Normalised(SubModel(ModularNet(cfg), spec["selection"]), spec["mean"], spec["std"])
        sub.load_state_dict(load_file(spec["state"]), strict=True, assign=True)
    sub.eval()
    prefixes = _trainable_prefixes(spec["trainable_parts"])
    for name, p in sub.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
    return sub


def torch_optimizer(sub: Any, lr: float, optimizer: dict[str, Any]) -> Any:
    """The update rule of the bundle's step graph (its manifest's ``training.optimizer``) in PyTorch."""
    from exporter.step_graph import OptimizerSpec

    return OptimizerSpec.from_dict(optimizer).torch_optimizer([p for p in sub.parameters() if p.requires_grad], lr)


def child_torch_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Cloud venv: the same predictions and training steps as the edge child, with PyTorch."""
    rss_start = _status_bytes("VmRSS")
    import torch
    import torch.nn.functional as F  # noqa: N812

    import exporter.modular  # noqa: F401
    import exporter.onnx_export  # noqa: F401

    rss_imports = _status_bytes("VmRSS")
    data = np.load(spec["data"])
    sub = torch_submodel(spec)
    opt = torch_optimizer(sub, spec["learning_rate"], spec["optimizer"])
    preds = []
    with torch.inference_mode():
        for x in data["x_pred"]:
            preds.append(int(sub(torch.from_numpy(x[None])).argmax(1)))
    # The runtime's sample store holds out every holdout_every-th sample (ids from 1).
    ids = np.arange(1, len(data["y"]) + 1)
    tr, ho = ids % spec["holdout_every"] != 0, ids % spec["holdout_every"] == 0
    xt, yt = torch.from_numpy(data["x"][tr]), torch.from_numpy(data["y"][tr].astype(np.int64))
    xh, yh = torch.from_numpy(data["x"][ho]), torch.from_numpy(data["y"][ho].astype(np.int64))

    def holdout_acc() -> float:
        with torch.inference_mode():
            return float((sub(xh).argmax(1) == yh).float().mean())

    phases: dict[str, dict[str, int]] = {}

    def mark(name: str) -> None:
        phases[name] = {"rss_bytes": _status_bytes("VmRSS"), "peak_bytes": _status_bytes("VmHWM")}

    mark("predictions")
    before = holdout_acc()
    rng = np.random.default_rng(0)
    steps, losses = 0, []
    for _ in range(spec["epochs"]):
        order = torch.from_numpy(rng.permutation(len(yt)))
        for i in range(0, len(order), spec["batch_size"]):
            idx = order[i : i + spec["batch_size"]]
            loss = F.cross_entropy(sub(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            steps += 1
    mark("trained")
    after = holdout_acc()
    with torch.inference_mode():
        for x in data["x_pred"][:4]:
            preds.append(int(sub(torch.from_numpy(x[None])).argmax(1)))
    n_train = sum(p.numel() for p in sub.parameters() if p.requires_grad)
    return {"rss_start_bytes": rss_start, "rss_after_imports_bytes": rss_imports, "peak_bytes": _status_bytes("VmHWM"),
            "rss_end_bytes": _status_bytes("VmRSS"), "predictions": len(preds), "steps": steps, "phases": phases,
            "loss_first": losses[0], "loss_last": losses[-1], "holdout_before": before, "holdout_after": after,
            "trainable_tensors": sum(1 for p in sub.parameters() if p.requires_grad), "trainable_params": n_train,
            "threads": torch.get_num_threads(), "build": spec["build"],
            "torch_in_sys_modules": "torch" in sys.modules, "torch_importable": _torch_importable()}


# ---------------------------------------------------------------- B: child
def child_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv: EdgeService.predict, ServingModel.predict and a bare session, interleaved rounds."""
    from eclm.ort import load_onnxruntime
    from edge_runtime.service import EdgeService

    ort = load_onnxruntime()
    service = EdgeService(_edge_cfg(Path(spec["bundle"]), Path(spec["state"])))
    serving = service.serving
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = serving.threads  # as ServingModel sets them
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(serving.model_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    lo, hi = serving.manifest.input["range"]
    x = np.random.default_rng(0).uniform(lo, hi, size=(1, *serving.input_shape)).astype(np.float32)
    runs = {"service": lambda: service.predict(x), "serving": lambda: serving.predict(x),
            "bare": lambda: sess.run(None, {name: x})}
    diff = float(np.abs(np.asarray(service.predict(x)["probabilities"]) - serving.predict(x)).max())
    keys = list(runs)
    for _ in range(spec["warmup"]):
        for k in keys:
            runs[k]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(spec["rounds"]):
        for k in keys[i % 3:] + keys[: i % 3]:  # rotate the order every round
            t = time.perf_counter()
            runs[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    out: dict[str, Any] = {k: _pcts(v) for k, v in times.items()}
    out["ratio_service_p50"] = out["service"]["p50_ms"] / out["bare"]["p50_ms"]
    out["ratio_serving_p50"] = out["serving"]["p50_ms"] / out["bare"]["p50_ms"]
    out["overhead_service_us"] = (out["service"]["p50_ms"] - out["bare"]["p50_ms"]) * 1e3
    out["max_abs_diff_probs"] = diff
    out["model_path"] = str(serving.model_path)
    out["torch_in_sys_modules"] = "torch" in sys.modules
    service.close()
    return out




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
    from exporter.bank import DirectoryBank
    from exporter.cloud import TrainOptions, random_bank, train_bank
    from exporter.export import ExportRequest, export_bundle
    from exporter.importance import write_importance_file
    from exporter.torchio import model_from_bank

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


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


_SAVED_THIS_RUN: set[Path] = set()


def _torch_spec(bundle: Path, bank: Path, work: Path, build: str) -> dict[str, Any]:
    """What a torch child needs to build the bundle's sub-model (``meta``: from the sub-model's own tensors)."""
    from exporter.bank import DirectoryBank

    man = _manifest(bundle)
    info = DirectoryBank(bank).info()
    spec = {"build": build, "bank": str(bank), "selection": man["selection"], "config": info.config,
            "mean": info.normalisation["mean"], "std": info.normalisation["std"],
            "trainable_parts": man["training"]["trainable_parts"], "optimizer": man["training"]["optimizer"]}
    if build == "meta":
        state = work / f"sub-{bundle.name}.safetensors"
        if state not in _SAVED_THIS_RUN:  # written by this run's code, never reused from a kept --work
            _SAVED_THIS_RUN.add(state)
            from safetensors.torch import save_file

            sub = torch_submodel({**spec, "build": "bank"})
            save_file({k: v.contiguous() for k, v in sub.state_dict().items()}, str(state))
        spec["state"] = str(state)
    return spec


# ---------------------------------------------------------------- A
def bench_memory(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    """resnet18-pi4 (the case the goal is about), then digits-pi4 (a tiny model: the import floor)."""
    rows = []
    n_pred, n_samples = (8, 48) if quick else (20, 96)
    for key, bank_key in (("resnet18-pi4", "resnet18"), ("digits-pi4", "digits")):
        bundle, bank = prep["bundles"][key], prep["banks"][bank_key]
        man = _manifest(bundle)
        rng = np.random.default_rng(0)
        lo, hi = man["input"]["range"]
        shape = man["input"]["shape"][1:]
        data = work / f"memory-data-{key}.npz"
        np.savez(data, x_pred=rng.uniform(lo, hi, size=(n_pred, *shape)).astype(np.float32),
                 x=rng.uniform(lo, hi, size=(n_samples, *shape)).astype(np.float32),
                 y=rng.integers(0, len(man["labels"]), size=n_samples).astype(np.int64))
        common = {"data": str(data), "epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "holdout_every": 5}
        say(f"A: {key}: edge runtime in the edge venv (subprocess)")
        state = work / f"state-memory-{key}"
        shutil.rmtree(state, ignore_errors=True)
        edge = run_child(EDGE_PY, "edge-memory", {**common, "bundle": str(bundle), "state": str(state)}, work)
        say(f"A: {key}: PyTorch baseline, sub-model tensors only (subprocess)")
        torch_meta = run_child(sys.executable, "torch-memory",
                               {**common, **_torch_spec(bundle, bank, work, "meta")}, work)
        say(f"A: {key}: PyTorch baseline, built from the bank like the exporter (subprocess)")
        torch_bank = run_child(sys.executable, "torch-memory",
                               {**common, **_torch_spec(bundle, bank, work, "bank")}, work)
        rows.append({"bundle": key, "trainable_parts": man["training"]["trainable_parts"],
                     "predictions": n_pred, "samples": n_samples, "edge": edge, "torch_meta": torch_meta,
                     "torch_bank": torch_bank, "ratio_peak": edge["peak_bytes"] / torch_meta["peak_bytes"],
                     "ratio_peak_vs_bank_build": edge["peak_bytes"] / torch_bank["peak_bytes"],
                     "ratio_above_imports": (edge["peak_bytes"] - edge["rss_after_ort_import_bytes"])
                     / (torch_meta["peak_bytes"] - torch_meta["rss_after_imports_bytes"])})
    return rows


# ---------------------------------------------------------------- B
def bench_predict(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    rows = []
    for key in ("digits-pi4", "resnet18-pi4"):
        say(f"B: predict overhead, {key} (edge venv subprocess)")
        state = work / f"state-predict-{key}"
        shutil.rmtree(state, ignore_errors=True)
        spec = {"bundle": str(prep["bundles"][key]), "state": str(state),
                "rounds": 200 if quick else 1000, "warmup": 20 if quick else 50}
        if key.startswith("resnet18"):
            spec["rounds"] = 100 if quick else 400
        rows.append({"bundle": key, "rounds": spec["rounds"], **run_child(EDGE_PY, "predict", spec, work)})
    return rows


# ---------------------------------------------------------------- C
def child_serve_nodelay(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv, diagnostic for C: the runtime's own handler class, subclassed only to set TCP_NODELAY,
    configured and started as `eclm-edge serve` does it (with the environment the parent gives both).
    """
    import dataclasses

    from edge_runtime.config import EdgeConfig
    from edge_runtime.http_api import serve
    from edge_runtime.service import EdgeService

    off = spec["resources_off"] and "resource_interval_s" in {f.name for f in dataclasses.fields(EdgeConfig)}
    service = EdgeService(_edge_cfg(Path(spec["bundle"]), Path(spec["state"]), monitors=True,
                                    **({"resource_interval_s": 0.0} if off else {})))
    server = serve(service, "127.0.0.1", spec["port"])  # its handler sets TCP_NODELAY
    for name in ("start_monitors", "start_scheduler"):
        if hasattr(service, name):
            getattr(service, name)()
            break
    server.serve_forever()  # ended by the parent's SIGTERM
    return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_latency(cmd: list[str], port: int, bundle: Path, log_path: Path, n: int, warm: int) -> dict[str, Any]:
    """Start a server, wait for /healthz, then time POST /v1/predict against a bare session, interleaved."""
    import http.client

    from eclm.ort import load_onnxruntime

    ort = load_onnxruntime()
    man = _manifest(bundle)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLM_EDGE_")}
    env["PYTHONPATH"] = str(ROOT)
    # The resource monitor would swap in cheaper variants whenever this shared host is busy.
    env["ECLM_EDGE_RESOURCE_INTERVAL_S"] = "0"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-1000:]}")
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/healthz")
                    ready = c.getresponse().status == 200
                    c.close()
                    if ready:
                        break
                except OSError:
                    pass
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("the server did not answer /healthz within 60 s")
                time.sleep(0.1)
            startup_s = time.perf_counter() - t0
            lo, hi = man["input"]["range"]
            x = np.random.default_rng(0).uniform(lo, hi, size=(1, *man["input"]["shape"][1:])).astype(np.float32)
            body = json.dumps({"inputs": x.tolist()}).encode()
            headers = {"Content-Type": "application/json"}
            # The same-time baseline: a bare session in this process on the served model, 1 thread.
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

            def post() -> bytes:
                conn.request("POST", "/v1/predict", body, headers)
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    raise RuntimeError(f"POST /v1/predict: {r.status} {data[:300]!r}")
                return data

            answer = json.loads(post())
            for _ in range(warm):
                post()
                sess.run(None, {name: x})
            http_ms: list[float] = []
            bare_ms: list[float] = []
            variants: set[str] = set()
            for i in range(n):
                for k in ("http", "bare") if i % 2 == 0 else ("bare", "http"):
                    t = time.perf_counter()
                    if k == "http":
                        data = post()
                    else:
                        sess.run(None, {name: x})
                    (http_ms if k == "http" else bare_ms).append((time.perf_counter() - t) * 1e3)
                    if k == "http" and i % 10 == 0:
                        variants.add(str(json.loads(data).get("variant", "main")))
            conn.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    hp, bp = _pcts(http_ms), _pcts(bare_ms)
    return {"requests": n, "startup_s": startup_s, "http": hp, "bare": bp,
            "overhead_p50_ms": hp["p50_ms"] - bp["p50_ms"], "request_bytes": len(body),
            "prediction": answer["predictions"][0], "variants_seen": sorted(variants)}


def bench_http(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    exe = EDGE_VENV / "bin" / "eclm-edge"
    n, warm = (100, 10) if quick else (300, 30)
    rows: list[dict[str, Any]] = []
    for key in ("digits-pi4", "resnet18-pi4"):
        bundle = prep["bundles"][key]
        for server in ("eclm-edge serve", "same handler + TCP_NODELAY"):
            state = work / f"state-http-{key}-{len(rows)}"
            shutil.rmtree(state, ignore_errors=True)
            port = _free_port()
            say(f"C: HTTP latency, {key}, {server} on 127.0.0.1:{port}")
            if server == "eclm-edge serve":
                cmd = [str(exe), "serve", "--bundle", str(bundle), "--state-dir", str(state), "--host", "127.0.0.1",
                       "--port", str(port), "--train-every", "0"]
            else:  # diagnostic: what the shipped server costs with Nagle's algorithm off
                spec_path = work / f"spec-serve-{key}.json"
                spec_path.write_text(json.dumps({"bundle": str(bundle), "state": str(state), "port": port,
                                                 "resources_off": True}))
                cmd = [str(EDGE_PY), "-m", "bench.edge_bench", "--child", "serve-nodelay", str(spec_path)]
            res = _http_latency(cmd, port, bundle, work / f"serve-{key}-{len(rows)}.log", n, warm)
            rows.append({"bundle": key, "server": server, "command": " ".join(cmd[:2]), **res})
    return rows


# ---------------------------------------------------------------- D
def _train_data(bundle: Path, work: Path) -> tuple[Path, int, float]:
    man = _manifest(bundle)
    bs, lr = int(man["training"]["batch_size"]), float(man["training"]["learning_rate"])
    lo, hi = man["input"]["range"]
    path = work / f"train-batch-{bundle.name}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.uniform(lo, hi, size=(bs, *man["input"]["shape"][1:])).astype(np.float32),
             y=(np.arange(bs) % len(man["labels"])).astype(np.int64))
    return path, bs, lr


def child_train_ort(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv: the runtime's ``run_training`` steps vs a bare ONNX Runtime session running the same step
    graph (plain ``InferenceSession.run`` with numpy feeds, ORT's default options, 1 thread), same batch.
    """
    from eclm.onnx_weights import read_initializers
    from eclm.ort import load_onnxruntime
    from edge_runtime.service import EdgeService
    from edge_runtime.store import Batch
    from edge_runtime.trainer import TrainSettings, run_training

    ort = load_onnxruntime()
    ort.set_default_logger_severity(3)
    data = np.load(spec["data"])
    x, y = data["x"], data["y"]
    bs, lr = len(y), spec["learning_rate"]
    service = EdgeService(_edge_cfg(Path(spec["bundle"]), Path(spec["state"])))
    serving = service.serving
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the runtime trains
    bare = ort.InferenceSession(str(serving.bundle_dir / serving.manifest.training["step"]), options,
                                providers=["CPUExecutionProvider"])
    weights = read_initializers(serving.bundle_dir / "model.onnx")
    feeds: dict[str, np.ndarray] = {"input": x, "labels": y, "learning_rate": np.asarray(lr, np.float32)}
    for i in bare.get_inputs():
        if i.name.startswith("param/"):
            feeds[i.name] = weights[i.name.removeprefix("param/")]
        elif i.name.startswith("state/"):
            feeds[i.name] = np.zeros([int(d) for d in i.shape], np.float32)
    carried = [n for n in feeds if n.startswith(("param/", "state/"))]
    fetch = ["loss"] + ["new/" + n for n in carried]

    def bare_step() -> float:
        out = bare.run(fetch, feeds)
        feeds.update(zip(carried, out[1:], strict=True))
        return float(out[0])

    batch, empty = Batch(x, y, np.arange(1, bs + 1)), Batch(x[:0], y[:0], np.arange(0))
    steps = spec["steps_per_round"]
    times: dict[str, list[float]] = {"runtime": [], "bare": []}
    run_seconds, first_ms, losses = [], [], {}
    for _ in range(2):  # warm-up of the long-lived baseline
        bare_step()

    def runtime_block(r: int) -> None:
        # A one-batch training set: every step of the run sees this batch.
        outcome, _, _ = run_training(serving, batch, empty, TrainSettings(steps + 1, bs, lr))
        times["runtime"] += [v * 1e3 for v in outcome.step_seconds[1:]]
        block_p50["runtime"].append(float(np.median(outcome.step_seconds[1:])) * 1e3)
        first_ms.append(outcome.step_seconds[0] * 1e3)
        run_seconds.append(outcome.seconds)
        losses["runtime"] = outcome.loss_last

    def bare_block(r: int) -> None:
        start = len(times["bare"])
        for _ in range(steps):
            t = time.perf_counter()
            losses["bare"] = bare_step()
            times["bare"].append((time.perf_counter() - t) * 1e3)
        block_p50["bare"].append(float(np.median(times["bare"][start:])))

    block_p50: dict[str, list[float]] = {k: [] for k in times}
    blocks = [runtime_block, bare_block]
    for r in range(spec["rounds"]):
        for b in blocks[r % 2:] + blocks[: r % 2]:  # alternate the order every round
            b(r)
    service.close()
    out: dict[str, Any] = {k: _pcts(v, (50, 90)) for k, v in times.items()}
    # Paired per round (blocks of one round ran seconds apart): robust to the host's load drifting.
    out["paired_ratio"] = {"bare": float(np.median(np.array(block_p50["runtime"]) / np.array(block_p50["bare"])))}
    out["best_block_p50_ms"] = {k: min(v) for k, v in block_p50.items()}
    out.update(steps_timed={k: len(v) for k, v in times.items()}, rounds=spec["rounds"], block_p50_ms=block_p50,
               run_training_seconds_p50=float(np.median(run_seconds)),
               runtime_first_step_ms_p50=float(np.median(first_ms)), loss_last=losses,
               trainable_tensors=len(serving.manifest.training["trainable_params"]))
    return out


def child_train_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """Cloud venv, alone in its process: PyTorch CPU steps of the same sub-model on the same batch."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.set_num_threads(spec["threads"])
    data = np.load(spec["data"])
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    sub = torch_submodel(spec)
    opt = torch_optimizer(sub, spec["learning_rate"], spec["optimizer"])

    def step() -> float:
        loss = F.cross_entropy(sub(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        step()
    ms = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        loss = step()
        ms.append((time.perf_counter() - t) * 1e3)
    return {"torch": _pcts(ms, (50, 90)), "steps_timed": len(ms), "loss_last": loss, "threads": torch.get_num_threads(),
            "trainable_tensors": sum(1 for p in sub.parameters() if p.requires_grad)}


def bench_training(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    threads = 1  # the runtime trains on one intra-op thread; PyTorch gets the same
    rows = []
    for key in ("digits-pi4", "resnet18-pi4"):
        bundle = prep["bundles"][key]
        bank = prep["banks"]["digits" if key.startswith("digits") else "resnet18"]
        man = _manifest(bundle)
        data, bs, lr = _train_data(bundle, work)
        small = key.startswith("digits")
        steps, rounds = (20, 10) if small else (6, 6)
        if quick:
            steps, rounds = (10, 5) if small else (4, 3)
        state = work / f"state-train-{key}"
        shutil.rmtree(state, ignore_errors=True)
        say(f"D: training step, {key}: runtime vs a bare session on the step graph (edge venv subprocess)")
        ort_res = run_child(EDGE_PY, "train-ort",
                            {"bundle": str(bundle), "state": str(state), "work": str(work / f"train-{key}"),
                             "data": str(data), "learning_rate": lr, "steps_per_round": steps, "rounds": rounds}, work)
        say(f"D: training step, {key}: PyTorch, {threads} threads (subprocess)")
        torch_res = run_child(sys.executable, "train-torch",
                              {**_torch_spec(bundle, bank, work, "meta"), "data": str(data), "learning_rate": lr,
                               "threads": threads, "steps": steps * (2 if quick else 3)}, work)
        artifacts = None
        if ORT_TRAINING_PY is not None:
            say(f"D: training step, {key}: ONNX Runtime training artifacts (baseline venv subprocess)")
            artifacts = _artifacts_step(bundle, data, lr, steps * rounds, work)
        rows.append({"bundle": key, "trainable_parts": man["training"]["trainable_parts"], "batch_size": bs,
                     "ort_artifacts": artifacts,
                     "ratio_runtime_vs_artifacts": (ort_res["runtime"]["p50_ms"] / artifacts["p50_ms"]
                                                    if artifacts and "p50_ms" in artifacts else None),
                     "optimizer": man["training"]["optimizer"]["name"],
                     **ort_res, "torch": torch_res["torch"], "torch_detail": torch_res,
                     "ratio_runtime_vs_bare": ort_res["paired_ratio"]["bare"],
                     "ratio_runtime_vs_torch": ort_res["runtime"]["p50_ms"] / torch_res["torch"]["p50_ms"],
                     "ratio_bare_vs_torch": ort_res["bare"]["p50_ms"] / torch_res["torch"]["p50_ms"],
                     "torch_threads": threads, "ort_threads": 1})
    return rows


def _artifacts_step(bundle: Path, data: Path, lr: float, steps: int, work: Path) -> dict[str, Any]:
    """The same bundle, batch and optimizer stepped by ONNX Runtime's training artifacts (a baseline only)."""
    assert ORT_TRAINING_PY is not None
    spec = work / "artifacts-spec.json"
    spec.write_text(json.dumps({"bundle": str(bundle), "data": str(data), "learning_rate": lr, "steps": steps}))
    done = subprocess.run([str(ORT_TRAINING_PY), str(Path(__file__).with_name("ort_artifacts.py")), str(spec)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": " ".join(done.stderr.strip().splitlines()[-1:])[:300]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- E
def corrupt(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Apply a device's corruption to raw digits (N, 1, 8, 8) on the 0..16 scale."""
    from scipy.ndimage import rotate

    if kind == "rotate":
        out = np.stack([rotate(img[0], float(rng.uniform(20, 30)), reshape=False, order=1, mode="constant")[None]
                        for img in x])
    elif kind == "noise":
        out = x + rng.normal(0.0, 2.0, size=x.shape)
    elif kind == "contrast":
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        out = m + 0.5 * (x - m)
    else:
        raise ValueError(kind)
    return np.clip(out, 0.0, 16.0).astype(np.float32)


def bench_adaptation(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    from edge_runtime.service import EdgeService
    from exporter.data import load_dataset, split

    pool = split(load_dataset("digits"), 0).pool
    rows = []
    for n, d in enumerate(DEVICES):
        bundle = prep["bundles"][f"digits-pi4-{d['device']}"]
        rng = np.random.default_rng(100 + n)
        mask = np.isin(pool.y, d["classes"])
        x_clean, y = pool.x[mask].astype(np.float32), pool.y[mask].astype(np.int64)
        x = corrupt(x_clean, d["corruption"], rng)
        order = rng.permutation(len(y))
        half = len(y) // 2
        tr, te = order[:half], order[half:]
        for epochs in ([None] if quick else [None, 10]):
            say(f"E: {d['device']} classes {d['classes']} {d['corruption']}, epochs {epochs or 'bundle default'}")
            state = work / f"state-adapt-{d['device']}-{epochs}"
            shutil.rmtree(state, ignore_errors=True)
            service = EdgeService(_edge_cfg(bundle, state, epochs=epochs))
            before = service.serving.accuracy(x[te], y[te])
            clean_before = service.serving.accuracy(x_clean[te], y[te])
            service.add_samples(x[tr], [int(v) for v in y[tr]])
            result = service.train_now()
            after = service.serving.accuracy(x[te], y[te])
            clean_after = service.serving.accuracy(x_clean[te], y[te])
            rows.append({**d, "epochs": service.settings().epochs, "batch_size": service.settings().batch_size,
                         "learning_rate": service.settings().learning_rate, "samples_total": int(len(y)),
                         "local_samples": int(len(tr)), "test_samples": int(len(te)),
                         "acc_before": before, "acc_after": after, "delta": after - before,
                         "clean_acc_before": clean_before, "clean_acc_after": clean_after,
                         "accepted": bool(result.get("accepted")), "reason": result.get("reason", ""),
                         "holdout_before": result.get("holdout_before"), "holdout_after": result.get("holdout_after"),
                         "steps": result.get("steps"), "train_seconds": result.get("seconds"),
                         "generation": service.serving.generation,
                         "trainable_parts": len(_manifest(bundle)["training"]["trainable_parts"])})
            service.close()
    return rows


CHILDREN = {"edge-memory": child_edge_memory, "torch-memory": child_torch_memory, "predict": child_predict,
            "serve-nodelay": child_serve_nodelay, "train-ort": child_train_ort, "train-torch": child_train_torch}


# ---------------------------------------------------------------- report
def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / MiB:.1f}"


def _torch_note(r: dict[str, Any]) -> str:
    return "yes" if r["torch_importable"] else "no"


def tables(res: dict[str, Any]) -> str:
    out = []
    if a := res.get("memory"):
        out += ["**A. Peak RSS of the whole process** (VmHWM): batch-1 predictions, samples stored, one training run "
                "(1 epoch, batch 16), more predictions. Goal: edge <= 1/3 of PyTorch.", "",
                "| bundle (trainable parts) | process | torch importable | RSS after imports MiB "
                "| peak RSS MiB | peak above imports MiB | edge / PyTorch peak | within goal |",
                "|---|---|---|--:|--:|--:|--:|---|"]
        for r in a:
            if "error" in r:
                out.append(f"| {r['bundle']} | error: {r['error']} |" + " |" * 6)
                continue
            e, tm, tb = r["edge"], r["torch_meta"], r["torch_bank"]
            ok = "yes" if r["ratio_peak"] <= 1 / 3 else "**no**"
            label = f"{r['bundle']} ({len(r['trainable_parts'])})"
            out += [f"| {label} | edge runtime (`EdgeService`, edge venv; {r['predictions']}+4 predictions, "
                    f"{r['samples']} samples, {e['training'].get('steps')} steps) | {_torch_note(e)} "
                    f"| {_mib(e['rss_after_ort_import_bytes'])} (runtime alone {_mib(e['rss_after_imports_bytes'])}) "
                    f"| {_mib(e['peak_bytes'])} | {_mib(e['peak_bytes'] - e['rss_after_ort_import_bytes'])} "
                    f"| **{r['ratio_peak']:.2f}** (above imports {r['ratio_above_imports']:.2f}) | {ok} |",
                    f"| {label} | PyTorch, sub-model tensors only ({tm['steps']} steps) | {_torch_note(tm)} "
                    f"| {_mib(tm['rss_after_imports_bytes'])} | {_mib(tm['peak_bytes'])} "
                    f"| {_mib(tm['peak_bytes'] - tm['rss_after_imports_bytes'])} | 1.00 | |",
                    f"| {label} | PyTorch, built from the bank (as the exporter) | {_torch_note(tb)} "
                    f"| {_mib(tb['rss_after_imports_bytes'])} | {_mib(tb['peak_bytes'])} "
                    f"| {_mib(tb['peak_bytes'] - tb['rss_after_imports_bytes'])} "
                    f"| {r['ratio_peak_vs_bank_build']:.2f} (edge / this) | |"]
        if ok_rows := [r for r in a if "error" not in r]:
            r = ok_rows[0]
            ph = r["edge"]["phases"]
            base = r["edge"]["rss_after_ort_import_bytes"]
            out += ["", f"Where the edge process's memory goes ({r['bundle']}; RSS / peak MiB after each phase): "
                    + ", ".join(f"{k.replace('_', ' ')} {_mib(v['rss_bytes'])} / {_mib(v['peak_bytes'])}"
                                for k, v in ph.items())
                    + f" (after imports {_mib(base)})."]
        out.append("")
    if b := res.get("predict"):
        out += ["**B. Predict overhead in process** (edge venv, batch 1, p50 over interleaved rounds). "
                "Goal: `EdgeService.predict` / bare session <= 1.10.", "",
                "| bundle | rounds | bare `InferenceSession.run` p50 ms | `serving.predict` p50 ms (ratio) "
                "| `EdgeService.predict` p50 ms (ratio) | overhead µs | within goal |",
                "|---|--:|--:|--:|--:|--:|---|"]
        for r in b:
            if "error" in r:
                out.append(f"| {r['bundle']} | error: {r['error']} |" + " |" * 5)
                continue
            ok = "yes" if r["ratio_service_p50"] <= 1.10 else "**no**"
            out.append(f"| {r['bundle']} | {r['rounds']} | {r['bare']['p50_ms']:.3f} "
                       f"| {r['serving']['p50_ms']:.3f} ({r['ratio_serving_p50']:.2f}) "
                       f"| {r['service']['p50_ms']:.3f} ({r['ratio_service_p50']:.2f}) "
                       f"| {r['overhead_service_us']:.0f} | {ok} |")
        out.append("")
    if c := res.get("http"):
        out += ["**C. HTTP latency**: POST /v1/predict, batch 1, one keep-alive http.client connection, on "
                "127.0.0.1; a bare session on the same model runs in the client process, interleaved. "
                "`eclm-edge serve` is the edge venv's console script; the second server of each bundle is a "
                "diagnostic: the runtime's own server (`edge_runtime.http_api.serve`) built in-process, "
                "without the command line around it.", "",
                "| bundle | server | requests | HTTP p50 / p99 ms | bare session p50 / p99 ms | HTTP - bare p50 ms "
                "| request bytes | variants served |", "|---|---|--:|--:|--:|--:|--:|---|"]
        for r in c:
            if "error" in r:
                out.append(f"| {r['bundle']} | error: {r['error']} |" + " |" * 6)
                continue
            out.append(f"| {r['bundle']} | {r['server']} | {r['requests']} "
                       f"| {r['http']['p50_ms']:.2f} / {r['http']['p99_ms']:.2f} "
                       f"| {r['bare']['p50_ms']:.2f} / {r['bare']['p99_ms']:.2f} | {r['overhead_p50_ms']:.2f} "
                       f"| {r['request_bytes']} | {', '.join(r.get('variants_seen', [])) or '–'} |")
        out.append("")
    if d := res.get("training"):
        out += ["**D. Training step** (batch 16, the bundle's trainable parts and optimizer, p50 ms over all timed "
                "steps, 1 thread everywhere). Goal: runtime <= 0.5x a PyTorch step of the same sub-model. The "
                "runtime / bare ratio is paired: the median over rounds of the ratio of the blocks' p50s in that "
                "round; the last column (each path's fastest block p50) shows the cost least disturbed by other "
                "processes on this host.", "",
                "| bundle | trainable parts | optimizer | runtime step | bare session on the step graph | PyTorch "
                "| runtime / PyTorch | within goal | runtime / bare | runtime: first step of a run; whole "
                "`run_training` | least disturbed block: runtime / bare |",
                "|---|--:|---|--:|--:|--:|--:|---|--:|--:|--:|"]
        for r in d:
            if "error" in r:
                out.append(f"| {r['bundle']} | error: {r['error']} |" + " |" * 9)
                continue
            ok = "yes" if r["ratio_runtime_vs_torch"] <= 0.5 else "**no**"
            out.append(f"| {r['bundle']} | {len(r['trainable_parts'])} | {r['optimizer']} "
                       f"| {r['runtime']['p50_ms']:.2f} | {r['bare']['p50_ms']:.2f} | {r['torch']['p50_ms']:.2f} "
                       f"| **{r['ratio_runtime_vs_torch']:.2f}** | {ok} | {r['ratio_runtime_vs_bare']:.2f} "
                       f"| {r['runtime_first_step_ms_p50']:.1f} ms; {r['run_training_seconds_p50']:.2f} s for "
                       f"{r['steps_timed']['runtime'] // max(1, r['rounds']) + 1} steps "
                       f"| {r['best_block_p50_ms']['runtime']:.2f} / {r['best_block_p50_ms']['bare']:.2f} |")
        out.append("")
    if e := res.get("adaptation"):
        out += ["**E. Digits adaptation** (pi4 bundle exported for the device's classes; accuracy of the served "
                "model on the device's held-out corrupted samples).", "",
                "| device | classes | corruption | samples (local / test) | epochs | accuracy before | after "
                "| delta | clean before / after | accepted | steps |", "|---|---|---|--:|--:|--:|--:|--:|--:|---|--:|"]
        for r in e:
            if "error" in r:
                out.append(f"| error: {r['error']} |" + " |" * 10)
                continue
            acc = "yes" if r["accepted"] else f"no ({r['reason']})"
            out.append(f"| {r['device']} | {','.join(map(str, r['classes']))} | {CORRUPTIONS[r['corruption']]} "
                       f"| {r['local_samples']} / {r['test_samples']} | {r['epochs']} | {r['acc_before']:.3f} "
                       f"| {r['acc_after']:.3f} | {r['delta']:+.3f} "
                       f"| {r['clean_acc_before']:.3f} / {r['clean_acc_after']:.3f} | {acc} | {r['steps']} |")
        out.append("")
    return "\n".join(out)


def goals(res: dict[str, Any]) -> str:
    """One line per goal: met or missed, with the figure; then what the tables show besides."""
    lines = ["## Goals", ""]

    def ok(v: bool) -> str:
        return "met" if v else "**missed**"

    for r in res.get("memory", []):
        if "error" not in r:
            lines.append(f"- A, {r['bundle']}: edge peak RSS / PyTorch peak RSS = {r['ratio_peak']:.2f} "
                         f"(goal <= 0.33): {ok(r['ratio_peak'] <= 1 / 3)}. `import torch` in the edge venv: "
                         f"{r['edge']['import_torch']}; PyTorch process: torch importable "
                         f"{r['torch_meta']['torch_importable']}.")
    for r in res.get("predict", []):
        if "error" not in r:
            lines.append(f"- B, {r['bundle']}: `EdgeService.predict` / bare session p50 = "
                         f"{r['ratio_service_p50']:.2f} (goal <= 1.10): {ok(r['ratio_service_p50'] <= 1.10)} "
                         f"({r['overhead_service_us']:.0f} µs per call; model-only part "
                         f"{r['ratio_serving_p50']:.2f}).")
    for r in res.get("training", []):
        if "error" not in r:
            best = r["best_block_p50_ms"]
            art = r.get("ort_artifacts")
            if art and "p50_ms" in art:
                lines.append(f"- D, {r['bundle']}: runtime step / ONNX Runtime training artifacts step p50 = "
                             f"{r['ratio_runtime_vs_artifacts']:.2f} (goal <= 1.0): "
                             f"{ok(r['ratio_runtime_vs_artifacts'] <= 1.0)} (artifacts {art['p50_ms']:.2f} ms, "
                             f"onnxruntime-training {art['onnxruntime']}, separate process).")
            elif art:
                lines.append(f"- D, {r['bundle']}: the training artifacts baseline failed: {art.get('error')}")
            else:
                lines.append(f"- D, {r['bundle']}: runtime vs ONNX Runtime training artifacts: not measured "
                             "(pass --ort-training-venv).")
            lines.append(f"- D, {r['bundle']}: runtime step / PyTorch step p50 = {r['ratio_runtime_vs_torch']:.2f} "
                         f"(goal <= 0.5): {ok(r['ratio_runtime_vs_torch'] <= 0.5)}; runtime / bare session on "
                         f"the same step graph {r['ratio_runtime_vs_bare']:.2f} (least disturbed blocks "
                         f"{best['runtime'] / best['bare']:.2f}).")
    http = [r for r in res.get("http", []) if "error" not in r]
    for shipped in [r for r in http if r["server"] == "eclm-edge serve"]:
        diag = next((r for r in http if r["bundle"] == shipped["bundle"] and r is not shipped), None)
        if diag and shipped["http"]["p50_ms"] - diag["http"]["p50_ms"] > 20:
            lines.append(f"- C, {shipped['bundle']}: `eclm-edge serve` answers in {shipped['http']['p50_ms']:.1f} ms "
                         f"p50, the same handler with TCP_NODELAY in {diag['http']['p50_ms']:.1f} ms: the ~40 ms "
                         "are Nagle's algorithm holding the response body (written apart from the headers) until "
                         "the client's delayed ACK.")
    for r in res.get("adaptation", []):
        if "error" not in r and not r["accepted"]:
            lines.append(f"- E, {r['device']} ({r['epochs']} epochs): run not accepted: {r['reason']}")
    forget = [r for r in res.get("adaptation", []) if "error" not in r
              and r["clean_acc_after"] < r["clean_acc_before"] - 0.05]
    if forget:
        lines.append("- E: accuracy on the *uncorrupted* versions of the test samples fell by more than 5 points for "
                     + ", ".join(f"{r['device']} ({r['epochs']} epochs: {r['clean_acc_before']:.2f} -> "
                                 f"{r['clean_acc_after']:.2f})" for r in forget)
                     + "; the runtime's acceptance test sees only the device's own (corrupted) holdout.")
    return "\n".join(lines) + "\n"


def preface(res: dict[str, Any]) -> str:
    m, ev = res["machine"], res["edge_venv"]
    ev_v = ev["versions"]
    return f"""# Edge runtime benchmark

What: the torch-free edge runtime (`edge_runtime`, `eclm-edge serve`) against baselines measured in
the same run: peak memory vs PyTorch doing the same work (A), the runtime's predict overhead over a
bare ONNX Runtime session (B), HTTP latency (C), the runtime's training step (the bundle's step graph
on plain ONNX Runtime) vs a bare session on the same graph and vs PyTorch (D), and on-device
adaptation of three simulated digits devices (E).

Machine: {m['cpu']} ({m['cores']} logical cores, {m['physical_cores']} physical), {m['platform']},
Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']} (cloud venv); edge venv
`{ev['path']}` (`{ev['install']}`): onnxruntime {ev_v.get('onnxruntime')} (training build:
{ev_v.get('onnxruntime-training-cpu') or 'not installed'}),
numpy {ev_v.get('numpy')}, torch {ev_v.get('torch') or 'not installed'} — `import torch` there:
{ev['import_torch']}.
Code at commit {m['commit']} (plus the work tree's uncommitted changes).
Date {m['date']}; load average (1 min) {m['load_avg_1m']:.2f} at the start and
{res['load_avg_end']:.2f} at the end (other processes share this host: absolute times are noisy,
ratios come from interleaved rounds in one process). Command: `{res['command']}` ({res['seconds']:.0f} s).

How:
- Bundles: `{PROFILE}` bundles of a random `resnet18` bank (`random_bank`, uniform importance file, as
  in export.md: sizes and speed only) and of a `digits` bank trained with
  `train_bank(TrainOptions(dataset="digits", seed=0))`; for E, one pi4 bundle per device exported with
  `classes=` its classes. Trainable parts are the bundle's `training.trainable_parts`.
- Runtimes built in-process (A, B, D, E) turn the runtime's drift and resource monitors off (`drift=False`,
  `resource_interval_s=0` set on the loaded config): the drift monitor would start training runs of its
  own from `add_samples`, the resource monitor would swap in cheaper variants on this busy host.
- A: each figure from a fresh subprocess. Edge: the edge venv's python runs `EdgeService`
  (`load_config(overrides=...)`, state dir in tmp, `train_every_samples=0`, `epochs=1`, batch 16):
  batch-1 predictions, `add_samples`, `train_now()` (which also evaluates the holdout before and
  after, writes the new generation and opens it), a few more predictions. PyTorch (cloud venv): the
  same sub-model `Normalised(SubModel(...), mean, std)` (BatchNorm frozen as exported), eval mode,
  the bundle's trainable parts trainable (`L{{l}}M{{i}}` -> `net.layers.{{l}}.mods.m{{i}}.`, `head` ->
  `net.head.`), the bundle's optimizer (`training.optimizer` in its manifest: AdamW, lr 1e-3, betas
  0.9/0.999, eps 1e-6, no weight decay), the same predictions,
  the store's training split (every 5th sample held out) in batches of 16 for 1 epoch and the holdout
  evaluated before and after. Two PyTorch builds: from the sub-model's own tensors (on the meta device,
  then assigned: the lean baseline, used for the ratio) and from the bank via `model_from_bank` as the
  exporter does (the full model is in memory too). Peak = VmHWM of the whole process.
- B: in one edge-venv process: `EdgeService.predict(x)`, `service.serving.predict(x)` (session +
  softmax) and a bare `InferenceSession.run` on `service.serving.model_path` with the runtime's
  session options (1 intra-op thread), batch 1, rounds rotating the order, after warm-up.
- C: `eclm-edge serve` of the edge venv as a subprocess on a free 127.0.0.1 port, `--train-every 0`,
  `ECLM_EDGE_RESOURCE_INTERVAL_S=0` (no variant swaps), drift monitor as shipped (on);
  http.client keep-alive, the request body encoded once; the bare session in the client process
  alternates with the requests. Diagnostic second server per bundle: see the table.
- D: in one edge-venv process, in blocks whose order alternates every round: the runtime's
  `edge_runtime.trainer.run_training` on the serving model with a one-batch (16-sample) training set,
  so every step sees the same batch, timed by its own `step_seconds` (each run's first step, the
  fresh session's warm-up, dropped and reported apart); and a bare `InferenceSession` on the bundle's
  `training/train_step.onnx` (ORT's default options, numpy feeds, outputs fed back as inputs), both
  1 intra-op thread. PyTorch: the same sub-model, trainable parts, batch and optimizer,
  `torch.set_num_threads(1)`, alone in its own process.
- E: device pool of `split(load_dataset("digits"), 0).pool` (raw 0..16 values); per device its
  classes' samples, corrupted, split 50/50 (seeded) into local training samples and a held-out test
  set. Accuracy of the served model on the test set before and after `add_samples` + `train_now()`
  (the runtime keeps every 5th local sample as its own holdout and serves the run only if the holdout
  accuracy does not drop: "accepted"). "clean" = the same test samples uncorrupted.
""" + ("- **--quick run**: fewer rounds and repeats, the digits bank trained on a shorter schedule, E without "
       "the 10-epoch runs.\n" if res["quick"] else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edge_bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for edge.json/.md")
    p.add_argument("--quick", action="store_true", help="fewer repeats and rounds, a shorter digits bank "
                   "training schedule, E without the 10-epoch runs")
    p.add_argument("--work", type=Path, help="work folder kept between runs (banks and bundles are reused); "
                   "default: a temporary folder, removed")
    p.add_argument("--only", default="ABCDE", help="sections to run, e.g. AB")
    p.add_argument("--serving-copy-max-mb", type=float, help="the runtimes' serving_copy_max_mb (default: the "
                   "runtime's own, 16): models with at most this many MB of weights are served from an optimized copy")
    p.add_argument("--edge-venv", type=Path, default=DEFAULT_EDGE_VENV,
                   help="the edge-only virtualenv (created if missing)")
    p.add_argument("--ort-training-venv", type=Path, help="a throwaway virtualenv with onnxruntime-training-cpu"
                   "==1.19.2, onnx==1.16.2 and torch: D also times the training artifacts step (a baseline only)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, spec = args.child
        print(json.dumps(CHILDREN[mode](json.loads(Path(spec).read_text()))))
        return 0
    if args.serving_copy_max_mb is not None:
        os.environ[SERVING_COPY_ENV] = str(args.serving_copy_max_mb)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    global EDGE_VENV, EDGE_PY, ORT_TRAINING_PY
    EDGE_VENV, EDGE_PY = args.edge_venv.resolve(), args.edge_venv.resolve() / "bin" / "python"
    ORT_TRAINING_PY = args.ort_training_venv.resolve() / "bin" / "python" if args.ort_training_venv else None
    command = "python -m bench.edge_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"command": command, "quick": args.quick, "machine": machine_info()}
    res["edge_venv"] = ensure_edge_venv(say)
    say(f"edge venv {EDGE_VENV}: import torch -> {res['edge_venv']['import_torch']}")
    _quiet_ort()
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="eclm-edge-bench-")
        work = Path(tmp)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    failed = False
    try:
        prep = prepare(work, say, args.quick)
        res["timing"] = prep["timing"]
        res["bundles"] = {k: {"selection": _manifest(v)["selection"],
                              "trainable_parts": _manifest(v)["training"]["trainable_parts"]}
                          for k, v in prep["bundles"].items()}
        sections = [("A", "memory", bench_memory), ("B", "predict", bench_predict), ("C", "http", bench_http),
                    ("D", "training", bench_training), ("E", "adaptation", bench_adaptation)]
        for letter, key, fn in sections:
            if letter not in args.only.upper():
                continue
            t = time.perf_counter()
            try:
                res[key] = fn(prep, work, args.quick, say)
            except Exception as exc:  # noqa: BLE001 - reported in the tables, the run goes on
                failed = True
                text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")
                say(f"{letter} FAILED: {text}")
                res[key] = [{"bundle": "-", "device": "-", "error": text}]
            res["timing"][f"{key}_s"] = time.perf_counter() - t
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    res["load_avg_end"] = os.getloadavg()[0]
    doc = preface(res) + "\n" + goals(res) + "\n## Tables\n\n" + tables(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge.json").write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
    (args.out / "edge.md").write_text(doc, encoding="utf-8")
    print("\n" + tables(res) + "\n" + goals(res))
    print(f"wrote {args.out / 'edge.json'} and {args.out / 'edge.md'} in {res['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

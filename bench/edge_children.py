"""Code that runs in the edge venv's child processes of the edge benchmark (sections A, B, C, D).

Started as ``python -m bench.edge_bench --child MODE SPEC`` with the edge venv's python: everything
here imports nothing but numpy, ONNX Runtime and the runtime (``eclm``, ``edge_runtime``), never torch.
Each child takes the JSON spec its parent wrote and returns a JSON-able dict (printed by the parent).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.edge_common import edge_cfg, pcts, status_bytes, torch_importable


# ---------------------------------------------------------------- A: children
def child_edge_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv: EdgeService predicts, stores samples and fine-tunes once; peak RSS of the process."""
    rss_start = status_bytes("VmRSS")
    from edge_runtime.service import EdgeService

    rss_imports = status_bytes("VmRSS")
    from eclm.ort import load_onnxruntime

    load_onnxruntime()
    rss_ort = status_bytes("VmRSS")
    phases: dict[str, dict[str, int]] = {}

    def mark(name: str) -> None:
        phases[name] = {"rss_bytes": status_bytes("VmRSS"), "peak_bytes": status_bytes("VmHWM")}

    data = np.load(spec["data"])
    service = EdgeService(edge_cfg(Path(spec["bundle"]), Path(spec["state"]), epochs=spec["epochs"],
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
           "rss_after_ort_import_bytes": rss_ort, "peak_bytes": status_bytes("VmHWM"),
           "rss_end_bytes": status_bytes("VmRSS"), "predictions": len(preds), "training": result,
           "torch_in_sys_modules": "torch" in sys.modules, "torch_importable": torch_importable()}
    try:
        import torch  # noqa: F401
        out["import_torch"] = "succeeded"
    except ImportError as exc:
        out["import_torch"] = f"failed: {type(exc).__name__}: {exc}"
    service.close()
    return out


# ---------------------------------------------------------------- B: child
def child_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv: EdgeService.predict, ServingModel.predict and a bare session, interleaved rounds."""
    from eclm.ort import load_onnxruntime
    from edge_runtime.service import EdgeService

    ort = load_onnxruntime()
    service = EdgeService(edge_cfg(Path(spec["bundle"]), Path(spec["state"])))
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
    out: dict[str, Any] = {k: pcts(v) for k, v in times.items()}
    out["ratio_service_p50"] = out["service"]["p50_ms"] / out["bare"]["p50_ms"]
    out["ratio_serving_p50"] = out["serving"]["p50_ms"] / out["bare"]["p50_ms"]
    out["overhead_service_us"] = (out["service"]["p50_ms"] - out["bare"]["p50_ms"]) * 1e3
    out["max_abs_diff_probs"] = diff
    out["model_path"] = str(serving.model_path)
    out["torch_in_sys_modules"] = "torch" in sys.modules
    service.close()
    return out


def child_serve_nodelay(spec: dict[str, Any]) -> dict[str, Any]:
    """Edge venv, diagnostic for C: the runtime's own handler class, subclassed only to set TCP_NODELAY,
    configured and started as `eclm-edge serve` does it (with the environment the parent gives both).
    """
    import dataclasses

    from edge_runtime.config import EdgeConfig
    from edge_runtime.http_api import serve
    from edge_runtime.service import EdgeService

    off = spec["resources_off"] and "resource_interval_s" in {f.name for f in dataclasses.fields(EdgeConfig)}
    service = EdgeService(edge_cfg(Path(spec["bundle"]), Path(spec["state"]), monitors=True,
                                    **({"resource_interval_s": 0.0} if off else {})))
    server = serve(service, "127.0.0.1", spec["port"])  # its handler sets TCP_NODELAY
    for name in ("start_monitors", "start_scheduler"):
        if hasattr(service, name):
            getattr(service, name)()
            break
    server.serve_forever()  # ended by the parent's SIGTERM
    return {}


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
    service = EdgeService(edge_cfg(Path(spec["bundle"]), Path(spec["state"])))
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
    out: dict[str, Any] = {k: pcts(v, (50, 90)) for k, v in times.items()}
    # Paired per round (blocks of one round ran seconds apart): robust to the host's load drifting.
    out["paired_ratio"] = {"bare": float(np.median(np.array(block_p50["runtime"]) / np.array(block_p50["bare"])))}
    out["best_block_p50_ms"] = {k: min(v) for k, v in block_p50.items()}
    out.update(steps_timed={k: len(v) for k, v in times.items()}, rounds=spec["rounds"], block_p50_ms=block_p50,
               run_training_seconds_p50=float(np.median(run_seconds)),
               runtime_first_step_ms_p50=float(np.median(first_ms)), loss_last=losses,
               trainable_tensors=len(serving.manifest.training["trainable_params"]))
    return out

"""The sections of the edge benchmark, run in the cloud venv: each starts its children and returns its rows.

A ``bench_memory``, B ``bench_predict``, C ``bench_http``, D ``bench_training``, E ``bench_adaptation``;
each takes ``(prep, work, quick, say)``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import edge_setup as setup
from bench.edge_baselines import torch_spec
from bench.edge_common import DEVICES, ROOT, edge_cfg, pcts, read_manifest
from bench.edge_setup import run_child


# ---------------------------------------------------------------- A
def bench_memory(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    """resnet18-pi4 (the case the goal is about), then digits-pi4 (a tiny model: the import floor)."""
    rows = []
    n_pred, n_samples = (8, 48) if quick else (20, 96)
    for key, bank_key in (("resnet18-pi4", "resnet18"), ("digits-pi4", "digits")):
        bundle, bank = prep["bundles"][key], prep["banks"][bank_key]
        man = read_manifest(bundle)
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
        edge = run_child(setup.EDGE_PY, "edge-memory", {**common, "bundle": str(bundle), "state": str(state)}, work)
        say(f"A: {key}: PyTorch baseline, sub-model tensors only (subprocess)")
        torch_meta = run_child(sys.executable, "torch-memory",
                               {**common, **torch_spec(bundle, bank, work, "meta")}, work)
        say(f"A: {key}: PyTorch baseline, built from the bank like the exporter (subprocess)")
        torch_bank = run_child(sys.executable, "torch-memory",
                               {**common, **torch_spec(bundle, bank, work, "bank")}, work)
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
        rows.append({"bundle": key, "rounds": spec["rounds"], **run_child(setup.EDGE_PY, "predict", spec, work)})
    return rows


# ---------------------------------------------------------------- C


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_latency(cmd: list[str], port: int, bundle: Path, log_path: Path, n: int, warm: int) -> dict[str, Any]:
    """Start a server, wait for /healthz, then time POST /v1/predict against a bare session, interleaved."""
    import http.client

    from eclm.ort import load_onnxruntime

    ort = load_onnxruntime()
    man = read_manifest(bundle)
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
    hp, bp = pcts(http_ms), pcts(bare_ms)
    return {"requests": n, "startup_s": startup_s, "http": hp, "bare": bp,
            "overhead_p50_ms": hp["p50_ms"] - bp["p50_ms"], "request_bytes": len(body),
            "prediction": answer["predictions"][0], "variants_seen": sorted(variants)}


def bench_http(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    exe = setup.EDGE_VENV / "bin" / "eclm-edge"
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
                cmd = [str(setup.EDGE_PY), "-m", "bench.edge_bench", "--child", "serve-nodelay", str(spec_path)]
            res = _http_latency(cmd, port, bundle, work / f"serve-{key}-{len(rows)}.log", n, warm)
            rows.append({"bundle": key, "server": server, "command": " ".join(cmd[:2]), **res})
    return rows


# ---------------------------------------------------------------- D
def _train_data(bundle: Path, work: Path) -> tuple[Path, int, float]:
    man = read_manifest(bundle)
    bs, lr = int(man["training"]["batch_size"]), float(man["training"]["learning_rate"])
    lo, hi = man["input"]["range"]
    path = work / f"train-batch-{bundle.name}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.uniform(lo, hi, size=(bs, *man["input"]["shape"][1:])).astype(np.float32),
             y=(np.arange(bs) % len(man["labels"])).astype(np.int64))
    return path, bs, lr


def bench_training(prep: dict[str, Any], work: Path, quick: bool, say: Any) -> list[dict[str, Any]]:
    threads = 1  # the runtime trains on one intra-op thread; PyTorch gets the same
    rows = []
    for key in ("digits-pi4", "resnet18-pi4"):
        bundle = prep["bundles"][key]
        bank = prep["banks"]["digits" if key.startswith("digits") else "resnet18"]
        man = read_manifest(bundle)
        data, bs, lr = _train_data(bundle, work)
        small = key.startswith("digits")
        steps, rounds = (20, 10) if small else (6, 6)
        if quick:
            steps, rounds = (10, 5) if small else (4, 3)
        state = work / f"state-train-{key}"
        shutil.rmtree(state, ignore_errors=True)
        say(f"D: training step, {key}: runtime vs a bare session on the step graph (edge venv subprocess)")
        ort_res = run_child(setup.EDGE_PY, "train-ort",
                            {"bundle": str(bundle), "state": str(state), "work": str(work / f"train-{key}"),
                             "data": str(data), "learning_rate": lr, "steps_per_round": steps, "rounds": rounds}, work)
        say(f"D: training step, {key}: PyTorch, {threads} threads (subprocess)")
        torch_res = run_child(sys.executable, "train-torch",
                              {**torch_spec(bundle, bank, work, "meta"), "data": str(data), "learning_rate": lr,
                               "threads": threads, "steps": steps * (2 if quick else 3)}, work)
        artifacts = None
        if setup.ORT_TRAINING_PY is not None:
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
    assert setup.ORT_TRAINING_PY is not None
    spec = work / "artifacts-spec.json"
    spec.write_text(json.dumps({"bundle": str(bundle), "data": str(data), "learning_rate": lr, "steps": steps}))
    done = subprocess.run([str(setup.ORT_TRAINING_PY), str(Path(__file__).with_name("ort_artifacts.py")), str(spec)],
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
            service = EdgeService(edge_cfg(bundle, state, epochs=epochs))
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
                         "trainable_parts": len(read_manifest(bundle)["training"]["trainable_parts"])})
            service.close()
    return rows

"""Benchmark the exporter per device profile: sizes, export time, ONNX Runtime vs PyTorch latency and memory.

Run as ``python -m bench.export_bench [--out docs/benchmarks] [--profiles pi4,pi5] [--repeats 100]``.
Writes ``export.json`` and ``export.md`` to ``--out`` and prints the tables. The bank is the
``resnet18`` configuration at random initialisation: valid for sizes and speed, not for accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.reaper import run_main

CONFIG = "resnet18"
MiB = 2**20


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(), "loadavg_1m_at_end": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def torch_peak_child(work: Path) -> None:
    """In a fresh process: peak resident bytes of one batch-1 eager forward, over the post-import RSS."""
    import torch
    from safetensors.torch import load_file

    from exporter.config import ModelConfig
    from exporter.modular import ModularNet, SubModel
    from exporter.onnx_export import Normalised
    from exporter.probe import _peak_bytes, _rss_bytes

    spec = json.loads((work / "spec.json").read_text())
    cfg = ModelConfig.from_dict(spec["config"])
    torch.set_num_threads(1)
    base = _rss_bytes()
    with torch.device("meta"):  # no weights allocated until the real ones are assigned
        sub = Normalised(SubModel(ModularNet(cfg), spec["selection"]), spec["mean"], spec["std"])
    sub.load_state_dict(load_file(str(work / "state.safetensors")), strict=True, assign=True)
    sub.eval()
    with torch.inference_mode():
        sub(torch.rand((1, *cfg.input_shape)))
    print(json.dumps({"torch_eager_peak_bytes": max(0, _peak_bytes() - base), "baseline_bytes": base}))


def torch_peak(sub: Any, cfg: dict[str, Any], selection: list[list[int]],
               norm: dict[str, Any]) -> dict[str, int]:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_file({k: v.contiguous() for k, v in sub.state_dict().items()}, str(work / "state.safetensors"))
        spec = {"config": cfg, "selection": selection, "mean": norm["mean"], "std": norm["std"]}
        (work / "spec.json").write_text(json.dumps(spec))
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run([sys.executable, "-m", "bench.export_bench", "--torch-peak-child", str(work)],
                             capture_output=True, text=True, env=env, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"torch peak subprocess failed: {out.stderr.strip()[-1000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(sub: Any, onnx_path: Path, x: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    """Batch-1 latency of PyTorch eager and ONNX Runtime on ``x``, in interleaved rounds."""
    import torch

    from eclm.ort import load_onnxruntime

    ort = load_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    runs = {"torch": lambda: sub(xt), "ort": lambda: sess.run(None, {name: x})}
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    try:
        with torch.inference_mode():
            diff = float(np.abs(sub(xt).numpy() - sess.run(None, {name: x})[0]).max())
            for _ in range(max(5, repeats // 10)):  # warm-up
                runs["torch"]()
                runs["ort"]()
            for i in range(repeats):
                for key in ("torch", "ort") if i % 2 == 0 else ("ort", "torch"):
                    t = time.perf_counter()
                    runs[key]()
                    times[key].append((time.perf_counter() - t) * 1e3)
    finally:
        torch.set_num_threads(before)
    res: dict[str, float] = {"max_abs_diff": diff}
    for key, ts in times.items():
        res[f"{key}_p50_ms"], res[f"{key}_p90_ms"] = (float(v) for v in np.percentile(ts, [50, 90]))
    res["ratio_p50"] = res["ort_p50_ms"] / res["torch_p50_ms"]
    res["ratio_p90"] = res["ort_p90_ms"] / res["torch_p90_ms"]
    return res


def bench_profile(name: str, bank: Path, imp: Path, out: Path, full: Any, repeats: int,
                  say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from device_profiles import load_profile
    from exporter.export import ExportRequest, export_bundle
    from exporter.modular import SubModel, count_params
    from exporter.onnx_export import Normalised
    from module_bank import DirectoryBank

    profile = load_profile(name)
    t = time.perf_counter()
    man = export_bundle(ExportRequest(bank_dir=bank, profile=name, out_dir=out / name, importance_file=imp),
                        step=lambda m: say(f"  {name}: {m}"))
    export_s = time.perf_counter() - t
    info = DirectoryBank(bank).info()
    norm = info.normalisation
    sub = Normalised(SubModel(full, man.selection), norm["mean"], norm["std"]).eval()
    lo, hi = man.input["range"]
    x = np.random.default_rng(0).uniform(lo, hi, size=(1, *full.cfg.input_shape)).astype(np.float32)
    say(f"  {name}: timing PyTorch vs ONNX Runtime")
    lat = {f"{n}t": latency(sub, out / name / "model.onnx", x, n, repeats) for n in (1, 2)}
    say(f"  {name}: PyTorch eager peak memory (subprocess)")
    tpk = torch_peak(sub, info.config, man.selection, norm)
    est = man.costs["estimated"]
    return {
        "profile": name, "selection": man.selection, "modules_per_layer": [len(s) for s in man.selection],
        "params": count_params(sub), "flops": est["flops"], "estimated": est, "budgets": man.costs["budgets"],
        "board_latency_ms_estimated": est["flops"] / (profile.sustained_gflops * 1e9) * 1e3,
        "latency_target_ms": profile.latency_target_ms, "measured": man.costs.get("measured", {}),
        "within_budget": man.costs.get("within_budget", {}), "training_available": man.training["available"],
        "trainable_parts": len(man.training["trainable_parts"]), "torch_eager": tpk,
        "memory_budget_bytes": profile.memory_budget_bytes, "export_s": export_s, "latency": lat,
        "torch_threads_default": torch.get_num_threads(),
    }


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / MiB:.1f}"


def tables(rows: list[dict[str, Any]]) -> str:
    """Two markdown tables: sizes, memory and budgets; then host latency."""
    a = ["| profile | modules/layer | params | MFLOPs | board ms est. (target) | ORT infer peak MiB (budget) "
         "| torch eager peak MiB | ORT train peak MiB | export s | over budget |",
         "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    b = ["| profile | ORT p50 / p90 ms | torch p50 / p90 ms | ratio ORT/torch p50 (p90) "
         "| 2 threads: ORT / torch p50 ms, ratio | max abs diff |", "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            a.append(f"| {r['profile']} | error: {r['error']} |" + " |" * 8)
            b.append(f"| {r['profile']} | error (see above) |" + " |" * 4)
            continue
        m, over = r["measured"], [k for k, v in r["within_budget"].items() if not v["ok"]]
        train = _mib(m.get("training_memory_bytes")) + ("" if r["training_available"] else " (no training)")
        sel = "/".join(map(str, r["modules_per_layer"]))
        a.append(f"| {r['profile']} | {sel} | {r['params'] / 1e6:.2f} M | {r['flops'] / 1e6:.0f} "
                 f"| {r['board_latency_ms_estimated']:.0f} ({r['latency_target_ms']:.0f}) "
                 f"| {_mib(m.get('inference_memory_bytes'))} ({_mib(r['memory_budget_bytes'])}) "
                 f"| {_mib(r['torch_eager']['torch_eager_peak_bytes'])} | {train} | {r['export_s']:.1f} "
                 f"| {', '.join(over) or 'none'} |")
        one, two = r["latency"]["1t"], r["latency"]["2t"]
        b.append(f"| {r['profile']} | {one['ort_p50_ms']:.2f} / {one['ort_p90_ms']:.2f} "
                 f"| {one['torch_p50_ms']:.2f} / {one['torch_p90_ms']:.2f} "
                 f"| {one['ratio_p50']:.2f} ({one['ratio_p90']:.2f}) | {two['ort_p50_ms']:.2f} / "
                 f"{two['torch_p50_ms']:.2f}, {two['ratio_p50']:.2f} | {one['max_abs_diff']:.1e} |")
    return "\n".join(a) + "\n\n" + "\n".join(b) + "\n"


def preface(info: dict[str, Any], command: str, full: dict[str, int], repeats: int) -> str:
    return f"""# Export benchmark: `{CONFIG}` sub-models per device profile

Measured on {info['cpu']} ({info['cores']} logical cores), Python {info['python']}, torch {info['torch']},
onnxruntime {info['onnxruntime']}, {info['date']}; 1-min load average {info['loadavg_1m_at_start']:.1f} at
the start and {info['loadavg_1m_at_end']:.1f} at the end (other work on the host inflates the latencies).
Command: `{command}`.

- Model: the `{CONFIG}` configuration (4 module layers x 16 modules, 3x32x32 input) at **random
  initialisation** on synthetic data: figures are for sizing and speed, not accuracy. Full modular
  model: {full['params'] / 1e6:.2f} M parameters, {full['flops'] / 1e6:.0f} MFLOPs per batch-1 forward with every
  module run (the cloud model's sparse execution runs only routed modules; sub-models run all theirs).
- Importance: a uniform importance file (every module 1.0) is passed to the exporter, since a randomly
  initialised selector would route all inputs to the same two modules per layer and budgets would not
  bind; the knapsack then picks modules by budget alone.
- **Board latency is an estimate** (sub-model FLOPs / the profile's `sustained_gflops`); all other
  latencies are **measured on this host**, batch 1, p50/p90 over {repeats} interleaved rounds after
  warm-up, PyTorch eager (`Normalised(SubModel)`, eval, `inference_mode`) vs an ONNX Runtime session on
  the bundle's `model.onnx`, same input, both pinned to 1 thread (and again to 2 threads).
- Memory: ORT peaks are the bundle manifest's `costs.measured` (torch-free subprocess, VmHWM minus RSS
  after importing onnxruntime); torch eager peak is VmHWM minus RSS after importing torch and the model
  code, in a fresh subprocess with one batch-1 forward. Export time is the wall clock of `export_bundle`
  (ONNX export of the model, its selector and smaller variants, checks, the training step graph and its check, and both
  measurement subprocesses).
- "over budget" lists the manifest's `within_budget` checks that failed.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export_bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for export.json/.md")
    p.add_argument("--profiles", default="", help="comma-separated profiles; empty: all registered")
    p.add_argument("--repeats", type=int, default=100, help="timed rounds per runtime and thread count")
    p.add_argument("--torch-peak-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_peak_child:
        torch_peak_child(args.torch_peak_child)
        return 0
    from tqdm import tqdm

    from device_profiles import available_profiles
    from exporter.cloud import random_bank
    from exporter.costs import part_costs
    from exporter.importance import write_importance_file
    from exporter.modular import count_params
    from exporter.torchio import model_from_bank
    from module_bank import DirectoryBank

    names = [n for n in args.profiles.split(",") if n] or available_profiles()
    command = "python -m bench.export_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="eclm-bench-") as tmp:
        bank, imp, bundles = Path(tmp) / "bank", Path(tmp) / "importance.json", Path(tmp) / "bundles"
        print(f"writing a random {CONFIG} bank to {bank}")
        random_bank(CONFIG, bank, seed=0)
        full = model_from_bank(DirectoryBank(bank))
        write_importance_file(imp, [np.ones(ls.num_modules) for ls in full.cfg.layers], samples=0)
        full_cost = {"params": count_params(full), "flops": sum(c.flops for c in part_costs(full).values())}
        for name in (bar := tqdm(names, desc="profiles", unit="profile")):
            bar.set_postfix_str(name)
            try:
                rows.append(bench_profile(name, bank, imp, bundles, full, args.repeats, tqdm.write))
            except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
                text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")
                rows.append({"profile": name, "error": text})
                tqdm.write(f"  {name}: FAILED {rows[-1]['error']}")
    info = {**machine_info(), "loadavg_1m_at_start": load_start}
    doc = preface(info, command, full_cost, args.repeats) + "\n" + tables(rows)
    if ok := [r for r in rows if "error" not in r]:
        doc += (f"\nProcess baselines these peaks sit on (RSS after the imports): ONNX Runtime "
                f"{_mib(max(r['measured']['baseline_bytes'] for r in ok))} MiB, PyTorch "
                f"{_mib(max(r['torch_eager']['baseline_bytes'] for r in ok))} MiB.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command, "config": CONFIG, "repeats": args.repeats,
               "full_model": full_cost, "profiles": rows}
    (args.out / "export.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (args.out / "export.md").write_text(doc, encoding="utf-8")
    print("\n" + tables(rows))
    print(f"wrote {args.out / 'export.json'} and {args.out / 'export.md'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    run_main(main)

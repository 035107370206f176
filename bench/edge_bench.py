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

This module is the entry point (options, orchestration, child dispatch). The parts: ``edge_common``
(constants, helpers safe in every process), ``edge_setup`` (edge venv, banks, bundles, ``run_child``),
``edge_sections`` (A-E), ``edge_children`` (edge-venv children), ``edge_baselines`` (PyTorch),
``edge_report`` (edge.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import edge_setup as setup
from bench.edge_baselines import child_torch_memory, child_train_torch
from bench.edge_children import child_edge_memory, child_predict, child_serve_nodelay, child_train_ort
from bench.edge_common import SERVING_COPY_ENV, quiet_ort, read_manifest
from bench.edge_report import goals, preface, tables
from bench.edge_sections import bench_adaptation, bench_http, bench_memory, bench_predict, bench_training
from bench.edge_setup import ensure_edge_venv, machine_info, prepare
from bench.reaper import run_main

CHILDREN = {"edge-memory": child_edge_memory, "torch-memory": child_torch_memory, "predict": child_predict,
            "serve-nodelay": child_serve_nodelay, "train-ort": child_train_ort, "train-torch": child_train_torch}


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
    p.add_argument("--edge-venv", type=Path, default=setup.DEFAULT_EDGE_VENV,
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

    setup.configure(args.edge_venv, args.ort_training_venv)
    command = "python -m bench.edge_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"command": command, "quick": args.quick, "machine": machine_info()}
    res["edge_venv"] = ensure_edge_venv(say)
    say(f"edge venv {setup.EDGE_VENV}: import torch -> {res['edge_venv']['import_torch']}")
    quiet_ort()
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
        res["bundles"] = {k: {"selection": read_manifest(v)["selection"],
                              "trainable_parts": read_manifest(v)["training"]["trainable_parts"]}
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
    run_main(main)

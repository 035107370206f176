"""The edge benchmark's report: the markdown preface, goals and tables of ``edge.md`` from the results."""

from __future__ import annotations

from typing import Any

from bench.edge_common import CORRUPTIONS, PROFILE, MiB


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

"""Benchmark suites behind `eclm bench`: continuous adaptation (``adapt``) and the paper's protocol (``paper``).

Each writes ``<suite>.json``, ``<suite>.md`` and PNG plots to the output folder.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.arms_edge import EclmArm, LocalArm
from bench.arms_torch import CloudArm, FedAvgArm, HeteroFLArm
from bench.common import machine_info, md_table, pyplot, write_results
from bench.fleet import FleetConfig, Pool, Shift, make_fleet, run

Say = Callable[[str], None]

# METHOD.md section 5, Table 1 (the paper's numbers on its data; ours are measured on the data set run).
PAPER_TABLE = {
    "CIFAR-10 m=2, ResNet18": {"none": 73.55, "local": 84.19, "fedavg": 73.68, "heterofl": 70.19, "eclm": 90.86},
    "CIFAR-10 m=5": {"none": 73.55, "local": 73.56, "fedavg": 76.12, "heterofl": 77.32, "eclm": 85.76},
}
SHIFTED_CLASSES = (0, 5, 6, 8)
ARM_NAMES = {"none": "no adaptation", "local": "local only (LA)", "fedavg": "FedAvg", "heterofl": "HeteroFL",
             "eclm": "ECLM"}


def _bank(work: Path, seed: int, say: Say, dataset: str = "digits") -> Path:
    from exporter.cloud import TrainOptions, train_bank

    bank = work / f"bank-{seed}"
    if not (bank / "bank.json").exists():
        say(f"training the cloud model on {dataset} (seed {seed})")
        train_bank(TrainOptions(dataset=dataset, bank_dir=bank, seed=seed))
    return bank


def _pool(seed: int, dataset: str = "digits") -> Pool:
    from exporter.data import load_dataset, split

    pool = split(load_dataset(dataset), seed).pool
    return Pool(pool.x, pool.y, seed)


# Ablations of the ECLM arm (issue 14): merger flags that switch one mechanism off or change it.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "no-gate": ("--no-gate",),  # merges are not judged on the cloud's clean validation split
    "robust-merge": ("--strategy", "robust", "--min-devices", "2"),  # the product's defaults, not the paper's mean
    "any-staleness": ("--max-staleness", "1000"),  # deltas trained from old versions are merged, not rejected
}


def ablation_args(name: str) -> tuple[str, ...]:
    from eclm.errors import ConfigError

    if name and name not in ABLATIONS:
        raise ConfigError(f"unknown ablation {name!r}", hint=f"use one of {', '.join(ABLATIONS)}")
    return ABLATIONS.get(name, ())


def _run_arms(names: list[str], bank: Path, work: Path, cfg: FleetConfig, say: Say,
              dataset: str = "digits", eclm_args: tuple[str, ...] = ()) -> dict[str, Any]:
    pool = _pool(cfg.seed, dataset)
    devices = make_fleet(cfg, pool.num_classes)
    arms: list[Any] = []
    try:
        for name in names:
            if name == "none":
                arms.append(CloudArm(bank))
            elif name == "fedavg":
                arms.append(FedAvgArm(bank, cfg.seed))
            elif name == "heterofl":
                arms.append(HeteroFLArm(bank, cfg.seed))
            elif name == "local":
                arms.append(LocalArm(bank, work, devices))
            elif name == "eclm":
                arms.append(EclmArm(bank, work, devices, eclm_args))
        return run(arms, cfg, pool, devices,
                   lambda step, accs: say(f"  step {step + 1}/{cfg.steps}: " +
                                          ", ".join(f"{k} {v:.3f}" for k, v in accs.items())))
    finally:
        for a in arms:
            a.close()


def recovery(history: list[dict[str, Any]], arm: str, tolerance: float = 0.02, window: int = 3) -> list[int | None]:
    """Steps from each shift until the shifted devices are back within ``tolerance`` of their level before
    it (mean of up to ``window`` earlier steps they took part in); None if they never are.
    """
    out: list[int | None] = []
    for row in history:
        for dev in row["shifted"]:
            before = [h[arm][dev] for h in history if h["step"] < row["step"] and dev in h[arm]][-window:]
            if not before:
                continue
            level = float(np.mean(before)) - tolerance
            after = [(h["step"] - row["step"], h[arm][dev]) for h in history if h["step"] >= row["step"]
                     and dev in h[arm]]
            out.append(next((d for d, a in after if a >= level), None))
    return out


def command_line(suite: str, quick: bool, dataset: str, seeds: int | None = None, ablation: str = "") -> str:
    """The `eclm bench` command that reproduces a run: every option that changes the result, defaults too."""
    import shlex

    return " ".join(["eclm bench --suite", suite, *(["--quick"] if quick else []),
                     *(["--seeds", str(seeds)] if seeds is not None else []), "--dataset", shlex.quote(dataset),
                     *(["--ablation", ablation] if ablation else [])])


def _corruptions(dataset: str) -> tuple[str, ...]:
    from bench.corruptions import kinds_for
    from exporter.data import load_dataset

    return kinds_for(load_dataset(dataset).input_shape)


def adapt_suite(out: Path, quick: bool, say: Say, dataset: str = "digits", ablation: str = "") -> dict[str, Any]:
    """20 adaptation steps of 6 devices with scheduled shifts: no adaptation, local only, ECLM."""
    from bench.corruptions import ADAPT_SHIFTS, family
    from exporter.data import load_dataset

    geometric, noise = ADAPT_SHIFTS[family(load_dataset(dataset).input_shape)]
    work = Path(tempfile.mkdtemp(prefix="eclm-adapt-"))
    t0 = time.time()
    try:
        bank = _bank(work, 0, say, dataset)
        steps = 8 if quick else 20
        s = steps // 4
        cfg = FleetConfig(devices=6, per_round=6, classes_per_device=3, steps=steps, corruptions=("none",),
                          test_samples=100, seed=0, shifts=(
                              Shift(s, (0, 1), corruption=geometric),
                              Shift(2 * s, (2, 3), classes=SHIFTED_CLASSES),
                              Shift(3 * s, (4, 5), corruption=noise)))
        res = _run_arms(["none", "local", "eclm"], bank, work, cfg, say, dataset, ablation_args(ablation))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acc = res["accuracy_per_step"]
    rec = {arm: recovery(res["history"], arm) for arm in acc}
    secs = {arm: float(np.mean(res["seconds"][arm])) for arm in acc}
    summary = {arm: {"mean_accuracy": float(np.nanmean(v)), "recovery_steps": rec[arm],
                     "mean_recovery_steps": float(np.mean([r for r in rec[arm] if r is not None]))
                     if any(r is not None for r in rec[arm]) else None,
                     "never_recovered": sum(r is None for r in rec[arm]),
                     "seconds_per_step": secs[arm]} for arm, v in acc.items()}
    results = {"machine": machine_info(), "quick": quick, "dataset": dataset, "ablation": ablation,
               "config": _cfg_dict(cfg),
               "summary": summary, "accuracy_per_step": acc, "seconds": time.time() - t0,
               "failed_devices": res["failed_devices"]}
    plot = _plot_steps(acc, out / "adapt_accuracy.png", [sh.step for sh in cfg.shifts],
                       "Continuous adaptation: mean accuracy of the fleet per step")
    write_results(out, "adapt", results, _adapt_md(results, plot))
    return results


def _adapt_md(results: dict[str, Any], plot: Path) -> str:
    summary, c = results["summary"], results["config"]
    shifts = {(sh["corruption"] or "classes"): sh["step"] for sh in c["shifts"]}
    geometric, noise = (sh["corruption"] for sh in c["shifts"] if sh["corruption"])
    rows = [[ARM_NAMES[a], s["mean_accuracy"], s["mean_recovery_steps"] if s["mean_recovery_steps"] is not None
             else "-", s["never_recovered"], s["seconds_per_step"]] for a, s in summary.items()]
    ablated = f" (ECLM ablation: {results['ablation']})" if results.get("ablation") else ""
    return f"""# Continuous adaptation on {results['dataset']}: {c['steps']} steps with shifts{ablated}

Command: `{command_line("adapt", results["quick"], results["dataset"], ablation=results.get("ablation", ""))}`;
{results['machine']['cpu']},
{results['machine']['cores']} cores, {results['machine']['date']}; run time {results['seconds']:.0f} s.

Six devices (3 classes each, 50-150 samples of {results['dataset']}) adapt every step; half of each
device's samples is replaced by fresh ones each step. Shifts: at step {shifts[geometric] + 1} devices 0
and 1 see the corruption "{geometric}", at step {shifts['classes'] + 1} devices 2 and 3 see another
class mix ({', '.join(map(str, SHIFTED_CLASSES))}), at step {shifts[noise] + 1} devices 4 and 5 see
"{noise}" (docs/data.md). Accuracy is measured after each step on fresh held-out samples of each
device's current environment, never ones a device trains on. Recovery: steps from a shift until the
shifted device is back within 2 points of its level before the shift (0: it already is right after
adapting in the shift's step).

{md_table(["arm", "accuracy averaged over the steps", "mean steps to recover", "never recovered",
           "seconds per step"], rows)}
{_failed_md({"": results["failed_devices"]})}
![accuracy per step]({plot.name})
"""


def paper_suite(out: Path, quick: bool, seeds: int, say: Say, dataset: str = "digits") -> dict[str, Any]:
    """METHOD.md section 5 on ``dataset``: m = 2 and m = 5, all arms, accuracy over steps and bytes."""
    t0 = time.time()
    arms = ["none", "local", "fedavg", "heterofl", "eclm"]
    base = FleetConfig(devices=20, per_round=5, steps=3, seed=0) if quick else FleetConfig()
    base = replace(base, corruptions=_corruptions(dataset))
    settings = {"m=2": replace(base, classes_per_device=2), "m=5": replace(base, classes_per_device=5)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in settings}
    work = Path(tempfile.mkdtemp(prefix="eclm-paper-"))
    try:
        from bench.train_cost import measure

        say("measuring edge training against full-model training")
        resources = measure(_bank(work, 0, say, dataset), work)
        for seed in range(seeds):
            bank = _bank(work, seed, say, dataset)
            for name, cfg in settings.items():
                say(f"setting {name}, seed {seed}")
                runs[name].append(_run_arms(arms, bank, work / f"{name}-{seed}", replace(cfg, seed=seed), say,
                                            dataset))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {}
        for arm in arms:
            first = [r["accuracy_per_step"][arm][0] for r in rs]
            avg = [float(np.nanmean(r["accuracy_per_step"][arm])) for r in rs]
            up = [float(np.mean([b["uplink"] for b in r["bytes"][arm]])) for r in rs]
            down = [float(np.mean([b["downlink"] for b in r["bytes"][arm]])) for r in rs]
            secs = [float(np.mean(r["seconds"][arm])) for r in rs]
            summary[name][arm] = {"after_one_step": (float(np.mean(first)), float(np.std(first))),
                                  "averaged": (float(np.mean(avg)), float(np.std(avg))),
                                  "uplink_bytes": float(np.mean(up)), "downlink_bytes": float(np.mean(down)),
                                  "seconds_per_step": float(np.mean(secs))}
    failed = {f"{k}, seed {seed}": r["failed_devices"] for k, rs in runs.items() for seed, r in enumerate(rs)
              if r["failed_devices"]}
    results = {"machine": machine_info(), "quick": quick, "seeds": seeds, "config": _cfg_dict(base),
               "dataset": dataset, "failed_devices": failed,
               "summary": summary, "seconds": time.time() - t0, "resources": resources,
               "accuracy_per_step": {k: [r["accuracy_per_step"] for r in rs] for k, rs in runs.items()}}
    plots = [_plot_steps({a: list(np.mean([r["accuracy_per_step"][a] for r in rs], axis=0)) for a in arms},
                         out / f"paper_accuracy_{k.replace('=', '')}.png", [], f"Accuracy per step, {k}")
             for k, rs in runs.items()]
    bytes_plot = _plot_bytes(summary, out / "paper_bytes.png")
    write_results(out, "paper", results, _paper_md(results, plots, bytes_plot, quick))
    return results


def _paper_md(results: dict[str, Any], plots: list[Path], bytes_plot: Path, quick: bool) -> str:
    s = results["summary"]
    arms = ["none", "local", "fedavg", "heterofl", "eclm"]

    def cell(v: tuple[float, float]) -> str:
        return f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}"

    data = results.get("dataset", "digits")
    table1 = [[f"{data} {k}, modular CNN (ours, after one step)"] + [cell(s[k][a]["after_one_step"]) for a in arms]
              for k in s]
    table1 += [[f"{data} {k} (ours, averaged over the steps)"] + [cell(s[k][a]["averaged"]) for a in arms] for k in s]
    table1 += [[f"{k} (paper)"] + [f"{v[a]:.2f}" for a in arms] for k, v in PAPER_TABLE.items()]
    comm = []
    for k in s:
        fed = s[k]["fedavg"]["uplink_bytes"]
        for a in arms:
            up = s[k][a]["uplink_bytes"]
            comm.append([k, ARM_NAMES[a], f"{up:,.0f}", f"{s[k][a]['downlink_bytes']:,.0f}",
                         f"{fed / up:.1f}x" if up else "-", f"{s[k][a]['seconds_per_step']:.1f}"])
    c = results["config"]
    best = {k: max(arms, key=lambda a: s[k][a]["averaged"][0]) for k in s}
    r = results.get("resources") or {}
    ratios = [s[k]["fedavg"]["uplink_bytes"] / s[k]["eclm"]["uplink_bytes"] for k in s if s[k]["eclm"]["uplink_bytes"]]
    goals = [
        f"- ECLM best in every setting (averaged over the steps): "
        f"{'met' if all(v == 'eclm' for v in best.values()) else '**not met**'} "
        f"({', '.join(f'{k}: best {ARM_NAMES[v]}' for k, v in best.items())}).",
        f"- Communication at least 10x below FedAvg: {'met' if ratios and min(ratios) >= 10 else '**not met**'} "
        f"({', '.join(f'{x:.1f}x' for x in ratios)}).",
    ]
    if r:
        goals.append(
            f"- Edge training memory at least 5x below full-model training: "
            f"{'met' if r['memory_ratio'] >= 5 else '**not met**'} ({r['memory_ratio']:.1f}x: "
            f"{r['edge_training_memory_bytes'] / 2**20:.1f} MiB for the pi4 sub-model's training step with "
            f"ONNX Runtime, {r['full_training_memory_bytes'] / 2**20:.1f} MiB for the whole model with PyTorch; "
            f"time per batch {r['edge_step_ms']:.1f} ms vs {r['full_step_ms']:.1f} ms, "
            f"{r['latency_ratio']:.1f}x).")
    return f"""# The paper's protocol on {data}

Command: `{command_line("paper", quick, data, results["seeds"])}`; {results['machine']['cpu']},
{results['machine']['cores']} cores, {results['machine']['date']}; run time {results['seconds']:.0f} s;
{results['seeds']} seeds (mean ± standard deviation over seeds).

Protocol (METHOD.md section 5 on the data we have): {c['devices']} devices, {c['per_round']} per round,
50-150 samples each of m classes from the devices' 70% of the data, a per-device corruption
({', '.join(c['corruptions'])}: docs/data.md), half of each device's samples replaced at every step,
{c['steps']} steps. Accuracy is that of the devices of the round after adapting, on fresh samples of
their environment from a held-out 30% of the devices' data that no device ever trains on. The
paper's figures are on CIFAR-10 with ResNet18, shown for shape only.

{md_table(["setting", *[ARM_NAMES[a] for a in arms]], table1)}

## Goals
{chr(10).join(goals)}

{_failed_md(results.get("failed_devices") or {})}
## Communication and time per round (per participating device)
{md_table(["setting", "arm", "uplink bytes", "downlink bytes", "FedAvg uplink / this", "seconds per step"], comm)}

{chr(10).join(f'![{p.stem}]({p.name})' for p in plots)}
![bytes per round]({bytes_plot.name})
"""


def _failed_md(failed: dict[str, dict[str, list[str]]]) -> str:
    """The devices a run left out (their bundle could not be made or served), so a reader sees them."""
    lines = [f"- {where + ': ' if where else ''}{arm}: {reason}" for where, arms in failed.items()
             for arm, reasons in arms.items() for reason in reasons]
    if not lines:
        return ""
    return "\n## Devices left out (the run went on without them)\n" + "\n".join(lines) + "\n"


def _cfg_dict(cfg: FleetConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _plot_steps(acc: dict[str, list[float]], path: Path, shifts: list[int], title: str) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for arm, values in acc.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=ARM_NAMES.get(arm, arm))
    for s in shifts:
        ax.axvline(s + 1, color="grey", linestyle=":")
    ax.set_xlabel("adaptation step" + (" (dotted: shifts)" if shifts else ""))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_bytes(summary: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    arms = ["fedavg", "heterofl", "eclm"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.35
    for j, (k, s) in enumerate(summary.items()):
        ax.bar(np.arange(len(arms)) + j * width, [s[a]["uplink_bytes"] / 1024 for a in arms], width, label=k)
    ax.set_xticks(np.arange(len(arms)) + width / 2, [ARM_NAMES[a] for a in arms])
    ax.set_ylabel("uplink KiB per device per round")
    ax.set_title("Bytes per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_resources(out: Path, say: Say) -> None:
    """Measure the training-cost figures and re-render ``paper.md`` from ``paper.json`` with them."""
    import json

    from bench.train_cost import measure

    path = out / "paper.json"
    results = json.loads(path.read_text())
    work = Path(tempfile.mkdtemp(prefix="eclm-cost-"))
    try:
        results["resources"] = measure(_bank(work, 0, say, results.get("dataset", "digits")), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plots = sorted(out.glob("paper_accuracy_*.png"))
    write_results(out, "paper", results, _paper_md(results, plots, out / "paper_bytes.png", results["quick"]))

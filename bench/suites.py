"""What the benchmark suites behind `eclm bench` share: the cloud bank, the arms run over a fleet, the
ECLM arm's ablations, the few-shot regime, the command that reproduces a run, and plots.

The suites are bench/adapt_suite.py (continuous adaptation, ``adapt``) and bench/paper_suite.py (the paper's
protocol, ``paper``); their statistics are in bench/stats.py. Each writes ``<suite>.json``, ``<suite>.md``
and PNG plots to the output folder.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.arms_edge import EclmArm, EclmOptions, LocalArm
from bench.arms_torch import CloudArm, FedAvgArm, HeteroFLArm
from bench.common import pyplot
from bench.fleet import FleetConfig, Pool, make_fleet, run

Say = Callable[[str], None]

SHIFTED_CLASSES = (0, 5, 6, 8)
ARM_NAMES = {"none": "no adaptation", "local": "local only (LA)", "fedavg": "FedAvg", "heterofl": "HeteroFL",
             "eclm": "ECLM"}
FEW_SHOT_SAMPLES = (10, 30)  # labelled samples a device holds in the few-shot regime (--few-shot)


def few_shot(cfg: FleetConfig, on: bool) -> FleetConfig:
    """The fleet's config in the few-shot regime (10-30 labelled samples per device) if ``on``."""
    return replace(cfg, min_samples=FEW_SHOT_SAMPLES[0], max_samples=FEW_SHOT_SAMPLES[1]) if on else cfg


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


@dataclass(frozen=True)
class Ablation:
    """One mechanism of the ECLM arm changed: the merger daemon's flags and the arm's options."""

    what: str
    daemon_args: tuple[str, ...] = ()
    options: EclmOptions = field(default_factory=EclmOptions)


NO_ABLATION = Ablation("none: the system as it is")
# Ablations of the ECLM arm (issue 14). Daemon flags come after the arm's own and win.
ABLATIONS: dict[str, Ablation] = {
    "no-gate": Ablation("merges not judged on the cloud's clean validation split", ("--no-gate",)),
    "robust-merge": Ablation("the product's robust strategy and --min-devices 2 instead of the paper's weighted mean",
                             ("--strategy", "robust", "--min-devices", "2")),
    "any-staleness": Ablation("deltas trained from old versions merged, not rejected", ("--max-staleness", "1000")),
    "no-lines": Ablation("every environment merged into the one shared line", ("--no-environments",)),
    "equal-weights": Ablation("every delta weighs the same in a merge", ("--weighting", "equal")),
    "samples-weights": Ablation("deltas weighted by samples only, not importance x samples",
                                ("--weighting", "samples")),
    "no-merge": Ablation("the daemon never merges (the arm never asks it for a round): devices only ever have "
                         "what they trained themselves", (), EclmOptions(merges=False)),
    "downlink-next-round": Ablation("devices leave once their deltas are acknowledged and get the module "
                                    "updates when they next connect", (), EclmOptions(downlink_same_round=False)),
    "no-rederive": Ablation("no bundle is re-derived because a device's importance moved (a device can still ask)",
                            ("--derive-threshold", "inf")),
    "refine-updates": Ablation("devices fine-tune each module update on their samples before judging it "
                               "(edge --refine-updates; one more training run per update)", (),
                               EclmOptions(refine_updates=True)),
    "fp16-updates": Ablation("module updates sent to devices as fp16 (half the downlink bytes) instead of fp32",
                             ("--update-codec", "fp16+zlib")),
    "solo-environments": Ablation("each device's line is its own name: no two devices share a line",
                                  (), EclmOptions(solo_environments=True)),
}


def ablation(name: str) -> Ablation:
    """The named ablation ("" : none); an unknown name is a ConfigError."""
    from eclm.errors import ConfigError

    if not name:
        return NO_ABLATION
    if name not in ABLATIONS:
        raise ConfigError(f"unknown ablation {name!r}", hint=f"use one of {', '.join(ABLATIONS)}")
    return ABLATIONS[name]


def ablation_args(name: str) -> tuple[str, ...]:
    """The merger daemon's flags of an ablation."""
    return ablation(name).daemon_args


def _run_arms(names: list[str], bank: Path, work: Path, cfg: FleetConfig, say: Say,
              dataset: str = "digits", ablated: Ablation = NO_ABLATION) -> dict[str, Any]:
    """Every arm of ``names`` over one fleet; the result of bench/fleet.py ``run`` plus ``lines``: whether the
    edge runtime had environment lines (None if the ECLM arm did not run).
    """
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
                arms.append(EclmArm(bank, work, devices, ablated.daemon_args, ablated.options))
        res = run(arms, cfg, pool, devices,
                  lambda step, accs: say(f"  step {step + 1}/{cfg.steps}: " +
                                         ", ".join(f"{k} {v:.3f}" for k, v in accs.items())))
        res["lines"] = next((a.lines for a in arms if isinstance(a, EclmArm)), None)
        return res
    finally:
        for a in arms:
            a.close()


def suite_seeds(quick: bool, seeds: int | None) -> int:
    """The paper and adapt suites' number of seeds: as asked, else 3 (1 with --quick); never reduced."""
    if seeds is not None:
        return seeds
    return 1 if quick else 3


def command_line(suite: str, quick: bool, dataset: str, seeds: int | None = None, ablation: str = "",
                 few_shot: bool = False) -> str:
    """The `eclm bench` command that reproduces a run: every option that changes the result, defaults too."""
    return " ".join(["eclm bench --suite", suite, *(["--quick"] if quick else []),
                     *(["--seeds", str(seeds)] if seeds is not None else []), "--dataset", shlex.quote(dataset),
                     *(["--few-shot"] if few_shot else []),
                     *(["--ablation", shlex.quote(ablation)] if ablation else [])])


def lines_note(lines: bool | None) -> str:
    """A sentence for reports whose ECLM arm ran on a runtime without environment lines."""
    if lines is False:
        return ("\n**The edge runtime had no environment lines (EdgeService.set_environment): every device "
                "used the shared line, whatever the environment labels.**\n")
    return ""


def _corruptions(dataset: str) -> tuple[str, ...]:
    from bench.corruptions import kinds_for
    from exporter.data import load_dataset

    return kinds_for(load_dataset(dataset).input_shape)


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



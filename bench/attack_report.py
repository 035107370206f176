"""`eclm bench --suite attack`: runs both parts, judges the goals, writes attack.json, attack.md and attack.png."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_info, pyplot, write_results

Say = Callable[[str], None]
MAX_SHIFT = 0.02  # goal: 20% malicious devices move validation accuracy by less than 2 points
MAX_BACKDOOR = 0.05  # goal: backdoor success below 5%
MAX_RSS_GROWTH = 20 * 10**6  # goal: daemon memory grows by less than 20 MB over the fuzz
GOAL_SHARE = 0.2


@dataclass(frozen=True)
class SuiteConfig:
    """What one run of the suite covers."""

    devices: int = 10
    shares: tuple[float, ...] = (0.1, 0.2)
    attacks: tuple[str, ...] = ()  # empty: every attack of bench.attack.ATTACKS
    strategies: tuple[str, ...] = ()  # empty: every strategy of cloud_sync.strategies.STRATEGIES
    messages: int = 100_000
    bank_epochs: int | None = None  # None: the full cloud training
    bank_enhance_epochs: int | None = None
    bank: Path | None = None  # an existing digits bank (read only) instead of training one
    bundle: Path | None = None  # an existing pi4 bundle of it instead of exporting one

    @classmethod
    def for_run(cls, quick: bool) -> SuiteConfig:
        if quick:
            return cls(shares=(0.2,), attacks=("scale100", "signflip", "nan", "backdoor", "backdoor_boost"),
                       messages=10_000, bank_epochs=5, bank_enhance_epochs=2)
        return cls()


def judge(matrix: dict[str, Any], fuzz: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The goals, each met or missed with its figure."""
    goals: list[dict[str, Any]] = []
    cells = matrix["cells"]
    share = max((c["share"] for c in cells), default=GOAL_SHARE)
    for strategy in matrix["controls"]:
        mine = [c for c in cells if c["strategy"] == strategy and c["share"] == share]
        worst = max(mine, key=lambda c: abs(c["val_shift"]), default=None)
        shift = abs(worst["val_shift"]) if worst else 0.0
        goals.append({"goal": f"{share:.0%} malicious devices move validation accuracy by < {100 * MAX_SHIFT:g} "
                              f"points ({strategy})", "met": bool(worst is None or shift < MAX_SHIFT),
                      "figure": f"worst {100 * shift:.1f} points" + (f" ({worst['attack']})" if worst else "")})
    backdoors = [c for c in cells if c["attack"].startswith("backdoor")]
    if backdoors:
        worst = max(backdoors, key=lambda c: c["backdoor_success"])
        goals.append({"goal": f"backdoor success < {100 * MAX_BACKDOOR:g}% (cloud model, every strategy and share)",
                      "met": worst["backdoor_success"] < MAX_BACKDOOR,
                      "figure": f"worst {100 * worst['backdoor_success']:.1f}% ({worst['strategy']}, "
                                f"{worst['share']:.0%}, {worst['attack']})"})
    if fuzz is not None:
        crashed = [n for n, code in (("daemon", fuzz["daemon_exit"]), ("edge", fuzz["edge_exit"])) if code is not None]
        goals.append({"goal": f"{fuzz['sent']:,} fuzzed messages: 0 crashes", "met": not crashed,
                      "figure": (", ".join(f"{n} exited" for n in crashed) or "daemon and edge alive")
                      + f"; {fuzz['handler_errors']} messages whose handling raised (caught)"})
        before, after = fuzz["rss_before"].get("daemon"), fuzz["rss_after"].get("daemon")
        growth = (after - before) if before is not None and after is not None else None
        goals.append({"goal": f"daemon RSS growth < {MAX_RSS_GROWTH // 10**6} MB over the fuzz",
                      "met": growth is not None and growth < MAX_RSS_GROWTH,
                      "figure": "not measured (daemon gone)" if growth is None else
                      f"{before / 1e6:.0f} -> {after / 1e6:.0f} MB ({growth / 1e6:+.1f} MB)"})
        statuses = list(fuzz["legit_status"].values())
        merged = sum(1 for s in statuses if s == "merged")
        goals.append({"goal": "every legitimate delta merged", "met": bool(statuses) and merged == len(statuses),
                      "figure": f"{merged} of {len(statuses)} merged"
                      + "".join(f", {n} {s}" for s, n in _count(statuses).items() if s != "merged")})
    return goals


def _count(values: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + (" (with uncommitted changes)" if dirty else "")) if sha else "unknown"
    except OSError:
        return "unknown"


def plot(matrix: dict[str, Any], path: Path) -> Path | None:
    """Validation shift and backdoor success per attack and strategy, at the largest malicious share."""
    cells = matrix["cells"]
    if not cells:
        return None
    plt = pyplot()
    share = max(c["share"] for c in cells)
    strategies = list(matrix["controls"])
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(strategies))
    for j, s in enumerate(strategies):
        by = {c["attack"]: c for c in cells if c["strategy"] == s and c["share"] == share}
        xs = np.arange(len(attacks)) + j * width
        axes[0].bar(xs, [100 * by[a]["val_shift"] if a in by else 0 for a in attacks], width, label=s)
        axes[1].bar(xs, [100 * by[a]["backdoor_success"] if a in by else 0 for a in attacks], width, label=s)
    for ax, title in ((axes[0], "validation accuracy vs honest-only (points)"), (axes[1], "backdoor success (%)")):
        ax.set_xticks(np.arange(len(attacks)) + width * (len(strategies) - 1) / 2)
        ax.set_xticklabels(attacks, rotation=30, ha="right")
        ax.set_title(f"{title}, {share:.0%} malicious")
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(-100 * MAX_SHIFT, color="k", lw=0.8, ls="--")
    axes[0].axhline(100 * MAX_SHIFT, color="k", lw=0.8, ls="--")
    axes[1].axhline(100 * MAX_BACKDOOR, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attack_suite(out: Path, quick: bool, options: Sequence[str], attack_names: str, messages: int | None,
                 say: Say, config: SuiteConfig | None = None, fuzz: bool = True) -> bool:
    """Run the matrix and the fuzz; write attack.json, attack.md and attack.png; True if every goal is met."""
    import logging
    import shutil

    from bench.attack import merge_settings, run_matrix, select_attacks
    from bench.attack_fleet import FleetSpec, build_fleet
    from bench.attack_md import render_markdown
    from cloud_sync.strategies import STRATEGIES

    t0 = time.time()
    cfg = config or SuiteConfig.for_run(quick)
    attacks = select_attacks(attack_names) if attack_names != "default" else list(cfg.attacks) or select_attacks("all")
    strategies = list(cfg.strategies) or list(STRATEGIES)
    merge_settings(options)  # a bad option fails here, before minutes of set-up
    n = cfg.messages if messages is None else messages
    for name in ("eclm", "edge_runtime", "cloud_sync", "exporter"):  # the report holds what matters
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("eclm.edge").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="eclm-attack-"))
    try:
        spec = FleetSpec(devices=cfg.devices, max_attackers=max(1, round(cfg.devices * max(cfg.shares))),
                         bank_epochs=cfg.bank_epochs, bank_enhance_epochs=cfg.bank_enhance_epochs, bank=cfg.bank,
                         bundle=cfg.bundle)
        fleet = build_fleet(spec, work, say)
        t_matrix = time.time()
        matrix = run_matrix(fleet, strategies, cfg.shares, attacks, options, work, say)
        matrix_seconds = time.time() - t_matrix
        fuzz_run = None
        if fuzz and n > 0:
            from bench.attack_fuzz import run_fuzz

            template = fleet.devices[-1].honest
            fuzz_run = run_fuzz(fleet.bank, fleet.devices[0].bundle, template, n, options, say).__dict__
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flags = (" --quick" if quick else "") + "".join(f" --merge-option {o}" for o in options) + (
        f" --attacks {attack_names}" if attack_names != "default" else "") + (
        f" --fuzz-messages {messages}" if messages is not None else "")
    results = assemble(f"eclm bench --suite attack{flags}", options, fleet, matrix, fuzz_run,
                       {"matrix_seconds": matrix_seconds, "seconds": time.time() - t0})
    out.mkdir(parents=True, exist_ok=True)
    png = plot(matrix, out / "attack.png")
    results["plot"] = png.name if png else None
    write_results(out, "attack", results, render_markdown(results))
    return bool(results["passed"])


def assemble(command: str, options: Sequence[str], fleet: Any, matrix: dict[str, Any], fuzz_run: dict[str, Any] | None,
             seconds: dict[str, float]) -> dict[str, Any]:
    """The results document: command, machine, commit, settings, goals, the matrix and the fuzz."""
    from bench.attack import merge_settings, settings_dict

    goals = judge(matrix, fuzz_run)
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in fleet.spec.__dict__.items()}
    return {
        "command": command, "machine": machine_info(), "commit": _commit(), "seconds": seconds.get("seconds", 0.0),
        "passed": all(g["met"] for g in goals), "goals": goals, "options": list(options),
        "merge_settings": settings_dict(merge_settings(options)),
        "fleet": {"devices": len(fleet.devices), "shares": sorted({c["share"] for c in matrix["cells"]}),
                  "attacks": list(dict.fromkeys(c["attack"] for c in matrix["cells"])),
                  "strategies": list(matrix["controls"]), "spec": spec, "setup_seconds": fleet.seconds,
                  "matrix_seconds": seconds.get("matrix_seconds", 0.0),
                  "classes": {d.name: list(d.classes) for d in fleet.devices}},
        "matrix": matrix, "fuzz": fuzz_run, "plot": None,
    }

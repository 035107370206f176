"""`eclm`: the whole loop on one machine (`eclm demo`) and the evaluation (`eclm bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from eclm.cli_support import make_app, parse_int_list, reports_errors

app = make_app("ECLM on one machine: the demo and the benchmarks.")


@app.callback()
def _root() -> None:
    """ECLM on one machine."""


@app.command()
@reports_errors
def demo(
    workdir: Path = typer.Option(Path("eclm-demo"), "--workdir", envvar="ECLM_DEMO_DIR",
                                 help="Where the bank and bundles go."),
    profile: str = typer.Option("pi4", "--profile", help="Device profile to export for."),
    classes: str = typer.Option("1,4,7", "--classes", help="The device's classes."),
    seed: int = typer.Option(0, "--seed", help="Seed for data split and training."),
) -> None:
    """Train the digits cloud model, export a sub-model for one board and report what it reaches."""
    from tqdm import tqdm

    from bench.demo import run_demo
    from eclm.manifest import read_manifest
    from exporter.bank import DirectoryBank
    from exporter.summary import bank_summary, bundle_summary

    bars: dict[str, tqdm] = {}

    def progress(stage: str, epoch: int, total: int, stats: dict[str, float]) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"cloud {stage}", unit="epoch")
        bar = bars[stage]
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        bar.update(1)
        if epoch == total:
            bar.close()

    cls = parse_int_list(classes, "--classes") or [1, 4, 7]
    result = run_demo(workdir, profile, cls, seed, progress, lambda m: typer.echo(f"- {m}", err=True))
    typer.echo(bank_summary(DirectoryBank(result.bank_dir).info(), str(result.bank_dir)))
    typer.echo(bundle_summary(read_manifest(result.bundle_dir), str(result.bundle_dir)))
    typer.echo("")
    typer.echo(f"| model | accuracy on held-out samples of classes {cls} ({result.samples} samples) |")
    typer.echo("|---|---|")
    typer.echo(f"| full cloud model (PyTorch) | {result.full_model_accuracy_on_classes:.4f} |")
    typer.echo(f"| {profile} sub-model (ONNX Runtime) | {result.bundle_accuracy_on_classes:.4f} |")
    typer.echo(f"\nbank test accuracy on all classes: {result.bank_test_accuracy:.4f}")


@app.command()
@reports_errors
def bench(
    suite: str = typer.Option("export", "--suite", help="Benchmark suite: export (resnet18 sizing and speed)."),
    out: Path = typer.Option(Path("docs/benchmarks"), "--out", help="Where JSON and markdown results go."),
    profiles: str = typer.Option(None, "--profiles", help="Comma-separated profiles (default: all)."),
) -> None:
    """Run a benchmark suite; results go to OUT as JSON plus a markdown table."""
    from eclm.errors import ConfigError

    if suite != "export":
        raise ConfigError(f"unknown suite {suite!r}; available: export", hint="use --suite export")
    args = [sys.executable, "-m", "bench.export_bench", "--out", str(out)]
    if profiles:
        args += ["--profiles", profiles]
    raise typer.Exit(subprocess.call(args))


def main() -> None:
    app()

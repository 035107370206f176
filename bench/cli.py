"""`eclm`: the whole loop on one machine (`eclm demo`) and the evaluation (`eclm bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from bench.reaper import run_main, track
from bench.suites import ABLATIONS
from eclm.cli_support import make_app, reports_errors

app = make_app("ECLM on one machine: the demo and the benchmarks.")


@app.callback()
def _root() -> None:
    """ECLM on one machine."""


@app.command()
@reports_errors
def demo(
    workdir: Path = typer.Option(Path("eclm-demo"), "--workdir", envvar="ECLM_DEMO_DIR",
                                 help="Where the bank, keys, bundles, device states, logs and the plot go "
                                 "(replaced on every run)."),
    broker: str = typer.Option(None, "--broker", envvar="ECLM_BROKER",
                               show_default="a private mosquitto if installed, else an embedded pure-Python broker",
                               help="Use this MQTT broker."),
    steps: int = typer.Option(6, "--steps", min=1, envvar="ECLM_DEMO_STEPS", help="Adaptation steps."),
    seed: int = typer.Option(0, "--seed", envvar="ECLM_SEED", help="Seed for data split, training and sampling."),
    tls: bool = typer.Option(False, "--tls", envvar="ECLM_DEMO_TLS", show_default="off",
                             help="Make a PKI in the work dir and run the private mosquitto, the daemon and the "
                             "edges over mqtts with a certificate each (docs/security.md)."),
) -> None:
    """Run the whole loop on this machine: cloud training, a broker, the merger daemon and three edge
    runtimes as separate processes in drifting environments; ends with a table and a PNG plot.
    """
    from tqdm import tqdm

    from bench.demo import render as render_demo
    from bench.demo import run_demo

    bars: dict[str, tqdm] = {}

    def train_progress(stage: str, epoch: int, total: int, stats: dict[str, float]) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"cloud {stage}", unit="epoch")
        bar = bars[stage]
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        bar.update(1)
        if epoch == total:
            bar.close()

    result = run_demo(workdir, broker, steps, seed, lambda m: typer.echo(f"- {m}", err=True), train_progress,
                      tls=tls)
    typer.echo(render_demo(result))
    deltas = ", ".join(f"{k} {v}" for k, v in result.cloud.items())
    typer.echo(f"\ncloud model test accuracy {result.bank_test_accuracy:.4f}; deltas: {deltas}; "
               f"broker {result.broker}")
    if result.plot is not None:
        typer.echo(f"plot: {result.plot}")
    typer.echo(f"logs: {workdir / 'logs'}; finished in {result.seconds:.0f} s, nothing left running")


SUITES = ("export", "edge", "sync", "adapt", "paper", "soak", "attack", "scale")


@app.command()
@reports_errors
def bench(
    suite: str = typer.Option("paper", "--suite", envvar="ECLM_BENCH_SUITE",
                              help="paper: the paper's protocol and baselines; adapt: 20 steps of continuous "
                              "adaptation with shifts; export, edge, sync: the component benchmarks; soak: hostile "
                              "messages while honest devices train (exits 1 if a criterion fails); attack: poisoned "
                              "deltas against every merge strategy and fuzzed messages against a running daemon "
                              "(exits 1 if a goal is missed); scale: the merger daemon under 1,000-10,000 simulated "
                              "devices per worker count and ledger backend, a rate-limited run and a kill -9 "
                              "mid-round."),
    quick: bool = typer.Option(False, "--quick", envvar="ECLM_BENCH_QUICK", show_default="off",
                               help="A small version that finishes in minutes (CI)."),
    seeds: int = typer.Option(None, "--seeds", min=1, envvar="ECLM_BENCH_SEEDS",
                              show_default="3, 1 with --quick",
                              help="paper and adapt suites: the number of seeds to run (0, 1, ...; each its own "
                              "cloud model and fleet; mean, spread and ECLM - LA's 95% interval over them). Exactly "
                              "this many are run, with or without --quick."),
    out: Path = typer.Option(Path("docs/benchmarks"), "--out", envvar="ECLM_BENCH_OUT",
                             help="Where JSON, markdown and PNG plots go."),
    dataset: str = typer.Option("digits", "--dataset", envvar="ECLM_DATASET",
                                help="paper, adapt and sync suites: 'digits' (8x8 images), 'signals' (generated 1-D "
                                "waveforms) or an .npz with X and y (docs/data.md). The other suites measure "
                                "digits only and refuse another data set."),
    duration: float = typer.Option(None, "--duration", min=1, envvar="ECLM_BENCH_DURATION",
                                   show_default="120 s, 40 s with --quick",
                                   help="soak suite: seconds of attack while honest devices train."),
    pills: str = typer.Option("all", "--pills", envvar="ECLM_BENCH_PILLS",
                              help="soak suite: comma-separated pill names (bench/pills.py), 'all', or 'none' "
                              "for an honest-only run."),
    merge_options: list[str] = typer.Option([], "--merge-option", envvar="ECLM_BENCH_MERGE_OPTIONS",
                                            show_default="none: the merger's defaults",
                                            help="attack suite: a merger setting as key=value (a field of "
                                            "cloud_sync.merger.MergeSettings, e.g. gate_margin=0.05 or "
                                            "limits.max_relative_norm=2); repeat for several. The fuzz's daemon "
                                            "gets those its command line has a flag for."),
    attacks: str = typer.Option("default", "--attacks", envvar="ECLM_BENCH_ATTACKS",
                                help="attack suite: comma-separated attacks (bench/attack.py), 'all', or "
                                "'default' (all; five with --quick)."),
    fuzz_messages: int = typer.Option(None, "--fuzz-messages", min=0, envvar="ECLM_BENCH_FUZZ_MESSAGES",
                                      show_default="100000, 10000 with --quick",
                                      help="attack suite: fuzzed messages to send (0: skip the fuzz)."),
    workers: str = typer.Option("1,2,4", "--workers", envvar="ECLM_BENCH_WORKERS",
                                help="scale suite: comma-separated worker counts (`eclm-cloud sync --workers N`)."),
    backends: str = typer.Option("sqlite,postgresql", "--backends", envvar="ECLM_BENCH_BACKENDS",
                                 help="scale suite: ledger backends, sqlite and/or postgresql (a fresh database on "
                                 "127.0.0.1:5432 as user postgres, dropped after)."),
    ablation: str = typer.Option("", "--ablation", envvar="ECLM_BENCH_ABLATION", show_default="none",
                                 help="paper and adapt suites: run the ECLM arm with one mechanism changed: "
                                 f"{', '.join(ABLATIONS)} (bench/suites.py ABLATIONS says what each changes)."),
    few_shot: bool = typer.Option(False, "--few-shot", envvar="ECLM_BENCH_FEW_SHOT", show_default="off",
                                  help="paper and adapt suites: devices hold 10-30 labelled samples, not 50-150."),
    devices: str = typer.Option("", "--devices", envvar="ECLM_BENCH_DEVICES",
                                show_default="1000,2000,5000,10000; 200,1000 with --quick",
                                help="scale suite: comma-separated fleet sizes."),
) -> None:
    """Run a benchmark suite; results go to OUT as JSON plus a markdown table (and plots)."""
    from eclm.errors import ConfigError

    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; available: {', '.join(SUITES)}", hint="use --suite paper")
    fleet_suites = ("paper", "adapt")
    if seeds is not None and suite not in fleet_suites:
        raise ConfigError(f"--seeds is for the paper and adapt suites; the {suite} suite runs one fixed seed",
                          hint="drop --seeds (or unset ECLM_BENCH_SEEDS) for this suite")
    if ablation and suite not in fleet_suites:
        raise ConfigError(f"--ablation is for the paper and adapt suites, not {suite}", hint="drop --ablation")
    if dataset != "digits" and suite not in (*fleet_suites, "sync"):
        raise ConfigError(f"--dataset is for the paper, adapt and sync suites; the {suite} suite measures digits only",
                          hint="drop --dataset (or unset ECLM_DATASET) for this suite")
    if few_shot and suite not in fleet_suites:
        raise ConfigError(f"--few-shot is for the paper and adapt suites, not {suite}", hint="drop --few-shot")
    if ablation:
        from bench.suites import ablation as find_ablation

        find_ablation(ablation)  # an unknown name fails now, not after the bank is trained
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    if suite in fleet_suites:
        from bench.suites import suite_seeds

        n = suite_seeds(quick, seeds)
    if suite == "adapt":
        import bench.adapt_suite

        bench.adapt_suite.adapt_suite(out=out, quick=quick, seeds=n, say=say, dataset=dataset,
                                      ablation_name=ablation, few=few_shot)
        typer.echo((out / "adapt.md").read_text())
    elif suite == "soak":
        from bench.soak_report import soak_suite

        passed = soak_suite(out, quick, duration, pills, say)
        typer.echo((out / "soak.md").read_text())
        raise typer.Exit(0 if passed else 1)
    elif suite == "attack":
        from bench.attack_report import attack_suite

        passed = attack_suite(out, quick, merge_options, attacks, fuzz_messages, say)
        typer.echo((out / "attack.md").read_text())
        raise typer.Exit(0 if passed else 1)
    elif suite == "scale":
        from bench.scale import ints, names, scale_suite

        scale_suite(out, quick, ints(workers), names(backends), say, ints(devices) or None)
        typer.echo((out / "scale.md").read_text())
    elif suite == "paper":
        import bench.paper_suite

        bench.paper_suite.paper_suite(out=out, quick=quick, seeds=n, say=say, dataset=dataset,
                                      ablation_name=ablation, few=few_shot)
        typer.echo((out / "paper.md").read_text())
    else:
        module = {"export": "bench.export_bench", "edge": "bench.edge_bench", "sync": "bench.sync_bench"}[suite]
        args = [sys.executable, "-m", module, "--out", str(out)] + (["--quick"] if quick and suite == "edge" else []) \
            + (["--dataset", dataset] if suite == "sync" else [])
        raise typer.Exit(run_suite(args))


def run_suite(args: list[str]) -> int:
    """A suite in its own process; on SIGTERM, :func:`stop_started` passes the signal on and the child unwinds."""
    return track(subprocess.Popen(args)).wait()


def main() -> None:
    run_main(app)

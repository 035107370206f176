"""`eclm bench --suite scale`: the merger daemon under thousands of simulated devices.

Run as ``python -m bench.scale [--quick] [--devices 1000,10000] [--workers 1,2,4] [--backends sqlite,postgresql]
[--out docs/benchmarks]``. For every cell (devices x workers x backend) a private mosquitto, a fresh copy of
a cached digits bank (or a fresh PostgreSQL database) and ``eclm-cloud sync`` start; simulated devices
(:mod:`bench.scale_fleet`) send a profile, then one delta each as fast as they can. Measured: deltas
stored per second (acks "stored"), merged per second (the ledger), publish -> ack and publish -> module
update p50/p99, peak RSS of the broker and the workers. Then a rate-limited run (1,000 devices within one
second; goal p99 publish -> ack <= 100 ms) and a fault run (kill -9 of one worker mid-round, restart,
every stored delta merged exactly once). Writes ``scale.json``, ``scale.md`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine_info, md_table, pyplot, write_results
from bench.scale_cell import Cell, run_cell

Say = Callable[[str], None]
DEVICES, QUICK_DEVICES = (1000, 2000, 5000, 10000), (200, 1000)
ACK_GOAL_MS = 100.0
RATE_DEVICES = 1000


def cached_bank(cache: Path, say: Say) -> Path:
    """The digits bank of every cell (a short schedule: the benchmark measures the sync path, not accuracy)."""
    bank = cache / "bank-digits-short"
    if not (bank / "bank.json").exists():
        from exporter.cloud import TrainOptions, train_bank

        say(f"training the digits bank once into {bank}")
        tmp = cache / f"tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        train_bank(TrainOptions(dataset="digits", bank_dir=tmp, seed=0, epochs=3, enhance_epochs=1))
        tmp.replace(bank)
    return bank


def default_cache() -> Path:
    return Path(os.environ.get("ECLM_BENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "eclm-bench")


def command(quick: bool, devices: list[int], workers: list[int], backends: list[str]) -> str:
    """The ``eclm bench`` command that reproduces a run."""
    default = list(QUICK_DEVICES if quick else DEVICES)
    return ("eclm bench --suite scale" + (" --quick" if quick else "")
            + ("" if devices == default else f" --devices {','.join(map(str, devices))}")
            + ("" if workers == [1, 2, 4] else f" --workers {','.join(map(str, workers))}")
            + ("" if backends == ["sqlite", "postgresql"] else f" --backends {','.join(backends)}"))


def scale_suite(out: Path, quick: bool, workers: list[int], backends: list[str], say: Say,
                devices: list[int] | None = None, rate_run: bool = True, fault_run: bool = True,
                cache: Path | None = None, timeout: float = 900.0, stage_deltas: int = 300) -> dict[str, Any]:
    """Every cell, the rate-limited run and the fault run; writes the JSON, the markdown table and the plot."""
    import signal
    import threading

    from bench.scale_fault import kill_mid_round
    from eclm.signing import generate_keys

    if threading.current_thread() is threading.main_thread():  # SIGTERM stops brokers and daemons too
        signal.signal(signal.SIGTERM, _interrupt)
    t_start = time.time()
    devices = list(devices or (QUICK_DEVICES if quick else DEVICES))
    work = Path(tempfile.mkdtemp(prefix="eclm-scale-"))
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick, "command": command(quick, devices, workers,
                                                                                              backends),
                               "cells": [], "rate_limited": [], "fault": None}
    try:
        bank = cached_bank(cache or default_cache(), say)
        (work / "keys").mkdir()
        key, _ = generate_keys(work / "keys")
        from bench.scale_profile import describe, stage_costs

        results["stages"] = stage_costs(bank, key, stage_deltas)  # the SQLite ledger, in-process
        describe(results["stages"], say)
        n = 0
        for backend in backends:
            for w in workers:
                for d in devices:
                    n += 1
                    say(f"cell {n}: {d} devices, {w} worker(s), {backend}")
                    results["cells"].append(run_cell(Cell(d, w, backend, timeout=timeout), bank, key,
                                                     work / f"cell-{n}", say))
        if rate_run:
            for backend in backends:
                for w in workers:
                    n += 1
                    say(f"rate-limited: {RATE_DEVICES} devices within 1 s, {w} worker(s), {backend}")
                    results["rate_limited"].append(run_cell(Cell(RATE_DEVICES, w, backend, spread=1.0,
                                                                 timeout=timeout), bank, key, work / f"cell-{n}", say))
        if fault_run:
            fw = 2 if 2 in workers or not workers else workers[0]
            say(f"fault run: kill -9 of one worker mid-round, {fw} workers, {backends[0]}")
            fault = run_cell(Cell(min(devices[-1], 2000), fw, backends[0], timeout=timeout), bank, key,
                             work / "fault", say, fault=kill_mid_round)
            if not fault.get("available") and not fault.get("failed") and fw != 1:
                say("fault run: falling back to 1 worker (kill -9 of the sync process and a restart)")
                fault = run_cell(Cell(min(devices[-1], 2000), 1, backends[0], timeout=timeout), bank, key,
                                 work / "fault-1", say, fault=kill_mid_round) | {"fell_back_from": fault}
            results["fault"] = fault
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.time() - t_start
    plot = _plot(results["cells"], out / "scale.png")
    write_results(out, "scale", results, render(results, plot))
    return results


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)


def _row(c: dict[str, Any]) -> list[Any]:
    head = [c["devices"], c["workers"], c["backend"]]
    if not c.get("available"):
        why = "**failed**" if c.get("failed") else "not available"
        return head + [f"{why}: {c.get('error', '?')}"] + ["-"] * 8
    once = c.get("exactly_once") or {}
    return head + [f"{_f(c['stored_per_s'])} ({_f(c.get('ledger_stored_per_s'))})", _f(c["merged_per_s"]),
                   f"{_f(c['ack_ms_p50'])} / {_f(c['ack_ms_p99'])}",
                   f"{_f(c['update_ms_p50'], '{:.0f}')} / {_f(c['update_ms_p99'], '{:.0f}')}",
                   _f(c.get("broker_rss_mib")), _f(c.get("workers_rss_mib")), c.get("rounds", "-"),
                   f"{c['acked']}/{c['devices']} acked, {once.get('stored', 0) - once.get('not_merged', 0)} merged"
                   + (", exactly once" if once.get("ok") else ", **not exactly once**")
                   + _all_sent(c, once)
                   + f"; {c.get('update_messages', 0):,} updates received"
                   + (f"; daemon dropped by the broker {c['broker_keepalive_kicks']}x (keepalive)"
                      if c.get("broker_keepalive_kicks") else "")]


def _all_sent(c: dict[str, Any], once: dict[str, Any]) -> str:
    """For a cell whose acks did not all come back: what the ledger says of every delta sent."""
    all_sent = c.get("exactly_once_all_sent") or {}
    if not all_sent or once.get("stored") == c["devices"]:
        return ""
    return f"; of all {c['devices']} sent: " + ("every one merged exactly once" if all_sent.get("ok")
                                                 else "**not all merged exactly once**")


HEADERS = ["devices", "workers", "backend", "stored/s: acks (ledger)", "merged/s", "publish->ack p50 / p99 (ms)",
           "publish->update p50 / p99 (ms)", "broker RSS (MiB)", "workers RSS (MiB)", "rounds", "counts"]


def render(results: dict[str, Any], plot: Path | None) -> str:
    m = results["machine"]
    rate = results["rate_limited"]
    goal = [f"- {r['workers']} worker(s), {r['backend']}: " + (
        f"p99 {r['ack_ms_p99']:.1f} ms, p50 {r['ack_ms_p50']:.1f} ms: "
        + ("**met**" if r["ack_ms_p99"] <= ACK_GOAL_MS else "**not met**") if r.get("available")
        else f"{'failed' if r.get('failed') else 'not available'}: {r.get('error')}") for r in rate]
    f = results.get("fault") or {}
    fault_md = "not run"
    if f:
        if not f.get("available"):
            fault_md = f"{'failed' if f.get('failed') else 'not available'}: {f.get('error')}"
        else:
            d, once = f.get("fault", {}), f.get("exactly_once", {})
            fault_md = (f"{f['devices']} devices, {f['workers']} worker(s), {f['backend']}: killed {d.get('killed')} "
                        f"with the ledger at {d.get('ledger_at_kill')} (mid-round: {d.get('mid_round')}); restarted "
                        f"by {d.get('restarted_by')} after {_f(d.get('restart_s'))} s; {d.get('resent')} deltas "
                        f"resent by the simulated devices. Acked stored (or duplicate after a resend): "
                        f"{once.get('stored')}; not merged: "
                        f"{once.get('not_merged')}; in no lineage: {once.get('in_no_lineage')}; in several: "
                        f"{once.get('in_several_lineages')}: "
                        + ("**every stored delta merged exactly once**" if once.get("ok") else "**FAILED**")
                        + (f" (fell back from {f['fell_back_from']['workers']} workers: not available: "
                           f"{f['fell_back_from'].get('error')})" if f.get("fell_back_from") else ""))
    return f"""# Scale: the merger daemon under many simulated devices

Command: `{results['command']}`; {m['cpu']}, {m['cores']} cores, {m['date']}; run time {results['seconds']:.0f} s.

Each cell starts a private mosquitto (no ACLs, anonymous, loopback), a fresh copy of a digits bank and
`eclm-cloud sync` (`--round-deltas` a quarter of the fleet, `--round-seconds 5`, a signing key, so every
merged round sends a signed module update to every device holding `head`). The devices are real MQTT
clients multiplexed over one connection per 50 devices (at most 200): each sends a valid profile
(pi4, holds `head`), then one `int8+zlib` delta of `head` with real shapes, all at once. stored/s:
acks "stored" over the time from the first publish to the last such ack (in brackets: every delta in
the ledger, polled every 0.5 s, which does not depend on acks coming back); merged/s: deltas merged
over the time until the ledger had none pending (polled every 0.5 s); RSS: peak over the cell.
With `--workers N` the workers' RSS is the sum over the sync process and its children (each worker
loads torch for the validation gate). The simulator, the broker and every worker share the machine's
cores. What these figures mean for 100,000 and 1,000,000 devices is in [docs/scale.md](../scale.md).

{md_table(HEADERS, [_row(c) for c in results['cells']])}

## Where a worker's time goes
{_stages_md(results.get("stages"))}

## Rate-limited: {RATE_DEVICES} devices publishing within one second (goal: p99 publish -> ack <= {ACK_GOAL_MS:.0f} ms)
{chr(10).join(goal) or 'not run'}

{md_table(HEADERS, [_row(c) for c in rate]) if rate else ''}

## Fault: kill -9 of one worker mid-round
{fault_md}

{f'![throughput and p99 against devices]({plot.name})' if plot else ''}
"""


def _stages_md(p: dict[str, Any] | None) -> str:
    if not p:
        return "not measured"
    from bench.scale_profile import describe

    return (f"The daemon's decision code (`SyncCore`) fed the same messages in-process, without a broker, on the "
            f"SQLite ledger, in batches as the ingest thread hands them over: {describe(p)}. A worker's ingest "
            f"thread stores a batch in one transaction and sends the broker's PUBACKs after it, so one worker's "
            f"decision code stores at most about {1e3 / p['handle_ms_per_delta']:.0f} deltas/s on one core "
            f"here (over MQTT the broker, the simulator and paho share the cores), and each merged round costs "
            f"{p['update_ms_per_device']:.2f} ms per device holding a changed module (one signed update each).")


def _plot(cells: list[dict[str, Any]], path: Path) -> Path | None:
    ok = [c for c in cells if c.get("available")]
    if not ok:
        return None
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(c["workers"], c["backend"]) for c in ok}):
        cs = sorted((c for c in ok if (c["workers"], c["backend"]) == key), key=lambda c: c["devices"])
        x = [c["devices"] for c in cs]
        label = f"{key[0]} worker(s), {key[1]}"
        a.plot(x, [c.get("ledger_stored_per_s") or c["stored_per_s"] for c in cs], marker="o",
               label=f"stored (ledger), {label}")
        a.plot(x, [c["merged_per_s"] for c in cs], marker="s", linestyle="--", label=f"merged, {label}")
        b.plot(x, [c["ack_ms_p99"] for c in cs], marker="o", label=f"ack, {label}")
        b.plot(x, [c["update_ms_p99"] for c in cs], marker="s", linestyle="--", label=f"update, {label}")
    a.set(xlabel="devices", ylabel="deltas per second", title="Throughput", xscale="log")
    b.set(xlabel="devices", ylabel="p99 latency (ms)", title="p99 from publish", xscale="log", yscale="log")
    b.axhline(ACK_GOAL_MS, color="grey", linestyle=":")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rerender(out: Path) -> None:
    """Redraw ``scale.md`` and ``scale.png`` from ``scale.json`` (after a change to the report only)."""
    import json

    results = json.loads((out / "scale.json").read_text())
    write_results(out, "scale", results, render(results, _plot(results["cells"], out / "scale.png")))


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    from eclm.errors import ConfigError

    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in ("sqlite", "postgresql")]
    if bad or not out:
        raise ConfigError(f"unknown backend(s) {bad or text!r}", hint="use --backends sqlite,postgresql")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--quick", action="store_true", help="devices 200 and 1000")
    ap.add_argument("--devices", default="", help="comma-separated fleet sizes (default: 1000,2000,5000,10000)")
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (eclm-cloud sync --workers)")
    ap.add_argument("--backends", default="sqlite,postgresql", help="sqlite and/or postgresql")
    ap.add_argument("--no-rate", action="store_true", help="skip the rate-limited run")
    ap.add_argument("--no-fault", action="store_true", help="skip the fault run")
    ap.add_argument("--render-only", action="store_true", help="redraw scale.md and scale.png from scale.json")
    args = ap.parse_args(argv)
    if args.render_only:
        rerender(args.out)
        print((args.out / "scale.md").read_text())
        return 0
    scale_suite(args.out, args.quick, ints(args.workers), names(args.backends), lambda m: print(m, flush=True),
                ints(args.devices) or None, not args.no_rate, not args.no_fault)
    print((args.out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

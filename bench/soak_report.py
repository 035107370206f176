"""Judging and reporting a soak run: the criteria, ``soak.json`` and ``soak.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import machine_info, md_table, write_results
from bench.pills import BY_NAME
from bench.soak import DAEMON_ARGS, SoakRun

MiB = 2**20
RSS_GROWTH_LIMIT = 64 * MiB  # most resident memory in the attack's second half over its first half
RSS_RISE_LIMIT = 384 * MiB  # most resident memory over the first sample (exports alone add about 150)
METRICS_LIMIT = 256 * 1024  # bytes of the daemon's /metrics at the end


def rss_figures(samples: list[tuple[float, int]], attack_seconds: float) -> dict[str, Any]:
    """First, most, and growth over the last half of the attack (most in the second half - most in the first)."""
    during = [(t, v) for t, v in samples if t <= attack_seconds + 1.0] or samples
    if not during:
        return {"samples": 0}
    half = attack_seconds / 2
    first = [v for t, v in during if t <= half] or [during[0][1]]
    second = [v for t, v in during if t > half] or [during[-1][1]]
    return {"samples": len(samples), "first": during[0][1], "max": max(v for _, v in samples),
            "growth_last_half": max(second) - max(first)}


def _rss_ok(fig: dict[str, Any]) -> tuple[bool, str]:
    if not fig.get("samples"):
        return False, "no samples"
    ok = fig["growth_last_half"] <= RSS_GROWTH_LIMIT and fig["max"] - fig["first"] <= RSS_RISE_LIMIT
    return ok, (f"{fig['first'] / MiB:.0f} -> max {fig['max'] / MiB:.0f} MiB, last half "
                f"{fig['growth_last_half'] / MiB:+.0f} MiB")


def judge(run: SoakRun) -> list[dict[str, Any]]:
    """Each criterion: name, passed, and the figure behind it."""
    ids = [i for d in run.devices for i in run.produced.get(d, [])]
    status = run.ledger.get("status", {})
    rounds = run.ledger.get("merged_in_rounds", {})
    left = {i for v in run.outbox_left.values() for i in v}
    not_merged = [i for i in ids if status.get(i) != "merged" or len(rounds.get(i, [])) != 1]
    lost = [i for i in ids if status.get(i) is None and i not in left]
    out = [
        {"criterion": "the daemon never exits", "passed": run.daemon_exit is None and run.daemon_died_at is None,
         "figure": "alive at the end" if run.daemon_exit is None and run.daemon_died_at is None else
         f"exited with code {run.daemon_exit}, {run.daemon_died_at or run.attack_seconds:.0f} s after the attack "
         f"began"},
        {"criterion": "honest devices produced deltas", "passed": len(ids) > 0,
         "figure": f"{len(ids)} deltas from {sum(1 for d in run.devices if run.produced.get(d))} devices"},
        {"criterion": "every honest delta stored once and merged in exactly one round", "passed": not not_merged,
         "figure": f"{len(ids) - len(not_merged)} of {len(ids)}" + (
             "; not: " + ", ".join(f"{i[:8]} {status.get(i)} rounds {rounds.get(i, [])}" for i in not_merged[:6])
             if not_merged else "")},
        {"criterion": "no honest delta left an outbox without reaching the ledger", "passed": not lost,
         "figure": f"{len(lost)} lost" + (f": {', '.join(i[:8] for i in lost[:6])}" if lost else "")},
        {"criterion": "no module version was made from a delta no honest device sent",
         "passed": not run.ledger.get("foreign_versions"),
         "figure": f"{len(run.ledger.get('foreign_versions', []))} such versions" + (
             f": {', '.join(run.ledger['foreign_versions'][:8])}" if run.ledger.get("foreign_versions") else "")},
        {"criterion": "every honest outbox drained (each delta acknowledged)", "passed": not left,
         "figure": ", ".join(f"{d}: {len(v)}" for d, v in run.outbox_left.items()) + " left"},
        {"criterion": "honest edges never exit", "passed": not run.edges_exited,
         "figure": ", ".join(f"{d} exited {c}" for d, c in run.edges_exited.items()) or "all alive"},
        {"criterion": f"/metrics stays under {METRICS_LIMIT // 1024} KiB",
         "passed": run.metrics_bytes is not None and run.metrics_bytes <= METRICS_LIMIT,
         "figure": f"{run.metrics_bytes:,} bytes" if run.metrics_bytes is not None else "not readable"},
    ]
    for proc, samples in sorted(run.rss.items(), key=lambda kv: kv[0] != "daemon"):
        ok, figure = _rss_ok(rss_figures(samples, run.attack_seconds))
        out.append({"criterion": f"{proc} memory bounded (last half <= +{RSS_GROWTH_LIMIT // MiB} MiB, "
                                 f"rise <= {RSS_RISE_LIMIT // MiB} MiB)", "passed": ok, "figure": figure})
    return out


def render(run: SoakRun, criteria: list[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    verdict = "PASSED" if all(c["passed"] for c in criteria) else "FAILED"
    pills = [[name, BY_NAME[name].every, s["firings"], s["messages"], f"{s['bytes'] / MiB:.1f}",
              BY_NAME[name].doc.split("\n")[0]] for name, s in run.sent.items()]
    refused = [[k, v] for k, v in sorted(run.ledger.get("rejected_by_reason", {}).items())]
    died = ""
    if run.daemon_exit is not None or run.daemon_died_at is not None:
        died = "\n## The daemon's last log lines\n```\n" + run.daemon_log_tail[-3000:] + "\n```\n"
    return f"""# Soak: hostile messages while honest devices train — {verdict}

Command: `{command}`

{info['cpu']}, {info['cores']} cores, {info['date']}. Set-up (bank, key pair, bundle, broker, daemon,
edges) {run.setup_seconds:.0f} s; attack {run.attack_seconds:.0f} s of {run.duration:.0f} s; drain
{run.drain_seconds:.0f} s (ends early once every honest delta is settled or the daemon is gone).

A private mosquitto, the real `eclm-cloud sync` daemon (`{' '.join(DAEMON_ARGS)}`:
the validation gate and the staleness limit are not under test here, and an honest delta held or
refused by them would read as a loss) and {len(run.devices)} real `eclm-edge serve` processes run as
subprocesses. One pi4 bundle is exported and re-issued for each device (its manifest names the
device and is signed by the cloud's key again, as `eclm-export --device-id` writes it). The bench
feeds each edge 40 labelled digits at a time over `POST /v1/samples` and asks it to train
(`POST /v1/train`), in a loop, so it sends real deltas. Meanwhile one attacker client on the broker
sends the pills below on their schedule (`bench/pills.py`). After the attack the honest devices stop
training and their outboxes get time to drain. Statuses and rounds are read through the ledger's
own Python API; memory is sampled from `/proc` once a second.

## Criteria
{md_table(["criterion", "result", "figure"], [[c["criterion"], "pass" if c["passed"] else "**FAIL**", c["figure"]]
                                               for c in criteria])}

## Pills sent (`bench/pills.py`)
{md_table(["pill", "every (s)", "firings", "messages", "MiB", "what"], pills) if pills else "none (honest only)"}

## What the daemon did
{md_table(["figure", "value"], [
        ["rounds", run.ledger.get("rounds")], [f"`{'head'}` version at the end", run.ledger.get("module_version")],
        ["deltas by state", run.ledger.get("deltas")], ["honest deltas", sum(len(v) for v in run.produced.values())],
        ["daemon exit code", run.daemon_exit if run.daemon_exit is not None else "still running"],
    ])}

## Refused, by reason (ledger)
{md_table(["reason", "count"], refused) if refused else "none recorded"}
{died}"""


def soak_suite(out: Path, quick: bool, duration: float | None, pill_names: str, say: Any) -> bool:
    """Run the soak and write ``soak.json`` and ``soak.md``; True when every criterion passed."""
    from bench.pills import select
    from bench.soak import run_soak

    chosen = select(pill_names)
    seconds = float(duration if duration is not None else (40 if quick else 120))
    run = run_soak(seconds, chosen, say, drain=90.0 if quick else 180.0)
    criteria = judge(run)
    info = machine_info()
    flags = (" --quick" if quick else "") + (f" --duration {duration:g}" if duration is not None else "") + (
        f" --pills {pill_names}" if pill_names != "all" else "")
    command = f"eclm bench --suite soak{flags}"
    results = {"machine": info, "command": command, "passed": all(c["passed"] for c in criteria),
               "criteria": criteria, "run": run.__dict__,
               "rss": {p: rss_figures(s, run.attack_seconds) for p, s in run.rss.items()}}
    write_results(out, "soak", results, render(run, criteria, info, command))
    return bool(results["passed"])

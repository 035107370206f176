"""attack.md: the attack suite's results as markdown (goals, settings, matrix, devices, fuzz)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from bench.common import md_table


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


def _matrix_rows(matrix: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for strategy, control in matrix["controls"].items():
        rows.append([strategy, "0%", "none (honest-only control)", "-", "-", f"{control['val_accuracy']:.3f}", "-",
                     f"{control['test_accuracy']:.3f}", "-", f"{100 * control['backdoor_success']:.1f}", "-",
                     len(control["held_parts"]), ", ".join(control["held_parts"]) or "-", f"{control['seconds']:.1f}"])
        for share, s in matrix.get("silent", {}).get(strategy, {}).items():
            rows.append([strategy, f"{float(share):.0%} ({s['attackers']})", "none (the attackers send nothing)", "-",
                         "-", f"{s['val_accuracy']:.3f}", _pts(s["val_accuracy"] - control["val_accuracy"]),
                         f"{s['test_accuracy']:.3f}", _pts(s["test_accuracy"] - control["test_accuracy"]),
                         f"{100 * s['backdoor_success']:.1f}", "-", len(s["held_parts"]),
                         ", ".join(s["held_parts"]) or "-", f"{s['seconds']:.1f}"])
        for c in (c for c in matrix["cells"] if c["strategy"] == strategy):
            rows.append([strategy, f"{c['share']:.0%} ({c['attackers']})", c["attack"], "; ".join(c["attacker_acks"]),
                         f"{c['attackers_merged']}/{c['attackers']}", f"{c['val_accuracy']:.3f}",
                         _pts(c["val_shift"]), f"{c['test_accuracy']:.3f}", _pts(c["test_shift"]),
                         f"{100 * c['backdoor_success']:.1f}", _pts(c["val_shift_vs_silent"]), len(c["held_parts"]),
                         ", ".join(c["held_parts"]) or "-", f"{c['seconds']:.1f}"])
    return rows


def _device_tables(results: dict[str, Any]) -> str:
    matrix = results["matrix"]
    cells = matrix["cells"]
    if not cells:
        return ""
    share = max(c["share"] for c in cells)
    start = matrix["start"]["device_accuracy"]
    out = []
    for strategy, control in matrix["controls"].items():
        mine = [c for c in cells if c["strategy"] == strategy and c["share"] == share]
        k = mine[0]["attackers"] if mine else 0
        headers = ["device", "classes", "before", "honest-only"] + [c["attack"] for c in mine]
        rows = []
        for i, (name, before) in enumerate(start.items()):
            label = name + (" (attacker)" if i < k else "")
            rows.append([label, ",".join(map(str, results["fleet"]["classes"][name])), f"{before:.3f}",
                         f"{control['device_accuracy'][name]:.3f}"]
                        + [f"{c['device_accuracy'][name]:.3f}" for c in mine])
        out.append(f"### {strategy}, {share:.0%} malicious\n\n{md_table(headers, rows)}")
    return "\n\n".join(out)


def _fuzz_section(f: dict[str, Any] | None) -> str:
    if f is None:
        return "Not run."
    mib = 2**20
    rss = [[name, f"{(f['rss_before'].get(name) or 0) / mib:.0f}", f"{(f['rss_after'].get(name) or 0) / mib:.0f}",
            f"{max((v for _, v in f['rss'].get(name, [])), default=0) / mib:.0f}"] for name in f["rss_before"]]
    statuses: dict[str, int] = {}
    for s in f["legit_status"].values():
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    rejected = sorted(f["rejected_by_reason"].items(), key=lambda kv: -kv[1])
    rate = f["sent"] / f["fuzz_seconds"] if f["fuzz_seconds"] else float("nan")
    skipped = ("; merge options without a daemon flag (not passed): " + ", ".join(f["options_not_passed"])
               if f["options_not_passed"] else "")
    return f"""{f['sent']:,} messages ({f['bytes_sent'] / mib:.0f} MiB) in {f['fuzz_seconds']:.0f} s ({rate:,.0f}/s), \
set-up {f['setup_seconds']:.0f} s, drain {f['drain_seconds']:.0f} s; probes that timed out: {f['probe_timeouts']}.
Daemon arguments: `{' '.join(f['daemon_args'])}`{skipped}.

{md_table(["fuzz kind", "messages"], sorted(f["sent_by_kind"].items()))}

{md_table(["topic kind", "messages"], sorted(f["sent_by_topic_kind"].items()))}

{md_table(["process", "RSS before (MiB)", "after (MiB)", "peak (MiB)"], rss)}

Legitimate deltas ({sum(len(v) for v in f['legit'].values())} from {len(f['legit'])} devices): \
{', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}. Ledger: {f['deltas']}; quarantined {f['quarantined']};
messages whose handling raised (caught, logged): {f['handler_errors']}.

{md_table(["refused because", "count"], rejected[:25])}
"""


def _gate_alone(matrix: dict[str, Any]) -> str:
    """Cells in which the validation gate stopped an attack only by holding every delta of the round."""
    n = len(matrix["start"]["device_accuracy"])
    cells = [c for c in matrix["cells"] if c["ledger"].get("held", 0) >= n - c["attackers"]
             and c["attackers_merged"] == 0 and not any(a.startswith("rejected") for a in c["attacker_acks"])]
    if not cells:
        return "In no cell did the validation gate have to hold back every delta of the round."
    names = ", ".join(f"{c['strategy']} {c['share']:.0%} {c['attack']}" for c in cells)
    return (f"In {len(cells)} cell(s) the attack passed every check at the edge and only the validation gate stopped "
            f"it, by holding back every delta of the round, the honest ones too (nothing was merged that round): "
            f"{names}. The attack cost no accuracy there, but it stopped learning for the round.")


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    goals = md_table(["goal", "result", "figure"], [[g["goal"], "met" if g["met"] else "**missed**", g["figure"]]
                                                    for g in results["goals"]])
    fleet = results["fleet"]
    own = results["matrix"]["start"].get("attacker_own_model", {})
    own_txt = ", ".join(f"{d}: accuracy {v['accuracy']:.3f}, backdoor {100 * v['backdoor_success']:.0f}%"
                        for d, v in own.items())
    plot = f"\n![validation shift and backdoor success]({results['plot']})\n" if results.get("plot") else ""
    dev_acc = results["matrix"]["start"]["device_accuracy"]
    verdict = "every goal met" if results["passed"] else "goals missed"
    return f"""# Attack: poisoned deltas and fuzzed messages — {verdict}

Command: `{results['command']}` (exits 1 when a goal is missed)

{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m.get('torch', '?')}, onnxruntime \
{m.get('onnxruntime', '?')}; commit {results['commit']}; {m['date']}; {results['seconds']:.0f} s in all.

## Goals
{goals}

## Settings
The merger was driven only through its public settings (`cloud_sync.merger.MergeSettings`), built from
`--merge-option key=value` ({', '.join(f'`{o}`' for o in results['options']) or 'none: the defaults'}); each
strategy's row used these, with `strategy` set per row:

```json
{json.dumps(results['merge_settings'], indent=1)}
```

## Poisoned deltas: how it was measured
{fleet['devices']} devices, each with 3 digit classes (120 samples of the device pool's first half, test
samples from the other half), all on one `pi4` bundle of the bank. **Honest deltas are real**: one
fine-tuning run per device by the edge runtime (its ONNX Runtime training step graph). **The backdoor is
real too**: the malicious device trains ({fleet['spec']['attacker_epochs']} epochs at \
{fleet['spec']['attacker_learning_rate']:g}) on its samples plus {fleet['spec']['poison_share']:.0%} more
that carry a trigger (the bottom-right 2x2 pixels at full brightness) labelled {fleet['spec']['target']};
with its own delta applied, its own model sends {own_txt or '-'} of triggered test samples of other classes to
the target (the attack works before any merging). **The other attacks transform the attacker's honest
delta**: x100 (`scale100`), sign flip (`signflip`), a NaN or an Inf in every tensor, `inflate` (the
sign-flipped delta x n/k, each tensor scaled to 1% under the daemon's norm bound, claiming 10^9 samples and
importance 10^6, the most the checks allow), `backdoor_boost` (the backdoor delta treated the same way:
model replacement by an attacker who knows the bound). Set-up: {', '.join(f'{k} {v:.0f} s' for k, v in
fleet['setup_seconds'].items())}; the matrix {fleet['matrix_seconds']:.0f} s.

Each cell feeds every device's profile and delta, as the bytes it would publish, to the daemon's own
decision code (`cloud_sync.core.SyncCore`: validation with the norm bound, the known-device check, the
ledger, one merge round with the strategy and the validation gate) on a fresh copy of the bank; the first
k devices are the attackers. "validation" is the gate's own split (108 samples: one sample is 0.9
points); "test" is the device pool's held-out half ({results['matrix']['test_samples']} samples, no device
trained on it). The shift is against the honest-only control of the same strategy (the goal's measure);
"shift vs silent" is against a second control in which the attackers send nothing, so it shows what the
attack does beyond the loss of the attackers' honest deltas (with 108 validation samples and non-IID
devices, dropping two honest deltas alone can move validation accuracy by a point or two). "backdoor" is the
share of triggered test samples of other classes the merged cloud model calls {fleet['spec']['target']}
(before any merge: {100 * results['matrix']['start']['backdoor_success']:.1f}%).
Cloud test accuracy before any merge: {results['matrix']['start']['test_accuracy']:.3f}; mean device accuracy
before: {np.mean(list(dev_acc.values())):.3f}.
{plot}
{_gate_alone(results['matrix'])} Each cell is one merge round from the bank as trained; the devices' own
holdout check on module updates is not modelled (the device table shows what an update would serve).

{md_table(["strategy", "malicious", "attack", "attackers' acks", "attackers merged", "validation", "shift (points)",
           "test", "test shift", "backdoor %", "shift vs silent", "parts held", "held", "s"],
          _matrix_rows(results['matrix']))}

## Each device before and after (its sub-model with the merged modules, as a module update installs them)
{_device_tables(results)}

## Fuzz: every `eclm/v1` topic against a running daemon
A private mosquitto, the real `eclm-cloud sync` daemon and one real `eclm-edge serve` (the target of the
cloud -> device topics) as subprocesses; three simulated honest devices (MQTT clients that verify the
daemon's signed acks, resend until acknowledged and follow module versions) send a delta each every few
seconds (the real delta of one device, x0.1 plus noise) and the edge trains on digits and sends real
deltas. The fuzzer (`bench/fuzz.py`) sends random bytes, random headers behind the right magic, mutated
valid messages (bytes flipped, cut, extended, spliced; header fields set to values of the wrong type or
range), oversize messages, chunked messages (complete, incomplete, corrupted, out of range) and the
pills of `bench/pills.py` (without the chunk floods and the export race, which the soak covers) to
device and cloud topics of honest and made-up device ids and to malformed topics. After every 500 it
waits for the daemon's signed answer to a probe, so the daemon has read them all (none is dropped by the
broker). Memory "before" is read after a warm-up round, "after" once the legitimate deltas are merged,
each as the lowest RSS over 10 s of quiet (what the process keeps: a merge round's working memory
comes and goes, about 16 MiB here, and a single reading lands on it or not); "peak" is the highest
reading during the whole run.
The gate margin and staleness limit are set wide and the minimum support to one device for the fuzz
(merge policy, tested by the matrix above, not here: a legitimate delta held or left waiting by them
would read as a loss).

{_fuzz_section(results['fuzz'])}
"""

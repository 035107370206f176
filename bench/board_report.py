"""The board test's report: its checks, its emulated figures and its wall time, as board.json and board.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import machine_info, md_table, write_results

EMULATED = ("measured under qemu-user emulation of aarch64 on the x86 host named above: emulated figures, "
             "not Raspberry Pi figures")


@dataclass
class Check:
    """One thing the board must do, whether it did, and what was seen."""

    name: str
    ok: bool
    detail: str

    def __post_init__(self) -> None:
        self.detail = " ".join(self.detail.split())  # one line in the table, whatever an error message held


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _pip(pip: dict[str, Any] | None) -> str:
    if not pip:
        return "–"
    if not pip["online"]:
        return ("offline from the cache folder's wheels (`PIP_NO_INDEX`), which an install from the index "
                "filled for this pyproject.toml within the last week")
    return (f"from the package index: pip downloaded {len(pip['downloaded_wheels'])} wheels, now kept in the "
            f"cache folder for the next runs")


def _ratio(emulated: dict[str, Any], native: dict[str, Any]) -> str:
    e, n = emulated.get("step_ms_median"), native.get("step_ms_median")
    return f"{e / n:.0f} times as long as" if e and n else "longer than"


def render(out: Path, res: dict[str, Any]) -> str:
    """Write ``board.json`` and ``board.md`` to ``out``; returns the markdown."""
    res = {**res, "machine": machine_info()}
    m, fig, t = res["machine"], res["figures"], res["timings"]
    tr, nat = fig.get("training", {}), fig.get("native", {})
    checks = res["checks"]
    passed = sum(c["ok"] for c in checks)
    rootfs = res["rootfs"]
    cached = rootfs["reused"] and "host_train_bank_s" not in t and "host_export_s" not in t
    lines = [
        "# The board: `eclm-edge` on an emulated arm64 Debian board", "",
        f"Command: `sudo make board-test` (runs `{res['command']}`), commit `{res['commit'][:10]}`, "
        f"{m['date']}; host {m['cpu']}, {m['cores']} cores. The rootfs, the digits bank and bundle and pip's downloads "
        f"are cached in the cache folder; this run {'reused all of them' if cached else 'built some of them'}.", "",
        f"**{passed} of {len(checks)} checks passed.** Times and latencies are {EMULATED}: emulation "
        f"translates every aarch64 instruction, and this run's training step took {_ratio(tr, nat)} the same "
        f"step run natively on the host; a Pi 4 (Cortex-A72) is neither. The host is shared (load average "
        f"{res['load_avg_1m']:.1f} on {m['cores']} cores when the run ended), so the times vary between runs.", "",
        "## What ran",
        f"- Rootfs: `{rootfs['command']}` (Debian bookworm, arm64; "
        f"{'reused, built ' + str(rootfs['built']) if rootfs['reused'] else 'built in this run'}, "
        f"{_f(rootfs.get('seconds'), '.0f')} s to build), entered with `chroot` and /proc, /dev mounted.",
        f"- Install inside, in a copy of the committed tree, with the README's Raspberry Pi command: "
        f"`{res['install_command']}` ({_f(t.get('install_s'), '.0f')} s emulated; "
        f"{_pip(fig.get('pip'))}). "
        f"Inside: Python {res['probe']['python']}, `platform.machine()` = {res['probe']['machine']}, "
        f"onnxruntime {res['probe']['onnxruntime']} (the package index's aarch64 wheel).",
        "- On the host: " + "; ".join(f"`{c}`" for c in res["host_commands"]) + ".",
        f"- Inside: `eclm-edge serve` (automatic training, drift and resource monitors off: the run decides "
        f"when to train, and emulated CPU and latency readings must not step the variant ladder down), driven "
        f"over HTTP from the host with the pool's digits of classes {','.join(map(str, res['classes']))}, "
        f"rotated by 25 degrees: {res['samples']['local']} samples posted, {res['samples']['test']} held out "
        f"for accuracy.", "",
        "## Checks",
        md_table(["check", "result", "seen"], [[c["name"], "ok" if c["ok"] else "FAILED", c["detail"]]
                                                for c in checks]), "",
        "## Emulated figures (qemu-user aarch64, not a Raspberry Pi)",
        md_table(["what", "value"], [
            ["`eclm-edge serve` start to first answer", f"{_f(t.get('serve_start_s'), '.1f')} s"],
            ["POST /v1/predict, batch 1, median of 20", f"{_f(fig.get('predict_http_ms_p50'), '.1f')} ms"],
            ["training step, median", f"{_f(fig.get('step_ms_emulated'), '.1f')} ms"],
            ["training run (steps, seconds)", f"{tr.get('steps', '–')} steps, {_f(tr.get('seconds'), '.1f')} s"],
            ["the same run natively on the host (x86_64, onnxruntime " + str(m.get("onnxruntime")) + "): step, "
             "median", f"{_f(nat.get('step_ms_median'), '.2f')} ms ({nat.get('steps', '–')} steps, "
                       f"{_f(nat.get('seconds'), '.1f')} s)"],
            ["holdout accuracy in the run", f"{_f(tr.get('holdout_before'), '.3f')} -> "
                                            f"{_f(tr.get('holdout_after'), '.3f')}"],
            ["held-out accuracy over HTTP", f"{_f(fig.get('acc_before'), '.3f')} -> {_f(fig.get('acc_after'), '.3f')}"],
        ]), "",
        "## Wall time of this run",
        md_table(["stage", "seconds"], [[k.removesuffix("_s").replace("_", " "), f"{v:.0f}"] for k, v in t.items()]),
        "",
    ]
    md = "\n".join(lines)
    write_results(out, "board", res, md)
    return md

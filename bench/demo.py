"""`eclm demo`: the whole loop on one machine, in drifting environments, in a few minutes.

The cloud trains the digits model; a broker starts (the one named, else a private mosquitto, else an
embedded pure-Python one); the merger daemon and three edge runtimes run as separate processes.
Each step, every device meets its environment of the moment (its class mix changes, a corruption
appears, CPU load appears and goes), is measured, collects labelled samples, adapts (drift-triggered
or scheduled fine-tuning, deltas to the cloud, merged modules back), and is measured again.

camera-3 classifies a frame every 0.2 s throughout, so its runtime always knows its own latency; when
CPU load comes (busy processes on every core), it judges its headroom by that latency against its
profile's budget, not by how busy the whole machine is (which this demo's own processes keep high).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import pyplot
from bench.corruptions import corrupt
from bench.procs import Edge, daemon, ledger_rows, wait_connected, wait_until
from bench.reaper import track


@dataclass(frozen=True)
class Phase:
    """A device's environment from a step on: its classes, a corruption, CPU load on the machine."""

    step: int
    classes: tuple[int, ...]
    corruption: str = "none"
    cpu_load: bool = False


@dataclass(frozen=True)
class DemoDevice:
    """One simulated site."""

    name: str
    profile: str
    phases: tuple[Phase, ...]
    camera: bool = False  # classifies a stream of frames (one every 0.2 s)

    def phase(self, step: int) -> Phase:
        return [p for p in self.phases if p.step <= step][-1]


DEVICES = (
    DemoDevice("line-1", "pi4", (Phase(0, (1, 4, 7)), Phase(2, (1, 4, 7), "rotation"))),
    DemoDevice("line-2", "pi4", (Phase(0, (0, 2, 5)), Phase(3, (0, 2, 5, 6, 8)))),
    DemoDevice("camera-3", "pi4", (Phase(0, (3, 6, 9), "noise"), Phase(4, (3, 6, 9), "noise", cpu_load=True),
                                   Phase(5, (3, 6, 9), "noise")), camera=True),
)


@dataclass
class StepRecord:
    """What one device looked like at one step."""

    device: str
    step: int
    environment: str
    accuracy_before: float
    accuracy_after: float
    uplink_bytes: float
    variant: str
    training: str


@dataclass
class DemoResult:
    """Everything the demo measured, and where it wrote its files."""

    workdir: Path
    bank_test_accuracy: float
    broker: str
    records: list[StepRecord] = field(default_factory=list)
    plot: Path | None = None
    seconds: float = 0.0
    cloud: dict[str, Any] = field(default_factory=dict)


def _env_name(p: Phase) -> str:
    return f"classes {','.join(map(str, p.classes))}" + (f", {p.corruption}" if p.corruption != "none" else "") + (
        ", CPU load" if p.cpu_load else "")


class FrameStream:
    """A camera: one frame predicted every ``interval`` seconds on a runtime, in a thread, until stopped."""

    def __init__(self, edge: Edge, frames: np.ndarray, interval: float = 0.2) -> None:
        self.edge, self.frames, self.interval = edge, frames, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"frames-{edge.device_id}", daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(self.interval):
            try:
                self.edge.post("/v1/predict", {"inputs": self.frames[i % len(self.frames)][None].tolist()})
            except OSError:
                pass  # the runtime is busy or restarting: the next frame comes anyway
            i += 1


class CpuLoad:
    """Busy processes, one per core, to make CPU pressure real."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def on(self, n: int = 2) -> None:
        while len(self.procs) < n:
            self.procs.append(track(subprocess.Popen([sys.executable, "-c", "while True: pass"])))

    def off(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []


def _samples(pool_x: np.ndarray, pool_y: np.ndarray, phase: Phase, n: int, rng: np.random.Generator,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(np.isin(pool_y, phase.classes))
    pick = rng.choice(idx, size=min(n, len(idx)), replace=False)
    return corrupt(pool_x[pick], phase.corruption, seed=seed), pool_y[pick]


def run_demo(workdir: Path, broker_url: str | None = None, steps: int = 6, seed: int = 0,
             progress: Callable[[str], None] | None = None,
             train_progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
             tls: bool = False) -> DemoResult:
    """Run the loop; every process it starts is stopped before it returns.

    With ``tls`` the demo makes a PKI in its work dir (``pki/``), starts its private mosquitto with the
    configuration `eclm-cloud broker-config` generates, and runs the daemon and edges over mqtts, each
    with its own certificate.
    """
    from bench.broker import CLOUD_NAME, EmbeddedBroker, ExternalBroker, Mosquitto, start_broker, start_tls_broker
    from eclm.signing import generate_keys
    from exporter.cloud import TrainOptions, train_bank
    from exporter.data import load_dataset, split
    from exporter.export import ExportRequest, export_bundle

    say = progress or (lambda _m: None)
    if tls:
        check_tls_demo(broker_url)
    t0 = time.time()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    logs = workdir / "logs"
    logs.mkdir()
    say("training the cloud model on digits (30% proxy split)")
    info = train_bank(TrainOptions(dataset="digits", bank_dir=workdir / "bank", seed=seed), train_progress)
    (workdir / "keys").mkdir()
    priv, pub = generate_keys(workdir / "keys")
    pki_dir: Path | None = None
    broker: Mosquitto | EmbeddedBroker | ExternalBroker
    if tls:
        broker, pki_dir = start_tls_broker(workdir, [d.name for d in DEVICES])
        say(f"broker at {broker.url} (mosquitto over TLS; certificates in {pki_dir}, config in "
            f"{workdir / 'broker-config'})")
    else:
        broker = start_broker(broker_url, workdir / "broker")
        say(f"broker at {broker.url} ({type(broker).__name__})")

    def tls_args(folder: str) -> list[str]:
        return [] if pki_dir is None else ["--tls-dir", str(pki_dir / folder)]

    sync = daemon(workdir / "bank", broker.url, priv, logs / "sync.log", "--round-deltas", str(len(DEVICES)),
                  "--round-seconds", "2", *tls_args(f"cloud/{CLOUD_NAME}"))
    edges: dict[str, Edge] = {}
    streams: list[FrameStream] = []
    load = CpuLoad()
    result = DemoResult(workdir, float(info.metrics["test_accuracy"]), broker.url)
    try:
        sync.start()
        wait_connected(sync)
        for dev in DEVICES:
            out = workdir / "bundles" / dev.name
            manifest = export_bundle(ExportRequest(workdir / "bank", profile=dev.profile, out_dir=out,
                                                   classes=list(dev.phases[0].classes), measure=False,
                                                   signing_key=priv))
            ladder = ", ".join(v["name"] for v in manifest.variants) or "none"
            say(f"exported the {dev.profile} bundle for {dev.name} (classes {dev.phases[0].classes}); "
                f"cheaper variants: {ladder}")
            env = {"ECLM_EDGE_RESOURCE_PATIENCE": "3"}
            edges[dev.name] = Edge(dev.name, out, workdir / "state" / dev.name, broker.url, pub,
                                   logs / f"{dev.name}.log", *tls_args(f"devices/{dev.name}"), env=env)
        for e in edges.values():
            e.start()
        pool = split(load_dataset("digits"), seed).pool
        rng = np.random.default_rng(seed)
        for dev in DEVICES:
            if dev.camera:
                frames, _ = _samples(pool.x, pool.y, dev.phases[0], 100, rng, seed + 7)
                streams.append(FrameStream(edges[dev.name], frames))
                streams[-1].thread.start()
        for step in range(steps):
            if any(d.phase(step).cpu_load for d in DEVICES):
                load.on()
            else:
                load.off()
            say(f"step {step + 1}/{steps}")
            tests: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for k, dev in enumerate(DEVICES):
                e, phase = edges[dev.name], dev.phase(step)
                tests[dev.name] = test_x, test_y = _samples(pool.x, pool.y, phase, 150, rng, seed + 100 * step + k)
                before = e.accuracy(test_x, test_y)
                x, y = _samples(pool.x, pool.y, phase, 80, rng, seed + 100 * step + k + 50)
                code, out = e.post("/v1/samples", {"inputs": x.tolist(), "labels": y.tolist()})
                status = e.get("/v1/status")
                training = _training_cell(e, out)
                result.records.append(StepRecord(dev.name, step, _env_name(phase), before, float("nan"),
                                                 0.0, _variant_cell(status), training))
            for e in edges.values():
                e.wait_outbox_empty(timeout=60)
            # Merged, held, or waiting for support: a module only one device trained waits (min devices 2).
            wait_until(lambda: all(s != "pending" or why == "waiting_support"
                                   for _, _, s, why in ledger_rows(workdir / "bank")), 60,
                       "the cloud to merge the round")
            time.sleep(1.5)  # module updates reach the devices
            for dev in DEVICES:
                e = edges[dev.name]
                rec = next(r for r in result.records if r.device == dev.name and r.step == step)
                rec.accuracy_after = e.accuracy(*tests[dev.name])
                rec.uplink_bytes = e.metric("eclm_edge_uplink_bytes_total")
                rec.variant = _variant_cell(e.get("/v1/status"))
        rows = ledger_rows(workdir / "bank")
        result.cloud = {s: sum(1 for r in rows if r[2] == s) for s in ("merged", "held", "rejected", "pending",
                                                                       "expired")}
    finally:
        for stream in streams:
            stream.stop.set()
        load.off()
        for e in edges.values():
            e.proc.kill()
        sync.kill()
        broker.stop()
    result.plot = plot_accuracy(result, workdir / "accuracy.png")
    result.seconds = time.time() - t0
    return result


def check_tls_demo(broker_url: str | None) -> None:
    """``--tls`` runs its own mosquitto (it needs the binary) and cannot use a broker someone else runs."""
    from bench.broker import mosquitto_binary
    from eclm.errors import ConfigError

    if broker_url:
        raise ConfigError("--tls starts the demo's own broker with the generated TLS configuration",
                          hint="drop --broker (ECLM_BROKER), or drop --tls")
    if mosquitto_binary() is None:
        raise ConfigError("--tls needs mosquitto", hint="apt-get install -y mosquitto")


def _variant_cell(status: dict[str, Any]) -> str:
    """The model that serves and, when the runtime has predictions to judge by, its own latency and budget."""
    variant = status["variant"]
    latency = (variant.get("readings") or {}).get("latency_ms_p95")
    if latency is None:
        return str(variant["name"])
    return f"{variant['name']} (p95 {latency:.2f} ms/sample, budget {variant['latency_budget_ms']:g})"


def _training_cell(e: Edge, samples_answer: dict[str, Any]) -> str:
    """What the device's training did this step, in the runtime's own words (never cut mid-word).

    The runtime pauses automatic training when it lacks headroom and says why in the samples answer;
    the demo respects that pause as a scheduled run would, and otherwise asks for a run.
    """
    drift = "drift; " if samples_answer.get("drift") else ""
    if samples_answer.get("training_paused"):
        return f"{drift}paused: {samples_answer.get('training_reason', '').removeprefix('automatic training paused: ')}"
    last = e.train_and_wait()
    if last.get("accepted"):
        return f"{drift}served"
    reason = str(last.get("reason", "")).split(": not served")[0]
    return f"{drift}not served: {reason}"


def plot_accuracy(result: DemoResult, path: Path) -> Path | None:
    """Accuracy before and after adaptation per step and device, as a PNG."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for dev in DEVICES:
        recs = sorted((r for r in result.records if r.device == dev.name), key=lambda r: r.step)
        xs, ys = [], []
        for r in recs:
            xs += [r.step + 1, r.step + 1.5]
            ys += [r.accuracy_before, r.accuracy_after]
        line = ax.plot(xs, ys, marker="o", label=dev.name)[0]
        for p in dev.phases[1:]:
            ax.axvline(p.step + 0.95, color=line.get_color(), linestyle=":", alpha=0.6)
    ax.set_xlabel("adaptation step: before at n, after at n + 0.5 (dotted: that device's environment changes)")
    ax.set_ylabel("accuracy on the current environment")
    ax.set_ylim(0, 1.02)
    ax.set_title("ECLM demo: accuracy before and after each adaptation step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(result: DemoResult) -> str:
    """The per-device table the demo ends with."""
    lines = ["| device | step | environment | accuracy before -> after | uplink bytes (total) | variant | training |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result.records, key=lambda r: (r.device, r.step)):
        lines.append(f"| {r.device} | {r.step + 1} | {r.environment} | {r.accuracy_before:.3f} -> "
                     f"{r.accuracy_after:.3f} | {r.uplink_bytes:,.0f} | {r.variant} | {r.training} |")
    return "\n".join(lines)

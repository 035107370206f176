"""`eclm bench --suite soak`: hostile messages for a bounded time while honest devices train.

A private mosquitto, the real ``eclm-cloud sync`` daemon and real ``eclm-edge serve`` processes (one
pi4 bundle, exported once and re-issued for each honest device, see :func:`issue_for`) run as
subprocesses. Honest devices are fed labelled digits over their HTTP API and trained in a loop, so
they send real deltas; an attacker client sends every pill of :mod:`bench.pills` on its schedule plus
random garbage until ``duration`` ends. Then the honest devices' outboxes are given time to drain
and the run is judged (:mod:`bench.soak_report`): the daemon is alive, every honest delta reached the
ledger and was merged in exactly one round, no outbox entry vanished without reaching the ledger,
daemon and edge memory stayed bounded, ``/metrics`` stayed small.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import pills as pillbox
from bench.broker import Mosquitto
from bench.procs import Edge, Proc, _cmd, daemon, wait_connected, wait_until

Say = Callable[[str], None]
MODULE = "head"  # every bundle holds it, so every pill aimed at a module aims here
# --min-devices 1: the soak checks that every honest delta is merged exactly once, and the last one a device
# sends may have no other device's delta beside it (support from several devices is tested in tests/).
DAEMON_ARGS = ("--round-deltas", "3", "--round-seconds", "3", "--gate-margin", "1.0", "--max-staleness", "50",
               "--min-devices", "1")


@dataclass
class SoakRun:
    """What a soak measured while it ran (judged and rendered by :mod:`bench.soak_report`)."""

    duration: float
    pills: list[str]
    devices: list[str]
    produced: dict[str, list[str]] = field(default_factory=dict)  # device -> honest delta ids, in order
    training_errors: dict[str, list[str]] = field(default_factory=dict)
    sent: dict[str, dict[str, int]] = field(default_factory=dict)  # pill -> firings, messages, bytes
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # process -> (s, bytes)
    attack_seconds: float = 0.0
    drain_seconds: float = 0.0
    daemon_exit: int | None = None
    daemon_died_at: float | None = None  # seconds after the attack began (later than it: in the drain)
    edges_exited: dict[str, int] = field(default_factory=dict)
    outbox_left: dict[str, list[str]] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    metrics_bytes: int | None = None
    daemon_log_tail: str = ""
    setup_seconds: float = 0.0


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a live process (VmRSS), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Sampler:
    """Samples the resident memory of named processes once a second in a thread."""

    def __init__(self, procs: dict[str, Proc], into: dict[str, list[tuple[float, int]]]) -> None:
        self.procs, self.into = procs, into
        self.stop = threading.Event()
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for name, proc in self.procs.items():
                pid = proc.proc.pid if proc.proc is not None else None
                value = rss_bytes(pid) if pid is not None else None
                if value is not None:
                    self.into.setdefault(name, []).append((time.time() - self.t0, value))


class HonestDevice:
    """Feeds one edge fresh labelled samples and asks it to train, in a loop, until stopped."""

    def __init__(self, edge: Edge, x: np.ndarray, y: np.ndarray, seed: int, run: SoakRun) -> None:
        self.edge, self.x, self.y, self.run = edge, x, y, run
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"honest-{edge.device_id}", daemon=True)

    def _loop(self) -> None:
        dev = self.edge.device_id
        while not self.stop.is_set():
            try:
                delta_id = self.edge.feed_and_train(self.x, self.y, self.rng)
                if delta_id:
                    self.run.produced.setdefault(dev, []).append(delta_id)
            except Exception as exc:  # a dead or wedged edge is a finding, not a reason to stop the run
                self.run.training_errors.setdefault(dev, []).append(f"{type(exc).__name__}: {exc}"[:300])
                if not self.edge.proc.alive():
                    return
                self.stop.wait(2.0)
            self.stop.wait(0.5)


class Attacker:
    """One MQTT client that sends the pills; it also overhears module updates to learn current versions."""

    def __init__(self, port: int, ctx: pillbox.PillContext) -> None:
        import paho.mqtt.client as mqtt

        self.ctx = ctx
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-attacker-{time.time_ns()}",
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError("the attacker could not connect to the broker")

    def _on_connect(self, c: Any, *_: Any) -> None:
        c.subscribe(pillbox.device_topic(self.ctx.honest[0], "update"), qos=0)
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        from eclm import wire

        try:
            msg = wire.decode(bytes(m.payload))
            if isinstance(msg, wire.ModuleUpdateMessage):
                for pid, v in msg.versions.items():
                    self.ctx.versions[pid] = max(int(v), self.ctx.versions.get(pid, 1))
        except Exception:  # noqa: S110 - chunks and anything else are of no interest to the attacker
            pass

    def send(self, pill: pillbox.Pill, sent: dict[str, dict[str, int]]) -> None:
        pubs = pillbox.build(pill, self.ctx)
        row = sent.setdefault(pill.name, {"firings": 0, "messages": 0, "bytes": 0})
        row["firings"] += 1
        for topic, payload in pubs:
            self.client.publish(topic, payload, qos=1)
            row["messages"] += 1
            row["bytes"] += len(payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _setup_bank(work: Path, say: Say) -> tuple[Path, Path, Path, Path]:
    """A quickly trained digits bank, a key pair from ``eclm-cloud keys``, and one signed pi4 bundle."""
    from exporter.cloud import TrainOptions, train_bank
    from exporter.export import ExportRequest, export_bundle

    bank = work / "bank"
    say("training a small digits bank (3 epochs, 1 enhancing epoch)")
    train_bank(TrainOptions(dataset="digits", bank_dir=bank, seed=0, epochs=3, enhance_epochs=1))
    subprocess.run(_cmd("cloud_sync.cli", "eclm-cloud", "keys", "--out", str(work / "keys")), check=True,
                   stdout=subprocess.DEVNULL)
    priv, pub = work / "keys" / "signing.key", work / "keys" / "signing.pub"
    say("exporting one signed pi4 bundle for the honest devices")
    bundle = work / "bundle"
    export_bundle(ExportRequest(bank, profile="pi4", out_dir=bundle, measure=False, signing_key=priv))
    return bank, priv, pub, bundle


def issue_for(bundle: Path, device: str, key: Path, target: Path) -> Path:
    """The bundle re-issued for one device: its manifest names the device and is signed by the cloud's key
    again, as ``eclm-export --device-id`` would write it (one export serves every honest device, which keeps
    the set-up short on a small machine).
    """
    from eclm.manifest import copy_bundle, read_manifest, write_manifest
    from eclm.signing import load_signer

    target.mkdir(parents=True)
    copy_bundle(bundle, target)
    manifest = read_manifest(target)
    manifest.device_id = device
    write_manifest(target, manifest, load_signer(key))
    return target


def _context(bank: Path, bundle: Path, honest: list[str]) -> pillbox.PillContext:
    """What the attacker knows; the importance of the honest bundle gives profiles the bank's shape."""
    from eclm.manifest import read_manifest
    from module_bank import DirectoryBank

    b = DirectoryBank(bank)
    info = b.info()
    shapes = {n: tuple(a.shape) for n, a in b.read_part(MODULE).items() if a.dtype.kind == "f"}
    importance = [[float(v) for v in row] for row in read_manifest(bundle).importance]
    return pillbox.PillContext(info.bank_id, MODULE, shapes, {MODULE: info.parts[MODULE].version}, honest,
                               importance=importance)


def _ledger_facts(bank: Path, produced: list[str]) -> dict[str, Any]:
    """Through the ledger's own API: each honest delta's status and the rounds it was merged in."""
    from cloud_sync.daemon import LEDGER
    from module_bank import Ledger

    ledger = Ledger(bank / LEDGER)
    try:
        versions = ledger.versions()
        rounds_of: dict[str, set[int]] = {}
        foreign: list[str] = []  # versions made (in part) from deltas that no honest device produced
        for part in versions:
            for entry in ledger.lineage(part):
                if entry["round"] is None:
                    continue
                for d in entry["deltas"]:
                    rounds_of.setdefault(d, set()).add(int(entry["round"]))
                if set(entry["deltas"]) - set(produced):
                    foreign.append(f"{part} v{entry['version']}")
        summary = ledger.summary()
        return {"status": {d: ledger.known(d) for d in produced},
                "merged_in_rounds": {d: sorted(rounds_of.get(d, ())) for d in produced},
                "foreign_versions": foreign, "rounds": ledger.next_round() - 1, "module_version": versions.get(MODULE),
                "deltas": summary["deltas"], "rejected_by_reason": summary["rejected_by_reason"]}
    finally:
        ledger.close()


def _outbox_ids(work: Path, devices: list[str]) -> dict[str, list[str]]:
    """Delta ids still in each honest device's outbox (read through the outbox's own API)."""
    from edge_runtime.outbox import Outbox

    return {d: [p.stem.split("-", 1)[1] for p in Outbox(work / f"state-{d}" / "outbox").pending()] for d in devices}


def _drain(run: SoakRun, work: Path, bank: Path, sync: Proc, timeout: float) -> None:
    t0 = time.time()

    def settled() -> bool:
        if not sync.alive():
            if run.daemon_died_at is None:
                run.daemon_died_at = run.attack_seconds + time.time() - t0
            return True
        if any(_outbox_ids(work, run.devices).values()):
            return False
        ids = [i for ids in run.produced.values() for i in ids]
        status = _ledger_facts(bank, ids)["status"]
        return all(s not in (None, "pending") for s in status.values())

    try:
        wait_until(settled, timeout, "honest deltas to be acknowledged and merged", interval=1.0)
    except TimeoutError:
        pass
    run.drain_seconds = time.time() - t0


def run_soak(duration: float, pills: list[pillbox.Pill], say: Say, devices: int = 3,
             drain: float = 120.0) -> SoakRun:
    """Set up, attack for ``duration`` seconds while honest devices train, drain, measure; stops everything."""
    from exporter.data import load_dataset, split

    t_setup = time.time()
    work = Path(tempfile.mkdtemp(prefix="eclm-soak-"))
    honest = [f"honest-{i}" for i in range(devices)]
    run = SoakRun(duration, [p.name for p in pills], honest)
    broker = Mosquitto(work / "broker")
    edges: dict[str, Edge] = {}
    drivers: list[HonestDevice] = []
    attacker: Attacker | None = None
    sampler: Sampler | None = None
    sync: Proc | None = None
    try:
        bank, priv, pub, bundle = _setup_bank(work, say)
        broker.start()
        sync = daemon(bank, broker.url, priv, work / "sync.log", *DAEMON_ARGS)
        sync.start()
        wait_connected(sync)
        say(f"daemon up (pid {sync.proc.pid if sync.proc else '?'}); starting {devices} honest edges")
        for dev in honest:
            mine = issue_for(bundle, dev, priv, work / f"bundle-{dev}")
            edges[dev] = Edge(dev, mine, work / f"state-{dev}", broker.url, pub, work / f"{dev}.log",
                              env={"ECLM_EDGE_RESOURCE_INTERVAL_S": "0"})
            edges[dev].start()
        pool = split(load_dataset("digits"), 0).pool
        for k, e in enumerate(edges.values()):
            drivers.append(HonestDevice(e, pool.x, pool.y, k, run))
        sampler = Sampler({"daemon": sync, **{d: e.proc for d, e in edges.items()}}, run.rss)
        sampler.thread.start()
        ctx = _context(bank, bundle, honest)
        attacker = Attacker(broker.port, ctx)
        run.setup_seconds = time.time() - t_setup
        say(f"soak: {duration:.0f} s of {', '.join(run.pills) or 'no pills (honest only)'}")
        for d in drivers:
            d.thread.start()
        t0 = time.time()
        due = {p.name: t0 for p in pills}
        while time.time() - t0 < duration:
            if not sync.alive():
                run.daemon_died_at = time.time() - t0
                say(f"the daemon exited after {run.daemon_died_at:.0f} s; ending the attack")
                break
            for p in pills:
                if time.time() >= due[p.name]:
                    attacker.send(p, run.sent)
                    due[p.name] += p.every
            time.sleep(0.1)
        run.attack_seconds = time.time() - t0
        for d in drivers:
            d.stop.set()
        for d in drivers:
            d.thread.join(200)
        say("attack over; waiting for the honest outboxes to drain")
        _drain(run, work, bank, sync, drain)
        sampler.stop.set()
        run.outbox_left = _outbox_ids(work, honest)
        run.edges_exited = {d: e.proc.proc.returncode for d, e in edges.items()
                            if e.proc.proc is not None and e.proc.proc.poll() is not None}
        if sync.alive():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{sync.metrics_port}/metrics", timeout=60) as r:
                    run.metrics_bytes = len(r.read())
            except OSError as exc:
                say(f"/metrics did not answer: {exc}")
        elif sync.proc is not None:
            run.daemon_exit = sync.proc.returncode
        run.ledger = _ledger_facts(bank, [i for ids in run.produced.values() for i in ids])
        run.daemon_log_tail = "\n".join(line[:400] for line in sync.tail(25).splitlines())  # events are long
    finally:
        if sampler is not None:
            sampler.stop.set()
        for d in drivers:
            d.stop.set()
        if attacker is not None:
            attacker.close()
        for e in edges.values():
            e.proc.kill(signal.SIGTERM)
        if sync is not None:
            sync.kill(signal.SIGTERM)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return run

"""`eclm bench --suite attack`, part 2: fuzzed messages on every ``eclm/v1`` topic against a running daemon.

A private mosquitto, the real ``eclm-cloud sync`` daemon and one real ``eclm-edge serve`` (the target
of the cloud -> device topics) run as subprocesses. Honest devices send legitimate deltas the whole
time: the edge trains on digits every few seconds, and simulated devices (MQTT clients that verify
the cloud's signed acks and resend until acknowledged, as the runtime's outbox does) send deltas
made from a real training run. Meanwhile a fuzzer sends ``messages`` messages of :mod:`bench.fuzz`
in batches; after each batch it sends a probe (a valid delta from an unknown device) and waits for
the daemon's signed "rejected" ack, so the daemon has read everything before it and the fuzzer
never runs ahead of it (nothing piles up in the broker). Then the honest devices stop, their deltas
are given time to be merged, and the run is judged: the daemon and the edge never exited, daemon
memory before the fuzz and after the drain, and the ledger status of every legitimate delta.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import fuzz
from bench.broker import Mosquitto
from bench.procs import Edge, Proc, daemon, wait_connected, wait_until
from bench.soak import Sampler, issue_for, rss_bytes
from eclm import topics, wire

Say = Callable[[str], None]
BATCH = 500  # fuzz messages between two probes
# Last, so they win: the gate, staleness and the minimum support are merge policy, not under test here (the
# poisoning matrix tests them); with the default two devices per module the fleet's last lone delta would wait.
FIXED_DAEMON_ARGS = ("--round-deltas", "4", "--round-seconds", "3", "--gate-margin", "1.0",
                     "--max-staleness", "100000", "--min-devices", "1")


@dataclass
class FuzzRun:
    """What the fuzz measured (judged and rendered by :mod:`bench.attack_report`)."""

    target: int
    sent: int = 0
    sent_by_kind: dict[str, int] = field(default_factory=dict)
    sent_by_topic_kind: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    legit: dict[str, list[str]] = field(default_factory=dict)  # device -> delta ids it sent
    legit_status: dict[str, str | None] = field(default_factory=dict)
    training_errors: list[str] = field(default_factory=list)
    daemon_exit: int | None = None
    edge_exit: int | None = None
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    rss_before: dict[str, int | None] = field(default_factory=dict)
    rss_after: dict[str, int | None] = field(default_factory=dict)
    probe_timeouts: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    deltas: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    handler_errors: int = 0  # "handling a message ... failed" in the daemon's log: caught, but a finding
    daemon_args: list[str] = field(default_factory=list)
    options_not_passed: list[str] = field(default_factory=list)
    setup_seconds: float = 0.0
    fuzz_seconds: float = 0.0
    drain_seconds: float = 0.0
    daemon_log_tail: str = ""


def daemon_options(options: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` merge options as ``eclm-cloud sync`` flags (``limits.max_staleness`` -> ``--max-staleness``).

    Returns the flags and the options the daemon's command line has no flag for (reported, not passed).
    """
    import typer.main

    from cloud_sync.cli import app

    sync = typer.main.get_command(app).commands["sync"]  # type: ignore[attr-defined]
    flags = {o for p in sync.params for o in p.opts}
    args, skipped = [], []
    for opt in options:
        key, _, value = opt.partition("=")
        flag = "--" + key.strip().rsplit(".", 1)[-1].replace("_", "-")
        if flag in flags:
            args += [flag, value]
        else:
            skipped.append(opt)
    return args, skipped


class SimDevice:
    """A device as the runtime's sync is: profile on connect, deltas resent until a verified ack, versions followed."""

    def __init__(self, name: str, port: int, template: Any, verifier: Any, importance: list[list[float]],
                 seed: int) -> None:
        import paho.mqtt.client as mqtt

        self.name, self.template, self.verifier, self.importance = name, template, verifier, importance
        self.rng = np.random.default_rng(seed)
        self.versions = {pid: int(v) for pid, v in template.base_versions.items()}
        self.pending: dict[str, bytes] = {}
        self.sent: list[str] = []
        self.lock = threading.Lock()
        self.reassembler = wire.Reassembler()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{name}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError(f"{name} could not connect to the broker")

    def _on_connect(self, c: Any, *_: Any) -> None:
        c.subscribe([(topics.ack(self.name), 1), (topics.update(self.name), 1)])
        msg = wire.ProfileMessage(self.name, self.template.bank_id, "sim", self.importance, 100, profile_name="pi4",
                                  modules=dict(self.versions), trainable=True)
        c.publish(topics.profile(self.name), wire.encode(msg), qos=1)
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        try:  # anything unverifiable is ignored, as the runtime does (the fuzzer writes to these topics too)
            msg = wire.decode(bytes(m.payload), self.verifier, max_bytes=16 * 2**20)
            if isinstance(msg, wire.ChunkMessage):
                whole = self.reassembler.add(msg, topics.kind_of(str(m.topic)))
                if whole is None:
                    return
                msg = wire.decode(whole, self.verifier, max_bytes=64 * 2**20)
            if isinstance(msg, wire.AckMessage) and msg.device_id == self.name:
                with self.lock:
                    self.pending.pop(msg.delta_id, None)
            elif isinstance(msg, wire.ModuleUpdateMessage) and msg.device_id == self.name:
                with self.lock:
                    for pid, v in msg.versions.items():
                        if pid in self.versions:
                            self.versions[pid] = max(self.versions[pid], int(v))
        except Exception:  # noqa: S110 - refused, as a device refuses what it cannot verify
            pass

    def send(self) -> None:
        """A new delta: the real template x0.1 plus noise, on the versions last heard of."""
        tensors = {k: (v * 0.1 + self.rng.normal(0, 1e-5, v.shape)).astype(np.float32)
                   for k, v in self.template.tensors.items()}
        with self.lock:
            msg = replace(self.template, delta_id=uuid.uuid4().hex, device_id=self.name, tensors=tensors,
                          base_versions=dict(self.versions), created=time.time())
            data = wire.encode(msg, codec="int8+zlib")
            self.pending[msg.delta_id] = data
            self.sent.append(msg.delta_id)
        self.client.publish(topics.delta(self.name), data, qos=1)

    def resend(self) -> None:
        with self.lock:
            items = list(self.pending.items())
        for _, data in items:
            self.client.publish(topics.delta(self.name), data, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class EdgeDriver:
    """Feeds the real edge labelled digits and asks it to train every ``every`` seconds."""

    def __init__(self, edge: Edge, x: np.ndarray, y: np.ndarray, every: float, run: FuzzRun) -> None:
        self.edge, self.x, self.y, self.every, self.run = edge, x, y, every, run
        self.rng = np.random.default_rng(1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="fuzz-edge-driver", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                delta_id = self.edge.feed_and_train(self.x, self.y, self.rng)
                if delta_id:
                    self.run.legit.setdefault(self.edge.device_id, []).append(delta_id)
            except Exception as exc:  # a wedged or dead edge is a finding, not a reason to stop
                self.run.training_errors.append(f"{type(exc).__name__}: {exc}"[:300])
                if not self.edge.proc.alive():
                    return
            self.stop.wait(self.every)


class Prober:
    """Sends a valid delta from an unknown device and waits for the daemon's signed "rejected" ack."""

    DEVICE = "fuzz-probe"

    def __init__(self, port: int, ctx: fuzz.FuzzContext, verifier: Any) -> None:
        import paho.mqtt.client as mqtt

        self.ctx, self.verifier = ctx, verifier
        self.acked: set[str] = set()
        self.cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzzer-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)

        def on_connect(c: Any, *_: Any) -> None:
            c.subscribe(topics.ack(self.DEVICE), qos=1)
            ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the fuzzer could not connect to the broker")

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        try:
            msg = wire.decode(bytes(m.payload), self.verifier)
        except Exception:
            return
        if isinstance(msg, wire.AckMessage):
            with self.cond:
                self.acked.add(msg.delta_id)
                self.cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def probe(self, timeout: float) -> bool:
        small = {k: np.zeros(s, np.float32) + 1e-4 for k, s in self.ctx.shapes.items()}
        msg = wire.DeltaMessage(uuid.uuid4().hex, self.DEVICE, self.ctx.bank_id, "probe", {self.ctx.module: 1},
                                {self.ctx.module: sorted(small)}, small, 1)
        self.publish(topics.delta(self.DEVICE), wire.encode(msg))
        with self.cond:
            return self.cond.wait_for(lambda: msg.delta_id in self.acked, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def settled_rss(procs: dict[str, Proc], seconds: float = 10.0, every: float = 0.5) -> dict[str, int | None]:
    """Each process's lowest RSS over ``seconds`` of quiet: what it keeps, without the working memory of the
    moment (a merge round's arrays come and go, about 16 MiB here). A leak raises this floor; a peak does not.
    """
    low: dict[str, int | None] = {name: None for name in procs}
    end = time.time() + seconds
    while True:
        for name, p in procs.items():
            value = rss_bytes(p.proc.pid) if p.proc else None
            prev = low[name]
            if value is not None:
                low[name] = value if prev is None else min(prev, value)
        if time.time() >= end:
            return low
        time.sleep(every)


def _ledger(bank: Path, ids: list[str]) -> tuple[dict[str, str | None], dict[str, Any]]:
    from cloud_sync.daemon import LEDGER
    from module_bank import Ledger

    ledger = Ledger(bank / LEDGER)
    try:
        return {d: ledger.known(d) for d in ids}, {**ledger.summary(), "quarantined": len(ledger.quarantined())}
    finally:
        ledger.close()


def _context(bank: Path, bundle: Path, honest: list[str], seed: int) -> fuzz.FuzzContext:
    from eclm.manifest import read_manifest
    from module_bank import DirectoryBank

    b = DirectoryBank(bank)
    shapes = {n: tuple(a.shape) for n, a in b.read_part("head").items() if a.dtype.kind == "f"}
    importance = [[float(v) for v in row] for row in read_manifest(bundle).importance]
    return fuzz.FuzzContext(b.info().bank_id, "head", shapes, honest, importance,
                            rng=np.random.default_rng(seed))


def run_fuzz(source_bank: Path, source_bundle: Path, template: Any, messages: int, options: Sequence[str], say: Say,
             sims: int = 3, every: float = 6.0, drain: float = 180.0, seed: int = 0) -> FuzzRun:
    """Fuzz ``messages`` messages while honest devices send deltas, drain, measure; stops everything.

    ``source_bank`` is copied (the daemon changes its copy); ``source_bundle`` is re-issued and signed for
    the edge; ``template`` is a real delta message of that bank, from which the simulated devices' deltas
    are made.
    """
    from eclm.signing import generate_keys, load_verifier
    from exporter.data import load_dataset, split

    t0 = time.time()
    run = FuzzRun(messages)
    work = Path(tempfile.mkdtemp(prefix="eclm-attack-fuzz-"))
    broker = Mosquitto(work / "broker")
    procs: dict[str, Proc] = {}
    sim_devs: list[SimDevice] = []
    driver: EdgeDriver | None = None
    prober: Prober | None = None
    sampler: Sampler | None = None
    try:
        bank, bundle = work / "bank", source_bundle
        shutil.copytree(source_bank, bank, ignore=shutil.ignore_patterns("sync.sqlite*", "sync-client-id"))
        (work / "keys").mkdir()
        priv, pub = generate_keys(work / "keys")
        verifier = load_verifier(pub)
        pool = split(load_dataset("digits"), 0).pool
        broker.start()
        mapped, run.options_not_passed = daemon_options(options)
        run.daemon_args = [*mapped, *FIXED_DAEMON_ARGS]
        sync = daemon(bank, broker.url, priv, work / "sync.log", *run.daemon_args)
        procs["daemon"] = sync
        sync.start()
        wait_connected(sync)
        edge_id = "edge-0"
        edge = Edge(edge_id, issue_for(bundle, edge_id, priv, work / "bundle-edge"), work / "state-edge", broker.url,
                    pub, work / "edge.log", env={"ECLM_EDGE_RESOURCE_INTERVAL_S": "0"})
        edge.start()
        procs["edge"] = edge.proc
        ctx = _context(bank, bundle, [edge_id] + [f"sim-{i}" for i in range(sims)], seed)
        sim_devs = [SimDevice(f"sim-{i}", broker.port, template, verifier, ctx.importance, seed + i)
                    for i in range(sims)]
        prober = Prober(broker.port, ctx, verifier)
        sampler = Sampler(procs, run.rss)
        sampler.thread.start()
        say("warm-up: one delta from every simulated device, merged, before memory is read")
        for s in sim_devs:
            s.send()
        wait_until(lambda: all(st not in (None, "pending")
                               for st in _ledger(bank, [i for s in sim_devs for i in s.sent])[0].values()),
                   120, "the warm-up deltas to be merged", interval=1.0)
        run.rss_before = settled_rss(procs)
        run.setup_seconds = time.time() - t0
        driver = EdgeDriver(edge, pool.x, pool.y, every, run)
        driver.thread.start()
        say(f"fuzzing {messages:,} messages (probe every {BATCH}); daemon RSS "
            f"{(run.rss_before.get('daemon') or 0) / 2**20:.0f} MiB")
        t_fuzz = time.time()
        last_honest = time.time()
        next_report = 10_000
        while run.sent < messages and sync.alive():
            batch = 0
            while batch < BATCH and run.sent < messages:
                for kind, topic, payload in fuzz.next_messages(ctx):
                    prober.publish(topic, payload)
                    run.sent += 1
                    batch += 1
                    run.bytes_sent += len(payload)
                    run.sent_by_kind[kind] = run.sent_by_kind.get(kind, 0) + 1
                    tk = topic.rsplit("/", 1)[-1] if topic.count("/") == 4 else "malformed topic"
                    run.sent_by_topic_kind[tk] = run.sent_by_topic_kind.get(tk, 0) + 1
            if not prober.probe(60.0):
                run.probe_timeouts += 1
            if time.time() - last_honest >= every:
                last_honest = time.time()
                for s in sim_devs:
                    s.resend()
                    s.send()
            if run.sent >= next_report:
                next_report += 10_000
                say(f"  {run.sent:,} sent in {time.time() - t_fuzz:.0f} s; daemon "
                    f"{(rss_bytes(sync.proc.pid) or 0) / 2**20 if sync.proc else 0:.0f} MiB")
        run.fuzz_seconds = time.time() - t_fuzz
        driver.stop.set()
        driver.thread.join(200)
        say(f"fuzz done in {run.fuzz_seconds:.0f} s; draining the honest deltas")
        t_drain = time.time()
        for s in sim_devs:
            run.legit[s.name] = list(s.sent)

        def settled() -> bool:
            if not sync.alive():
                return True
            for s in sim_devs:
                s.resend()
            ids = [i for v in run.legit.values() for i in v]
            return all(st not in (None, "pending") for st in _ledger(bank, ids)[0].values())

        try:
            wait_until(settled, drain, "legitimate deltas to be merged", interval=3.0)
        except TimeoutError:
            pass
        run.drain_seconds = time.time() - t_drain
        run.rss_after = settled_rss(procs)
        for name, p in procs.items():
            if not p.alive():
                code = p.proc.returncode if p.proc is not None else -1
                if name == "daemon":
                    run.daemon_exit = code
                else:
                    run.edge_exit = code
        run.legit_status, summary = _ledger(bank, [i for v in run.legit.values() for i in v])
        run.rejected_by_reason = dict(summary["rejected_by_reason"])
        run.deltas = dict(summary["deltas"])
        run.quarantined = int(summary["quarantined"])
        log_text = sync.log.read_text(errors="replace")
        run.handler_errors = log_text.count("handling a message on")
        run.daemon_log_tail = "\n".join(line[:300] for line in sync.tail(20).splitlines())
    finally:
        if sampler is not None:
            sampler.stop.set()
        if driver is not None:
            driver.stop.set()
        for s in sim_devs:
            s.close()
        if prober is not None:
            prober.close()
        for p in procs.values():
            p.kill(signal.SIGTERM)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return run

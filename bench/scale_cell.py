"""One cell of the scale benchmark: a broker, the merger's worker process(es), a ledger backend, a fleet.

The number of workers and the bank's location go to ``eclm-cloud sync`` as ``--workers N`` (only when
N is not 1) and ``--bank DIR`` or ``--bank postgresql://...``; a command line that refuses them makes
the cell "not available" with the CLI's error line, never a crash. The ledger is read through
:class:`module_bank.Ledger` (never raw SQL).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.broker import Mosquitto
from bench.common import pct
from bench.procs import Proc, daemon, wait_connected
from bench.scale_fleet import Fleet, Sent, Shapes, delta_messages

Say = Callable[[str], None]
PG_ROOT = "postgresql://postgres@127.0.0.1:5432"
PARTS = ("head",)  # the modules every simulated device holds and trains


class NotAvailable(Exception):
    """The command line refused a flag this cell needs (``--workers``, a PostgreSQL bank)."""


def cli_error(text: str) -> str:
    """The line of a CLI's output that says what was refused."""
    lines = [ln.strip(" │|\t") for ln in text.splitlines() if ln.strip(" │|\t╭╰─")]
    hits = [ln for ln in lines if "rror" in ln or "No such option" in ln or "nvalid" in ln]
    return (hits or lines or ["no output"])[-1][:300]


@dataclass
class Backend:
    """Where a cell's bank and ledger live: a fresh copy of the cached bank, or a fresh PostgreSQL database."""

    kind: str  # sqlite | postgresql
    work: Path
    location: str = ""
    dbname: str = ""

    def create(self, cached_bank: Path) -> None:
        if self.kind == "sqlite":
            bank = self.work / "bank"
            shutil.copytree(cached_bank, bank, ignore=shutil.ignore_patterns("sync.sqlite*", "sync-client-id"))
            self.location = str(bank)
            return
        self.dbname = f"eclm_scale_{uuid.uuid4().hex[:10]}"
        _psql(f"CREATE DATABASE {self.dbname}")
        self.location = f"{PG_ROOT}/{self.dbname}"
        from module_bank import copy_bank

        copy_bank(cached_bank, self.location)  # the same bank (id, tensors, validation secret) in PostgreSQL

    def drop(self) -> None:
        if self.dbname:
            _psql(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")
            self.dbname = ""


def _psql(sql: str) -> None:
    done = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise NotAvailable(f"psql: {cli_error(done.stderr)}")


class LedgerView:
    """Read-only figures from the cell's ledger through its Python interface."""

    def __init__(self, location: str) -> None:
        from module_bank import read_ledger

        self.ledger = read_ledger(location)

    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.ledger.summary()["deltas"].items()}

    def devices(self) -> int:
        return self.ledger.device_count()

    def status(self, delta_id: str) -> str | None:
        return self.ledger.known(delta_id)

    def lineage(self, part: str) -> list[dict[str, Any]]:
        return list(self.ledger.lineage(part))

    def rounds(self) -> int:
        return int(self.ledger.next_round()) - 1

    def close(self) -> None:
        self.ledger.close()


class Sampler:
    """Peak resident memory of the broker and of the workers (the sync process and its children), every 0.5 s."""

    def __init__(self, broker_pid: int, sync: Proc) -> None:
        self.broker_pid = broker_pid
        self.sync = sync
        self.peak = {"broker": 0, "workers": 0}
        self.cpu = {"broker": 0.0, "workers": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eclm-scale-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        import psutil

        for key, procs in (("broker", _procs(self.broker_pid, False)), ("workers", worker_procs(self.sync))):
            rss, cpu = 0, 0.0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system
                except psutil.Error:
                    pass
            self.peak[key] = max(self.peak[key], rss)
            self.cpu[key] = max(self.cpu[key], cpu)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


def _procs(pid: int | None, children: bool) -> list[Any]:
    import psutil

    if pid is None:
        return []
    try:
        top = psutil.Process(pid)
        return [top, *(top.children(recursive=True) if children else [])]
    except psutil.Error:
        return []


def worker_procs(sync: Proc) -> list[Any]:
    """The sync process and its children (the worker processes of ``--workers N``)."""
    return _procs(sync.proc.pid if sync.proc is not None else None, True)


@dataclass
class Cell:
    """One measurement: devices, workers, backend; how deltas are published and what the daemon is told."""

    devices: int
    workers: int
    backend: str
    spread: float = 0.0  # seconds over which the deltas are published (0: as fast as possible)
    connections: int = 0  # 0: one per 50 devices, 1..200
    round_deltas: int = 0  # 0: a quarter of the fleet
    round_seconds: float = 5.0
    timeout: float = 600.0
    extra: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        rate = f", within {self.spread:g} s" if self.spread else ""
        return f"{self.devices} devices, {self.workers} worker(s), {self.backend}{rate}"


class Rig:
    """Broker, backend and daemon of one cell, started in order and always torn down."""

    def __init__(self, cell: Cell, cached_bank: Path, key: Path, work: Path) -> None:
        self.cell, self.cached_bank, self.key, self.work = cell, cached_bank, key, work
        self.broker = Mosquitto(work / "broker")
        self.backend = Backend(cell.backend, work)
        self.sync: Proc | None = None
        self.view: LedgerView | None = None

    def daemon_args(self) -> list[str]:
        c = self.cell
        rd = c.round_deltas or max(10, c.devices // 4)
        args = ["--round-deltas", str(rd), "--round-seconds", f"{c.round_seconds:g}", "--max-staleness", "1000",
                "--derive-interval", "3600", *c.extra]
        return args + (["--workers", str(c.workers)] if c.workers != 1 else [])

    def start(self) -> None:
        self.broker.start()
        self.backend.create(self.cached_bank)
        self.sync = daemon(Path(self.backend.location), self.broker.url, self.key, self.work / "sync.log",
                           *self.daemon_args())
        self.sync.args[self.sync.args.index("--bank") + 1] = self.backend.location  # a URL stays a URL
        self.start_sync()
        self.view = LedgerView(self.backend.location)

    def start_sync(self) -> None:
        assert self.sync is not None
        self.sync.start()
        try:
            wait_connected(self.sync)
        except RuntimeError as exc:
            raise NotAvailable(cli_error(str(exc))) from exc
        time.sleep(1.0 + 0.5 * self.cell.workers)  # every worker subscribed

    def stop(self) -> None:
        if self.view is not None:
            self.view.close()
        if self.sync is not None:
            self.sync.kill(15)
        self.broker.stop()
        self.backend.drop()


def _latencies(fleet: Fleet, t0: float) -> dict[str, Any]:
    rec = fleet.record
    with rec.lock:
        acks = dict(rec.acks)
        updates = dict(rec.updates)
    sent = fleet.sent
    stored = {d: t for d, (t, st) in acks.items() if st == "stored"}
    ack_ms = [(t - sent[d].at) * 1e3 for d, (t, _s) in acks.items() if d in sent]
    first_pub = {s.device: s.at for s in sent.values()}
    upd_ms = [(t - first_pub[dev]) * 1e3 for dev, t in updates.items() if dev in first_pub]
    statuses: dict[str, int] = {}
    for _t, st in acks.values():
        statuses[st] = statuses.get(st, 0) + 1
    return {"acked": len(acks), "ack_statuses": statuses, "updated_devices": len(updates),
            "update_messages": rec.update_messages,
            "ack_ms_p50": pct(ack_ms, 50), "ack_ms_p99": pct(ack_ms, 99), "ack_ms_max": max(ack_ms, default=None),
            "update_ms_p50": pct(upd_ms, 50), "update_ms_p99": pct(upd_ms, 99),
            "stored_per_s": len(stored) / max(1e-9, max(stored.values()) - t0) if stored else 0.0}


def run_cell(cell: Cell, cached_bank: Path, key: Path, work: Path, say: Say,
             fault: Callable[[Rig, Fleet, list[Sent]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run one cell and return its figures (or ``available: False`` with the refused flag's error)."""
    work.mkdir(parents=True, exist_ok=True)
    rig = Rig(cell, cached_bank, key, work)
    out: dict[str, Any] = {"devices": cell.devices, "workers": cell.workers, "backend": cell.backend,
                           "spread_s": cell.spread, "daemon_args": rig.daemon_args()}
    fleet: Fleet | None = None
    sampler: Sampler | None = None
    try:
        rig.start()
        assert rig.view is not None and rig.sync is not None and rig.broker.proc is not None
        view = rig.view
        shapes = Shapes.of_bank(Path(rig.backend.location), PARTS) if cell.backend == "sqlite" \
            else Shapes.of_bank(cached_bank, PARTS)
        ids = [f"scale-{i:05d}" for i in range(cell.devices)]
        conns = cell.connections or min(200, max(1, cell.devices // 50))
        fleet = Fleet(rig.broker.port, ids, conns)
        fleet.connect()
        sampler = Sampler(rig.broker.proc.pid, rig.sync)
        t = time.perf_counter()
        fleet.publish_profiles(shapes)
        if not fleet.wait(lambda: view.devices() >= cell.devices, cell.timeout, 0.5):
            raise TimeoutError(f"only {view.devices()} of {cell.devices} profiles reached the ledger")
        out["profiles_s"] = time.perf_counter() - t
        sent = delta_messages(shapes, ids)
        say(f"  {cell.name}: {conns} connections; profiles known after {out['profiles_s']:.1f} s; publishing")
        # A fault run publishes half here and the rest once a round has merged (see bench.scale_fault).
        t0 = fleet.publish(sent if fault is None else sent[: len(sent) // 2], cell.spread)
        out["publish_s"] = time.perf_counter() - t0
        if fault is not None:
            out["fault"] = fault(rig, fleet, sent[len(sent) // 2:])
        merged_at = [0.0]
        in_ledger_at = [0.0]

        def settled() -> bool:
            counts = view.counts()
            if not in_ledger_at[0] and sum(counts.values()) >= len(sent):
                in_ledger_at[0] = time.perf_counter()
            if in_ledger_at[0] and not counts.get("pending", 0) and not merged_at[0]:
                merged_at[0] = time.perf_counter()  # every delta in the ledger and none pending, acked or not
            done = len(fleet.record.acks) >= len(sent) and not counts.get("pending", 0)
            return done and len(fleet.record.updates) >= len(fleet.record.acks) - _not_stored(fleet)

        out["settled"] = _wait_settled(settled, fleet, view, cell, say)
        missing = fleet.unacked()
        out["unacked_sample"] = {s.delta_id: view.status(s.delta_id) for s in missing[:5]}
        out.update(_latencies(fleet, t0))
        counts = view.counts()
        out["ledger"] = counts
        out["rounds"] = view.rounds()
        end = merged_at[0] or time.perf_counter()
        out["merged_per_s"] = counts.get("merged", 0) / max(1e-9, end - t0)
        out["all_merged_after_s"] = end - t0 if merged_at[0] else None
        # The store rate from the ledger (polled every 0.5 s), whether or not every ack came back.
        out["ledger_stored_per_s"] = len(sent) / (in_ledger_at[0] - t0) if in_ledger_at[0] else None
        out["payload_bytes"] = len(sent[0].payload) if sent else 0
        # A delta stored just before a kill is acked "duplicate" when its device resends it: it counts too.
        out["exactly_once"] = exactly_once(view, [d for d, (_t, st) in fleet.record.acks.items()
                                                  if st in ("stored", "duplicate")])
        # Every delta sent, acked or not (an ack can be lost on the way back): the ledger's view.
        out["exactly_once_all_sent"] = exactly_once(view, sorted(fleet.sent))
        out["available"] = True
    except NotAvailable as exc:
        out.update(available=False, error=str(exc))
        say(f"  {cell.name}: not available: {exc}")
    except Exception as exc:  # one failed cell is reported and the grid goes on
        out.update(available=False, failed=True, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        say(f"  {cell.name}: FAILED: {out['error']}")
    finally:
        if sampler is not None:
            sampler.stop()
            out["broker_rss_mib"] = sampler.peak["broker"] / 2**20
            out["workers_rss_mib"] = sampler.peak["workers"] / 2**20
            out["broker_cpu_s"] = sampler.cpu["broker"]
            out["workers_cpu_s"] = sampler.cpu["workers"]
        if fleet is not None:
            fleet.close()
        rig.stop()
        out["daemon_disconnects"] = _count_lines(work / "sync.log", "); reconnecting")  # not the final stop
        out["broker_keepalive_kicks"] = _count_lines(work / "broker" / "mosquitto.log", "exceeded timeout")
    return out


STALL_S = 60.0  # nothing new acked, updated or merged for this long: stop waiting and report what is missing


def _wait_settled(settled: Callable[[], bool], fleet: Fleet, view: LedgerView, cell: Cell, say: Say) -> bool:
    deadline = time.time() + cell.timeout
    last: tuple[Any, ...] = ()
    changed = told = time.time()
    while time.time() < deadline:
        if settled():
            return True
        now = time.time()
        seen = (len(fleet.record.acks), len(fleet.record.updates), tuple(sorted(view.counts().items())))
        if seen != last:
            last, changed = seen, now
        elif now - changed > STALL_S:
            say(f"  stalled for {STALL_S:.0f} s: acked {seen[0]}, updated {seen[1]}, ledger {dict(seen[2])}")
            return False
        if now - told > 30:
            told = now
            say(f"  acked {seen[0]}, updated {seen[1]}, ledger {dict(seen[2])}")
        time.sleep(0.5)
    return settled()


def _count_lines(path: Path, text: str) -> int:
    try:
        return sum(1 for ln in path.read_text(errors="replace").splitlines() if text in ln)
    except OSError:
        return 0


def _not_stored(fleet: Fleet) -> int:
    with fleet.record.lock:
        return sum(1 for _t, st in fleet.record.acks.values() if st != "stored")


def exactly_once(view: LedgerView, stored: list[str]) -> dict[str, Any]:
    """Every delta acknowledged as stored (or duplicate) is merged, and sits in exactly one version's lineage
    per part it carries.
    """
    seen: dict[str, int] = {}
    for part in PARTS:
        for version in view.lineage(part):
            for d in version["deltas"]:
                key = f"{part}:{d}"
                seen[key] = seen.get(key, 0) + 1
    not_merged = [d for d in stored if view.status(d) != "merged"]
    counts = [seen.get(f"{p}:{d}", 0) for d in stored for p in PARTS]
    return {"stored": len(stored), "not_merged": len(not_merged), "not_merged_sample": not_merged[:5],
            "in_no_lineage": sum(1 for c in counts if c == 0), "in_several_lineages": sum(1 for c in counts if c > 1),
            "ok": bool(stored) and not not_merged and all(c == 1 for c in counts)}

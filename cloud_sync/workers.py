"""`eclm-cloud sync --workers N`: N merger processes on this machine, supervised.

Each worker is the same `eclm-cloud sync` with ``--workers 1``, its own MQTT client id
(``<id>-w<i>``), its own metrics port (``port + i``) and the shared subscription group, so the broker
splits the device topics among them (MQTT 5 ``$share/<group>/...``). A worker that exits is started
again after a back-off (1 s doubling to 30 s; reset once it ran a minute); SIGTERM or Ctrl-C stops them all, and
SIGUSR1 (merge what is pending now) is passed on to them.
Workers on other machines join by running `eclm-cloud sync --share-group <group>` against the same
PostgreSQL bank and broker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("eclm.sync.workers")
OVERRIDDEN = ("--workers", "--share-group", "--client-id", "--metrics-port")  # set per worker by the supervisor
BACKOFF_MAX = 30.0


def worker_argv(argv: list[str]) -> list[str]:
    """The command line of one worker: ``argv`` (after the program name) without the options set per worker."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in OVERRIDDEN:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 1.0
    restarts: int = 0
    next_start: float = 0.0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Starts, watches and restarts the worker processes."""

    def __init__(self, n: int, argv: list[str], client_id: str, group: str, metrics_port: int) -> None:
        self.n, self.argv, self.client_id, self.group, self.metrics_port = n, worker_argv(argv), client_id, group, \
            metrics_port
        self.workers = [_Worker(i) for i in range(n)]
        self.stopping = False

    def command(self, i: int) -> list[str]:
        port = self.metrics_port + i if self.metrics_port else 0
        return [sys.executable, "-m", "cloud_sync.cli", *self.argv, "--workers", "1", "--share-group", self.group,
                "--client-id", f"{self.client_id}-w{i}", "--metrics-port", str(port)]

    def _start(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(self.command(w.index), env=os.environ.copy())
        w.started = time.time()
        log.info("worker %d started (pid %d, client %s-w%d)", w.index, w.proc.pid, self.client_id, w.index)

    def poll(self, now: float) -> None:
        """Restart workers that exited (after their back-off)."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                code = w.proc.returncode
                w.exits.append(code)
                w.proc = None
                if now - w.started > 60:
                    w.backoff = 1.0
                w.next_start = now + w.backoff
                log.warning("worker %d exited with %d; starting it again in %.0f s", w.index, code, w.backoff)
                w.backoff = min(BACKOFF_MAX, w.backoff * 2)
                w.restarts += 1
            if w.proc is None and not self.stopping and now >= w.next_start:
                self._start(w)

    def stop(self, grace: float = 30.0) -> None:
        self.stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def merge_now(self) -> None:
        """Pass SIGUSR1 on: every worker tries the round at once, and the round's claim lets one merge."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGUSR1)

    def run(self) -> None:
        """Run until SIGTERM or Ctrl-C; SIGUSR1 is passed on to the workers."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGUSR1, lambda *_: self.merge_now())
        try:
            while not self.stopping:
                self.poll(time.time())
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

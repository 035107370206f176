"""The scale benchmark's fault run: ``kill -9`` of one worker while a round has merged some deltas and others wait.

After the kill the worker is started again (by the supervisor of ``--workers N`` if it does that, else by
us), and the simulated devices resend what was not acknowledged, as a device's outbox does. The cell
then settles and :func:`bench.scale_cell.exactly_once` counts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from bench.scale_cell import Rig, worker_procs
from bench.scale_fleet import Fleet, Sent

RESEND_AFTER = 15.0  # seconds without an ack before a simulated device resends its delta


def kill_mid_round(rig: Rig, fleet: Fleet, rest: list[Sent], timeout: float = 120) -> dict[str, Any]:
    """Once a round has merged the first half, publish ``rest`` and kill one worker while its deltas are
    pending or merging; restart it; resend until every delta is acknowledged.
    """
    assert rig.view is not None and rig.sync is not None and rig.sync.proc is not None
    view = rig.view
    out: dict[str, Any] = {}
    deadline = time.time() + timeout
    while time.time() < deadline and not view.counts().get("merged", 0):
        time.sleep(0.05)
    fleet.publish(rest)
    half = max(1, min(len(rest), rig.cell.round_deltas or max(10, rig.cell.devices // 4)) // 2)
    counts = view.counts()
    while time.time() < deadline:  # enough of the rest stored that a round is due or running
        counts = view.counts()
        if counts.get("pending", 0) >= half:
            break
        time.sleep(0.02)
    out["ledger_at_kill"] = counts
    out["mid_round"] = bool(counts.get("merged", 0) and counts.get("pending", 0))
    procs = worker_procs(rig.sync)
    top = rig.sync.proc.pid
    victim = next((p.pid for p in procs[1:]), top)  # a worker child if the supervisor has any
    out["workers_before"] = len(procs)
    out["killed"] = "the sync process" if victim == top else "a worker child"
    t = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    if victim == top:
        rig.sync.proc.wait(30)
        rig.sync.proc = None
        rig.start_sync()
        out["restarted_by"] = "the benchmark (same command line)"
    else:
        back = _wait(lambda: len(worker_procs(rig.sync)) >= len(procs) and victim not in
                     {p.pid for p in worker_procs(rig.sync)}, 30)
        out["restarted_by"] = "the supervisor" if back else "nobody (the supervisor did not replace it in 30 s)"
    out["restart_s"] = time.perf_counter() - t
    resent = 0
    while time.time() < deadline:
        missing = fleet.unacked()
        if not missing:
            break
        now = time.perf_counter()
        for s in missing:
            if now - s.at > RESEND_AFTER:
                fleet.send(s)
                resent += 1
        time.sleep(0.5)
    out["resent"] = resent
    return out


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return bool(cond())

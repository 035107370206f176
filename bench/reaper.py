"""The processes a benchmark or demo run started, stopped when the run ends however it ends.

Each suite stops what it started in its own ``finally``; a signal that lands between a start and that
``try`` (or a suite that forgot) would leave a daemon, broker or runtime running after the run. Every
start goes through :func:`track`, and the entry points call :func:`stop_started` last.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

_started: list[subprocess.Popen[Any]] = []
_lock = threading.Lock()


def track(proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    """Remember ``proc`` so that :func:`stop_started` stops it if it is still running then."""
    with _lock:
        _started[:] = [p for p in _started if p.poll() is None]
        _started.append(proc)
    return proc


def stop_started(grace_s: float = 10) -> int:
    """SIGTERM every tracked process still running, SIGKILL those that outlive ``grace_s``; how many ran."""
    with _lock:
        running = [p for p in _started if p.poll() is None]
        _started.clear()
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return len(running)


def _terminated(signum: int, _frame: object) -> None:
    print(f"stopped by signal {signum}; stopping what the run started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def unwind_on_sigterm() -> None:
    """SIGTERM (a timeout, a supervisor) unwinds like Ctrl-C, so every ``finally`` runs."""
    signal.signal(signal.SIGTERM, _terminated)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """A benchmark entry point: SIGTERM unwinds, and whatever ``main`` started and did not stop is stopped."""
    unwind_on_sigterm()
    try:
        raise SystemExit(main())
    finally:
        stop_started()

"""The worker supervisor passes SIGUSR1 (merge what is pending now) on to every running worker.

Real parts: real child processes and signals; the workers are small Python processes that record the signal
(the real worker, `eclm-cloud sync`, is driven by tests/test_sync_pills_e2e.py and tests/test_sync_workers.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from cloud_sync.workers import Supervisor

CHILD = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGUSR1, lambda *_: Path(sys.argv[1]).write_text("asked"))
print("ready", flush=True)
time.sleep(60)
"""


def test_sigusr1_reaches_every_worker(tmp_path: Path) -> None:
    sup = Supervisor(2, ["sync", "--bank", str(tmp_path)], "cid", "grp", 0)
    marks = [tmp_path / f"w{i}" for i in range(2)]
    for w, mark in zip(sup.workers, marks, strict=True):
        w.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(mark)], stdout=subprocess.PIPE, text=True)
        assert w.proc.stdout is not None and w.proc.stdout.readline().strip() == "ready"
    try:
        sup.merge_now()
        deadline = time.monotonic() + 10
        while not all(m.exists() for m in marks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(m.read_text() == "asked" for m in marks)
        assert all(w.proc is not None and w.proc.poll() is None for w in sup.workers)  # asked, not killed
    finally:
        for w in sup.workers:
            if w.proc is not None:
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait()

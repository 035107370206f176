"""A benchmark stopped by SIGTERM (a timeout, a supervisor) stops the processes it started.

Real parts: the bench CLI's entry point in a child Python process, a real grandchild process, real signals.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import sys, time
from pathlib import Path

import pytest
from bench import cli
from bench.procs import Proc

def fake_app():  # stands in for a suite: starts a daemon-like process, stops it in its finally
    p = Proc([sys.executable, "-c", "import time; time.sleep(600)"], Path(sys.argv[1]))
    p.start()
    print(p.proc.pid, flush=True)
    try:
        time.sleep(600)
    finally:
        p.kill()

def careless_app():  # the signal lands between a start and its try: no finally of the suite's own runs
    p = Proc([sys.executable, "-c", "import time; time.sleep(600)"], Path(sys.argv[1]))
    p.start()
    print(p.proc.pid, flush=True)
    time.sleep(600)

cli.app = fake_app if sys.argv[2] == "careful" else careless_app
cli.main()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("suite", ["careful", "careless"])
def test_sigterm_stops_what_the_run_started(tmp_path: Path, suite: str) -> None:
    bench = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "proc.log"), suite],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert bench.stdout is not None
        grandchild = int(bench.stdout.readline())
        assert _alive(grandchild)
        bench.terminate()
        _, err = bench.communicate(timeout=30)
        assert bench.returncode == 128 + 15 and "stopped by signal 15" in err
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild)
    finally:
        bench.kill()

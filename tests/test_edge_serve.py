"""`eclm-edge serve` as a real process: a failed start is one line and an exit code and leaves nothing
behind, one runtime per state directory, and an unreachable broker is said, not hidden.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from broker import Mosquitto, mosquitto_binary
from test_edge_support import PINNED_ENV, EdgeServer, child_env, edge_command, free_port

from eclm.errors import BundleError, ConfigError
from eclm.manifest import BundleManifest

Bundles = dict[str, tuple[Path, BundleManifest]]


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*edge_command(), "serve", *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(**PINNED_ENV))


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "  -> " in result.stderr  # what to do


def test_port_in_use_is_one_line_exit_17_and_creates_no_state_dir(pi4: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = tmp_path / "new" / "state"
        result = serve("--bundle", str(pi4), "--state-dir", str(state), "--port", str(port))
    assert_one_line_error(result, ConfigError.exit_code, "already in use", str(port))
    assert not (tmp_path / "new").exists()


def test_a_failed_start_leaves_no_state_dir(tmp_path: Path) -> None:
    result = serve("--bundle", str(tmp_path / "no-such-bundle"), "--state-dir", str(tmp_path / "state"),
                   "--port", str(free_port()))
    assert_one_line_error(result, BundleError.exit_code)
    assert not (tmp_path / "state").exists()
    result = serve("--state-dir", str(tmp_path / "state"), "--port", str(free_port()))  # no bundle at all
    assert_one_line_error(result, BundleError.exit_code, "nothing to serve")
    assert not (tmp_path / "state").exists()


def test_a_second_runtime_on_the_same_state_dir_is_refused(pi4: Path, tmp_path: Path, xy) -> None:
    first = EdgeServer(tmp_path / "state", pi4).start()
    try:
        assert (tmp_path / "state" / ".lock").read_text().strip() == str(first.proc.pid)  # type: ignore[union-attr]
        files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "state").rglob("*"))
        result = serve("--bundle", str(pi4), "--state-dir", str(tmp_path / "state"), "--port", str(free_port()))
        assert_one_line_error(result, ConfigError.exit_code, "in use by another runtime",
                              f"pid {first.proc.pid}")  # type: ignore[union-attr]
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "state").rglob("*")) == files
        r = first.request("POST", "/v1/predict", {"inputs": xy[0][:2].tolist()})
        assert r.status == 200
    finally:
        assert first.stop() == 0
    again = EdgeServer(tmp_path / "state").start()  # the lock goes with the process
    again.stop()


def test_the_lock_goes_with_a_killed_process(pi4: Path, tmp_path: Path) -> None:
    first = EdgeServer(tmp_path / "state", pi4).start()
    first.kill()
    EdgeServer(tmp_path / "state").start().stop()


def test_an_unreachable_broker_is_logged_and_shown_and_the_edge_serves_offline(pi4: Path, tmp_path: Path,
                                                                                xy) -> None:
    dead = free_port()  # nothing listens here
    srv = EdgeServer(tmp_path / "state", pi4, ["--train-every", "0", "--broker", f"mqtt://127.0.0.1:{dead}"]).start()
    try:
        deadline = time.time() + 60
        while "cannot be reached" not in srv.log():
            assert time.time() < deadline, srv.log()
            time.sleep(0.2)
        line = next(x for x in srv.log().splitlines() if "cannot be reached" in x)
        assert "WARNING" in line and f"127.0.0.1:{dead}" in line and "serving offline" in line
        assert "refused" in line.lower()  # the system's reason
        sync = srv.status()["sync"]
        assert sync["connected"] is False and sync["failed_attempts"] >= 1
        assert sync["broker"] == f"mqtt://127.0.0.1:{dead}" and "refused" in sync["last_error"].lower()
        assert sync["mode"].startswith("offline")
        assert srv.request("POST", "/v1/predict", {"inputs": xy[0][:2].tolist()}).status == 200
        assert srv.proc is not None and srv.proc.poll() is None  # no exit 19: the edge keeps serving
    finally:
        assert srv.stop() == 0


def test_without_a_broker_status_says_not_syncing(pi4: Path, tmp_path: Path) -> None:
    srv = EdgeServer(tmp_path / "state", pi4).start()
    try:
        assert srv.status()["sync"] == {"broker": None, "connected": False, "mode": "no broker configured: not syncing"}
    finally:
        srv.stop()


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_a_normal_shutdown_logs_no_warning(pi4: Path, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:
        srv = EdgeServer(tmp_path / "state", pi4, ["--train-every", "0", "--broker", broker.url]).start()
        deadline = time.time() + 60
        while not srv.status()["sync"]["connected"]:
            assert time.time() < deadline, srv.log()
            time.sleep(0.2)
        assert srv.status()["sync"]["last_error"] is None
        assert srv.stop() == 0
        log = srv.log()
        assert "connected to" in log
        # from serving on (the start-up warning about unsigned bundles is wanted: no --trust-key here)
        after_start = log.split("serving bundle", 1)[1]
        assert [x for x in after_start.splitlines() if "WARNING" in x or "ERROR" in x] == [], log
    finally:
        broker.stop()


def test_a_malformed_broker_url_is_exit_17_before_anything_is_written(pi4: Path, tmp_path: Path) -> None:
    result = serve("--bundle", str(pi4), "--state-dir", str(tmp_path / "state"), "--port", str(free_port()),
                   "--broker", "http://example:1883")
    assert_one_line_error(result, ConfigError.exit_code, "is not mqtt://HOST[:PORT]")
    assert not (tmp_path / "state").exists()

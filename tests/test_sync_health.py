"""The device's sync health without a broker: guarded callbacks, refusals by reason, dead threads restarted,
and per-install MQTT client ids."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from eclm.mqtt import install_client_id
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.sync_health import SyncHealth


class FakeClient:
    """Just what SyncHealth reads of a paho client: its loop thread, and loop_start()."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.starts = 0

    def loop_start(self) -> None:
        assert self._thread is None, "paho refuses loop_start() while it has a thread"
        self.starts += 1
        self._thread = threading.Thread(target=self.stop.wait, daemon=True)
        self._thread.start()


def _metric(m: EdgeMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture()
def health():
    client, metrics, stop = FakeClient(), EdgeMetrics(), threading.Event()
    h = SyncHealth(client, metrics, stop)
    yield h
    stop.set()
    client.stop.set()


def test_a_guarded_callback_never_raises_and_is_counted(health: SyncHealth, caplog: Any) -> None:
    def boom(*_a: Any) -> None:
        raise ValueError("Invalid pattern: '**' can only be an entire path component")

    safe = health.guard("on_message")(boom)
    with caplog.at_level(logging.DEBUG, logger="eclm.edge.sync"):
        for _ in range(3):
            safe(None, None, object())
    assert health.refused == {"callback_error": 3}
    assert _metric(health.metrics, "eclm_edge_sync_refused_total", reason="callback_error") == 3
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(loud) == 1 and "on_message failed" in loud[0].getMessage()  # once per reason


def test_a_dead_worker_and_a_dead_network_loop_are_restarted(health: SyncHealth) -> None:
    runs = []
    release = threading.Event()

    def worker() -> None:
        runs.append(1)
        if len(runs) > 1:
            release.wait()  # the restarted worker lives

    health.start_worker("outbox", worker)
    health.workers["outbox"][1].join(5)  # the first run died
    client: FakeClient = health.client
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    client._thread = dead  # paho's loop thread, ended by an exception
    report = health.check()
    assert report["threads"] == {"network": True, "outbox": True} and report["healthy"]
    assert report["thread_restarts"] == {"network": 1, "outbox": 1} and len(runs) == 2 and client.starts == 1
    assert _metric(health.metrics, "eclm_edge_sync_thread_restarts_total", thread="outbox") == 1
    assert _metric(health.metrics, "eclm_edge_sync_thread_alive", thread="network") == 1
    release.set()


def test_while_stopping_dead_threads_stay_dead(health: SyncHealth) -> None:
    health.start_worker("updates", lambda: None)
    health.workers["updates"][1].join(5)
    health.stop.set()
    report = health.check()
    assert report["threads"]["updates"] is False and report["thread_restarts"] == {}


def test_client_ids_are_per_install_and_stable(tmp_path: Path) -> None:
    a = install_client_id(tmp_path / "a", "eclm-edge-dev1")
    assert a == install_client_id(tmp_path / "a", "eclm-edge-dev1")  # stable across restarts
    b = install_client_id(tmp_path / "b", "eclm-edge-dev1")
    assert a != b and a.startswith("eclm-edge-dev1-") and len(a) == len("eclm-edge-dev1-") + 16
    (tmp_path / "a" / "mqtt-client-id").write_text("junk/#\n")
    c = install_client_id(tmp_path / "a", "eclm-edge-dev1")  # a damaged file gets a fresh suffix
    assert c not in (a, b) and c == install_client_id(tmp_path / "a", "eclm-edge-dev1")


@pytest.mark.parametrize("pattern", ["*", "x**", "[a-z]*", "?bc", "../abc"])
def test_the_outbox_drops_only_the_entry_named_exactly(tmp_path: Path, pattern: str) -> None:
    import numpy as np

    from eclm.errors import DataError
    from edge_runtime.outbox import Outbox

    box = Outbox(tmp_path / "outbox")
    box.put("abc", {"bank_id": "b"}, {"t": np.zeros(2, np.float32)})
    with pytest.raises(DataError, match="delta id"):
        box.ack(pattern)
    assert len(box) == 1 and box.holds("abc") and not box.holds("ab")
    assert box.ack("ab") is False and len(box) == 1
    assert box.ack("abc") is True and len(box) == 0 and box.known_ids() == {"abc"}

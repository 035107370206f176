"""Health of the device's MQTT side: callbacks that never raise into paho's thread, refusals counted
by reason and logged once per reason, and a check that sees (and restarts) a dead network loop or
worker thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("eclm.edge.sync")


class SyncHealth:
    """What the status 'sync' block and the ``eclm_edge_sync_*`` metrics report about the sync threads."""

    def __init__(self, client: Any, metrics: Any, stop: threading.Event) -> None:
        self.client = client
        self.metrics = metrics
        self.stop = stop
        self.workers: dict[str, tuple[Callable[[], None], threading.Thread]] = {}
        self.restarts: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.last_message_at: float | None = None
        self._lock = threading.Lock()

    # -- callbacks and refusals
    def guard(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., None]]:
        """Wrap a paho callback so that nothing it raises reaches paho's network thread."""
        def wrap(fn: Callable[..., Any]) -> Callable[..., None]:
            @functools.wraps(fn)
            def safe(*args: Any) -> None:
                try:
                    fn(*args)
                except Exception as exc:  # the network loop must outlive any one message
                    self.refuse("callback_error", f"{name} failed: {type(exc).__name__}: {exc}", exc_info=True)
            return safe
        return wrap

    def refuse(self, reason: str, detail: str, exc_info: bool = False) -> None:
        """Count a refused message (or failed callback) by reason; log the first of each reason loudly."""
        with self._lock:
            n = self.refused[reason] = self.refused.get(reason, 0) + 1
        self.metrics.sync_refused.labels(reason).inc()
        if n == 1:
            log.error("refused a broker message (%s): %s (further ones of this kind are counted in "
                      "eclm_edge_sync_refused_total{reason=%r} and logged at debug level)", reason, detail, reason,
                      exc_info=exc_info)
        else:
            log.debug("refused a broker message (%s): %s", reason, detail)

    def handled(self) -> None:
        self.last_message_at = time.time()
        self.metrics.sync_last_message.set(self.last_message_at)

    # -- threads
    def start_worker(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=f"eclm-{name}", daemon=True)
        self.workers[name] = (target, t)
        t.start()

    def join(self, timeout: float) -> None:
        """Wait for the worker threads to end (after ``stop``), at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        for _, t in list(self.workers.values()):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _network_thread(self) -> threading.Thread | None:
        return getattr(self.client, "_thread", None)  # paho keeps its loop_start() thread here

    def check(self) -> dict[str, Any]:
        """Whether each thread is alive; a dead one (while not stopping) is logged and restarted."""
        with self._lock:
            stopping = self.stop.is_set()
            loop = self._network_thread()
            loop_alive = loop is not None and loop.is_alive()
            if not loop_alive and not stopping and loop is not None:
                log.error("the MQTT network loop died; restarting it")
                self.client._thread = None  # what loop_stop() would leave behind
                self.client.loop_start()
                self._restarted("network")
                loop = self._network_thread()
                loop_alive = loop is not None and loop.is_alive()
            self.metrics.sync_thread_alive.labels("network").set(int(loop_alive))
            alive = {"network": loop_alive}
            for name, (target, t) in list(self.workers.items()):
                ok = t.is_alive()
                if not ok and not stopping:
                    log.error("the %s thread died; restarting it", name)
                    t = threading.Thread(target=target, name=f"eclm-{name}", daemon=True)
                    self.workers[name] = (target, t)
                    t.start()
                    self._restarted(name)
                    ok = t.is_alive()
                self.metrics.sync_thread_alive.labels(name).set(int(ok))
                alive[name] = ok
        return {"healthy": all(alive.values()) or stopping, "network_loop": loop_alive,
                "threads": alive, "thread_restarts": dict(self.restarts),
                "last_message_at": self.last_message_at, "refused": dict(self.refused)}

    def _restarted(self, name: str) -> None:
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self.metrics.sync_thread_restarts.labels(name).inc()

"""Incoming messages, handled in batches off the network thread: one transaction per batch, PUBACK after it.

The network thread only queues a message (it blocks when the queue is full, which holds the broker
back instead of growing memory). One thread takes everything queued, up to the batch size, lets
:meth:`SyncCore.handle_many` store it in one transaction, publishes the acks, and only then sends the
broker's PUBACKs (paho's manual acks): a message the broker saw acknowledged is in the ledger.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("eclm.sync")
QUEUE_MAX = 20_000  # messages waiting for the ingest thread before the network thread waits


class Ingest:
    """A queue and one thread that feeds it, in batches, to ``handle``."""

    def __init__(self, handle: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
                 publish: Callable[[list[tuple[str, bytes]]], None], ack: Callable[[int, int], None],
                 batch: int = 500) -> None:
        self.handle, self.publish, self.ack, self.batch = handle, publish, ack, batch
        self.queue: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue(maxsize=QUEUE_MAX)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.handled = 0
        self._thread: threading.Thread | None = None

    def put(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        """Queue one message (from the network thread)."""
        while not self.stop.is_set():
            try:
                self.queue.put((topic, payload, mid, qos), timeout=0.5)
                return
            except queue.Full:
                log.warning("ingest queue full (%d messages): the broker waits", QUEUE_MAX)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="eclm-ingest", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _take(self) -> list[tuple[str, bytes, int, int]]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        items = [first]
        while len(items) < self.batch:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                items = self._take()
                if items:
                    self.run_batch(items)
        except BaseException as exc:  # noqa: BLE001 - recorded; the daemon sees alive() False and exits
            self.error = exc
            log.critical("the ingest thread died: %s", exc, exc_info=True)

    def drain(self) -> int:
        """Handle everything queued now, in this thread (the loop does this when started); how many."""
        done = 0
        while True:
            try:
                items = [self.queue.get_nowait()]
            except queue.Empty:
                return done
            while len(items) < self.batch:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self.run_batch(items)
            done += len(items)

    def run_batch(self, items: list[tuple[str, bytes, int, int]]) -> None:
        pubs = self.handle([(t, p) for t, p, _m, _q in items])  # never raises (SyncCore.handle_many)
        self.publish(pubs)
        for _t, _p, mid, qos in items:
            if qos > 0:
                self.ack(mid, qos)
        self.handled += len(items)

    def close(self, timeout: float = 10.0) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)


def noop_ack(_mid: int, _qos: int) -> None:
    """For a client without manual acks."""


__all__: list[Any] = ["Ingest", "noop_ack"]

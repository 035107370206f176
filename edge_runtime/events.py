"""Where the runtime's components say what happened: a log line, then every listener (the sync client)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("eclm.edge")

Listener = Callable[[str, dict[str, Any]], None]


class EventSink:
    """Rollbacks, variant switches and drift, told to whoever listens; a failing listener is logged, never raised."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []

    def notify(self, event: str, detail: dict[str, Any]) -> None:
        log.info("%s: %s", event, detail)
        for listener in list(self.listeners):
            try:
                listener(event, detail)
            except Exception:  # a listener never breaks the runtime
                log.exception("listener failed on %s", event)

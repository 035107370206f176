"""Runs `eclm-edge serve`: bind the port, lock and open the state directory, serve, stop cleanly."""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.config import EdgeConfig


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what starting would create), or None."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def run(cfg: EdgeConfig, announce: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT. A start that fails (port in use, state directory held by another
    runtime, no valid bundle) raises an :class:`~eclm.errors.EclmError` and leaves no new folder behind.
    """
    from edge_runtime import http_api
    from edge_runtime.api_security import load_guard
    from edge_runtime.service import EdgeService

    guard = load_guard(cfg)  # beyond loopback without a token or TLS, or an unusable token file: refused first
    if cfg.broker:  # a malformed URL or an unreadable key fails before anything is bound or written
        from eclm.mqtt import BrokerUrl, check_tls
        from eclm.signing import load_verifier

        check_tls(BrokerUrl.parse(cfg.broker), cfg.tls_dir)
        if cfg.trust_key is not None:
            load_verifier(cfg.trust_key)
    server = http_api.bind(cfg, guard)  # a port in use fails here, before the state directory is touched
    created = _first_missing(cfg.state_dir.absolute())
    try:
        service = EdgeService(cfg)
    except BaseException:
        server.server_close()
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    server.service = service
    sync: Any = None
    try:
        service.start_monitors()
        if cfg.broker:
            from edge_runtime.sync import EdgeSync

            sync = EdgeSync(service)
            sync.start()

        def on_signal(_signum: int, _frame: object) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        s = service.serving
        announce(f"eclm-edge {cfg.device_id}: serving bundle {s.digest} (profile {s.manifest.profile['name']}, "
                 f"generation {s.generation}, training {'on' if s.trainable else 'off'}) "
                 f"on {guard.scheme}://{f'[{cfg.host}]' if ':' in cfg.host else cfg.host}:{server.server_address[1]}"
                 + (" (API token required)" if guard.token is not None else "")
                 + (f"; syncing through {sync.broker}" if sync is not None else "; no broker: not syncing"))
        server.serve_forever()
    finally:
        server.server_close()
        if sync is not None:
            sync.close()
        service.close()

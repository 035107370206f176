"""What the tests hand the merger daemon: the same exporter-built hooks `eclm-cloud sync` builds."""

from __future__ import annotations

from pathlib import Path

from cloud_sync.cli import build_hooks
from cloud_sync.ports import SyncHooks


def exporter_hooks(bank: Path | str, signing_key: Path | None = None, gate: bool = True) -> SyncHooks:
    """The bank, the torch gate evaluation (unless ``gate`` is off), bundle derivation signed with the key."""
    return build_hooks(bank, signing_key, gate)

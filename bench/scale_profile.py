"""Where a worker's time goes, without a broker: the daemon's own decision code (:class:`cloud_sync.core.SyncCore`)
fed the scale benchmark's messages in-process, each stage timed.

Stages: handling one delta (decode, checks, ledger commits), of which the ledger's commits (``store_delta``
and ``touch_device``, each one fsync'd SQLite transaction); a merge round per delta; a module update
per device (encode and sign).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.scale_fleet import Shapes, delta_messages, profile_bytes
from eclm import topics


def _timed(obj: Any, name: str, spent: dict[str, float]) -> None:
    inner = getattr(obj, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def stage_costs(bank: Path, key: Path, devices: int = 300, parts: tuple[str, ...] = ("head",)) -> dict[str, Any]:
    """Milliseconds per delta for handling and its ledger commits, per delta merged, per module update sent."""
    from cloud_sync.core import SyncCore, SyncSettings
    from cloud_sync.merger import MergeSettings
    from cloud_sync.validation import Limits
    from eclm.signing import load_signer

    work = Path(tempfile.mkdtemp(prefix="eclm-scale-profile-"))
    try:
        copy = work / "bank"
        shutil.copytree(bank, copy, ignore=shutil.ignore_patterns("sync.sqlite*", "sync-client-id"))
        from cloud_sync.cli import build_hooks

        core = SyncCore(SyncSettings(copy, round_deltas=devices, signing_key=key,
                                     merge=MergeSettings(limits=Limits(max_staleness=1000))), load_signer(key),
                        build_hooks(copy, key))
        spent: dict[str, float] = {}
        for name in ("store_deltas", "statuses", "known_devices", "support_counts"):
            _timed(core.ledger, name, spent)
        shapes = Shapes.of_bank(copy, parts)
        ids = [f"scale-{i:05d}" for i in range(devices)]
        for d in ids:
            core.handle(topics.profile(d), profile_bytes(shapes, d))
        spent.clear()
        sent = delta_messages(shapes, ids)
        t = time.perf_counter()
        batch = core.settings.ingest_batch  # as the daemon's ingest thread hands them over
        items = [(topics.delta(s.device), s.payload) for s in sent]
        acks = [p for i in range(0, len(items), batch) for p in core.handle_many(items[i:i + batch])]
        handle_s = time.perf_counter() - t
        t = time.perf_counter()
        result, updates = core.run_round()
        round_s = time.perf_counter() - t
        merge_s = result.seconds if result is not None else float("nan")
        core.derivations.close()
        core.ledger.close()
        per = 1e3 / devices
        return {"devices": devices, "acks": len(acks), "updates": len(updates),
                "handle_ms_per_delta": handle_s * per,
                "ledger_commit_ms_per_delta": spent.get("store_deltas", 0) * per,
                "ledger_lookup_ms_per_delta": (spent.get("statuses", 0) + spent.get("known_devices", 0)
                                               + spent.get("support_counts", 0)) * per,
                "merge_ms_per_delta": merge_s * per,
                "update_ms_per_device": (round_s - merge_s) * 1e3 / max(1, len(updates)),
                "merged": len(result.merged) if result is not None else 0}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def describe(p: dict[str, Any], say: Callable[[str], None] | None = None) -> str:
    text = (f"in-process, {p['devices']} deltas: handling {p['handle_ms_per_delta']:.2f} ms per delta, of which "
            f"ledger commits {p['ledger_commit_ms_per_delta']:.2f} ms and lookups {p['ledger_lookup_ms_per_delta']:.2f}"
            f" ms; merging {p['merge_ms_per_delta']:.2f} ms per delta; a module update {p['update_ms_per_device']:.2f}"
            " ms per device")
    if say is not None:
        say(text)
    return text

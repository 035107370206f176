"""Which pending contributions a round may merge: enough distinct devices per part, or wait, or expire.

A part is merged only when deltas of at least ``min_devices`` distinct devices (by the topic-bound device
id) carry it; until then its contributions wait in the ledger, still pending, for more devices. Waiting
contributions expire after ``max_age`` seconds since the delta arrived, after ``max_rounds`` merge rounds
of waiting, or once their base lags more than ``max_staleness`` versions behind; expiry is recorded and
counted (``eclm-cloud status``, metric ``eclm_sync_expired_parts``), never silent. Pure: no I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cloud_sync.strategies import Contribution
from module_bank import StoredDelta

log = logging.getLogger("eclm.sync.merge")


@dataclass(frozen=True)
class SupportRules:
    """How much support a part needs and how long its contributions may wait for it."""

    min_devices: int = 2
    max_age: float = 6 * 3600.0
    max_rounds: int = 10
    max_staleness: int = 10


@dataclass(frozen=True)
class Waiting:
    """One pending delta's contributions that a round has not merged yet."""

    delta_id: str
    device: str
    received: float
    waiting_since: int | None
    parts: dict[str, list[Contribution]]
    staleness: dict[str, int]


@dataclass
class Plan:
    """What a round does with each pending delta's remaining parts."""

    ready: dict[str, dict[str, list[Contribution]]] = field(default_factory=dict)  # delta -> part -> contributions
    waiting: dict[str, dict[str, str]] = field(default_factory=dict)  # delta -> part -> why it waits
    expired: dict[str, dict[str, str]] = field(default_factory=dict)  # delta -> part -> why it expired


def describe(devices: int, needed: int) -> str:
    return f"waits for support ({devices} of {needed} devices)"


def plan(pending: list[Waiting], rules: SupportRules, now: float, round_no: int) -> Plan:
    """Split every pending delta's remaining parts into ready, waiting and expired."""
    out = Plan()
    live: list[tuple[Waiting, str]] = []
    for w in pending:
        too_old = now - w.received > rules.max_age
        rounds = round_no - w.waiting_since if w.waiting_since is not None else 0
        for pid in w.parts:
            why = ""
            if too_old:
                why = f"waited {now - w.received:.0f} s for support (limit {rules.max_age:g} s)"
            elif rounds >= rules.max_rounds:
                why = f"waited {rounds} rounds for support (limit {rules.max_rounds})"
            elif w.staleness.get(pid, 0) > rules.max_staleness:
                why = f"its base is {w.staleness[pid]} versions behind (limit {rules.max_staleness})"
            if why:
                out.expired.setdefault(w.delta_id, {})[pid] = why
            else:
                live.append((w, pid))
    devices: dict[str, set[str]] = {}
    for w, pid in live:
        devices.setdefault(pid, set()).add(w.device)
    for w, pid in live:
        n = len(devices[pid])
        if n >= rules.min_devices:
            out.ready.setdefault(w.delta_id, {})[pid] = w.parts[pid]
        else:
            out.waiting.setdefault(w.delta_id, {})[pid] = describe(n, rules.min_devices)
    return out


def book(stored: dict[str, StoredDelta], p: Plan, outcomes: dict[str, dict[str, str]]
         ) -> tuple[list[str], list[str], dict[str, Any]]:
    """Final states and ledger records from a round's outcomes (delta -> part -> merged/held/dropped) and the
    plan's waiting and expired parts: merged ids, held ids, and the keyword arguments of
    :meth:`module_bank.Ledger.commit_round` (``done``, ``waiting``, ``expired``, ``expired_parts``,
    ``reasons``). A delta ends merged when a round merged any of its parts, held when rounds only held or
    dropped them, expired when all that was left of it expired; while parts wait it stays pending.
    """
    merged: list[str] = []
    held: list[str] = []
    done: dict[str, dict[str, str]] = {}
    waiting: dict[str, str] = {}
    expired: dict[str, str] = {}
    reasons: dict[str, str] = {}
    expired_parts = 0
    for delta_id, s in stored.items():
        gone = p.expired.get(delta_id, {})
        took = {**outcomes.get(delta_id, {}), **{pid: "expired" for pid in gone}}
        if not took and delta_id not in p.waiting:
            continue
        expired_parts += len(gone)
        for pid, why in gone.items():
            log.warning("delta %s from %s: part %s expired: %s", delta_id, s.device_id, pid, why)
        all_done = {**s.done, **took}
        done[delta_id] = all_done
        if delta_id in p.waiting:
            waiting[delta_id] = "; ".join(f"{pid} {why}" for pid, why in sorted(p.waiting[delta_id].items()))
        elif "merged" in all_done.values():
            merged.append(delta_id)
        elif "held" in all_done.values() or "dropped" in all_done.values():
            held.append(delta_id)
            if "held" not in all_done.values():
                reasons[delta_id] = "disagrees"
        else:
            expired[delta_id] = "; ".join(f"{pid}: {why}" for pid, why in sorted(gone.items()))
    return sorted(merged), sorted(held), {"done": done, "waiting": waiting, "expired": expired,
                                          "expired_parts": expired_parts, "reasons": reasons}

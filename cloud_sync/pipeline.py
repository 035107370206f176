"""The merge round's pure steps: gather, weight, aggregate, check, decide. Plain data in, plain data out.

A round (:meth:`cloud_sync.merger.Merger.run_round`) reads the ledger once, runs these steps, and hands
what they decided to its commit step, the only one that writes to the bank and the ledger. None of these
steps does I/O; the gate's evaluation is a function they are given (:data:`cloud_sync.ports.Evaluate`).
docs/sync.md, "The merge pipeline", lists the steps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from cloud_sync.ports import Evaluate, Params
from cloud_sync.strategies import STRATEGIES, Contribution, cap_shares
from cloud_sync.support import Waiting
from cloud_sync.weights import module_weight
from eclm import wire
from eclm.errors import DataError
from module_bank import StoredDelta

NO_CHANGE_NORM = 1e-7  # a merged change of a part below this L2 norm changes nothing: no new version
Importance = list[list[float]] | None


def _fault(exc: Exception) -> str:
    return f"cannot be merged: {type(exc).__name__}: {str(exc)[:200]}"


@dataclass(frozen=True)
class Decoded:
    """A stored delta and the message its payload decodes to."""

    stored: StoredDelta
    msg: wire.DeltaMessage


@dataclass
class Gathered:
    """Stored deltas decoded; the ones that cannot be (delta id -> why) are reported, not raised."""

    decoded: list[Decoded] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


def gather(stored: list[StoredDelta]) -> Gathered:
    """Decode every stored delta; whatever a stored payload does, it is that delta's fault alone."""
    out = Gathered()
    for s in stored:
        try:
            msg = wire.decode(s.payload)
            if not isinstance(msg, wire.DeltaMessage):
                raise DataError(f"a stored {msg.TYPE} message is not a delta")
            out.decoded.append(Decoded(s, msg))
        except Exception as exc:
            out.bad[s.delta_id] = _fault(exc)
    return out


@dataclass
class Weighted:
    """Each decoded delta's contributions to the parts no round has taken yet, with their merge weights."""

    waiting: list[Waiting] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


def weight(decoded: list[Decoded], parts: set[str], current: dict[str, int],
           importance: dict[str, Importance], weighting: str = "importance") -> Weighted:
    """Weights from what the cloud holds for each device (``importance`` by device id), samples and staleness.

    ``parts`` are the bank's part ids, ``current`` their versions. A delta naming a part the bank does not
    have, or whose weight is not a finite positive number, is reported in ``bad``.
    """
    out = Weighted()
    for d in decoded:
        s, msg = d.stored, d.msg
        try:
            contribs: dict[str, list[Contribution]] = {}
            staleness: dict[str, int] = {}
            for part_id, names in msg.parts.items():
                if part_id not in parts:
                    raise DataError(f"part {part_id!r} is not in the bank")
                w = module_weight(msg, part_id, current.get(part_id), importance.get(s.device_id), weighting)
                if part_id in s.done:
                    continue
                contribs[part_id] = [Contribution(msg.delta_id, {n: msg.tensors[n] for n in names}, w, s.device_id)]
                staleness[part_id] = max(0, current.get(part_id, 0) - msg.base_versions.get(part_id, 0))
            out.waiting.append(Waiting(s.delta_id, s.device_id, s.received, s.waiting_since, contribs, staleness))
        except Exception as exc:
            out.bad[s.delta_id] = _fault(exc)
    return out


def capped(contribs: list[Contribution], max_share: float) -> list[Contribution]:
    """The contributions with no device above ``max_share`` of their total weight (docs/sync.md)."""
    totals: dict[str, float] = defaultdict(float)
    for c in contribs:
        totals[c.device or c.delta_id] += c.weight
    caps = cap_shares(dict(totals), max_share)
    return [Contribution(c.delta_id, c.tensors, c.weight * caps[c.device or c.delta_id]
                         / totals[c.device or c.delta_id], c.device) for c in contribs]


@dataclass
class Aggregate:
    """What the strategy made of a round's ready contributions, part by part."""

    by_part: dict[str, list[Contribution]]
    updated: Params  # part -> its merged parameters (parts that changed only)
    lineage: dict[str, list[str]]  # part -> the deltas merged into it
    dropped: dict[str, set[str]]  # part -> the deltas the strategy left out
    unchanged: list[str]  # parts whose merged change is below NO_CHANGE_NORM: no version

    @property
    def candidates(self) -> list[str]:
        """The parts that would get a new version, before the gate."""
        return sorted(set(self.lineage) - set(self.unchanged))


def aggregate(ready: dict[str, dict[str, list[Contribution]]], params: Params, strategy: str, max_share: float,
              server_lr: float) -> Aggregate:
    """Merge ``ready`` (delta -> part -> contributions) into ``params`` with the strategy, per part.

    Parameters carried by the same deltas are merged together (one strategy call: the robust checks see
    the whole module), so devices that trained different subsets are each counted once; no device holds
    more than ``max_share`` of a call's weight.
    """
    by_part: dict[str, list[Contribution]] = defaultdict(list)
    for per_part in ready.values():
        for part_id, cs in per_part.items():
            by_part[part_id] += cs
    merge = STRATEGIES[strategy]
    out = Aggregate(dict(by_part), {}, {}, defaultdict(set), [])
    for part_id, part_contribs in sorted(by_part.items()):
        updated = dict(params[part_id])
        change = 0.0
        groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for name in sorted({n for c in part_contribs for n in c.tensors}):
            groups[tuple(c.delta_id for c in part_contribs if name in c.tensors)].append(name)
        for carriers, names in groups.items():
            carrying = capped([Contribution(c.delta_id, {n: c.tensors[n] for n in names}, c.weight, c.device)
                               for c in part_contribs if c.delta_id in carriers], max_share)
            result = merge(carrying)
            out.dropped[part_id].update(result.dropped)
            for name in names:
                old = updated[name]
                updated[name] = (old.astype(np.float32) + server_lr * result.tensors[name]).astype(old.dtype)
                change += float(np.square(updated[name].astype(np.float64) - old.astype(np.float64)).sum())
        out.lineage[part_id] = [c.delta_id for c in part_contribs if c.delta_id not in out.dropped[part_id]]
        if math.sqrt(change) < NO_CHANGE_NORM:  # nothing changed: no version, no staleness for others
            out.unchanged.append(part_id)
            continue
        out.updated[part_id] = updated
    return out


@dataclass(frozen=True)
class GateResult:
    """The gate's decision: the parts kept, accuracy before and after, each part's loss alone, the best."""

    kept: list[str]
    before: float
    after: float
    harms: dict[str, float]
    best: float


def check(params: Params, updated: Params, parts: list[str], evaluate: Evaluate | None, margin: float,
          recorded_best: float | None) -> GateResult:
    """Parts whose merge keeps validation accuracy within ``margin`` of the best released, alone and together.

    The floor is the best validation accuracy any released version reached (``recorded_best``, from the
    ledger) minus the margin: a cumulative budget, so a run of small losses cannot add up. Each part is
    first tried alone; then, while the kept parts together fall below the floor, the part that hurt most
    alone is held back. ``evaluate`` None (the gate switched off) keeps every part.
    """
    def with_parts(chosen: list[str]) -> Params:
        return {pid: (updated[pid] if pid in chosen else v) for pid, v in params.items()}

    before = evaluate(params) if parts and evaluate is not None else float("nan")
    if before != before:  # the gate is switched off (--no-gate), or nothing to gate
        return GateResult(parts, before, before, {p: 0.0 for p in parts}, recorded_best or float("nan"))
    assert evaluate is not None
    best = before if recorded_best is None else max(recorded_best, before)
    floor = best - margin
    alone = {p: evaluate(with_parts([p])) for p in parts}
    harms = {p: best - acc for p, acc in alone.items()}
    kept = [p for p in parts if alone[p] >= floor]
    after = evaluate(with_parts(kept)) if kept else before
    while kept and after < floor:
        kept.remove(max(kept, key=lambda p: harms[p]))
        after = evaluate(with_parts(kept)) if kept else before
    return GateResult(kept, before, after, harms, best)


@dataclass(frozen=True)
class Decision:
    """What a round commits: each delta's outcome per part, the parts held back and why, the deltas dropped."""

    outcomes: dict[str, dict[str, str]]  # delta -> part -> merged / held / dropped
    held_parts: list[str]
    dropped: list[str]
    reason: str
    released: float  # the best released accuracy after this round (NaN when ungated and none recorded)


def decide(agg: Aggregate, gate: GateResult, margin: float) -> Decision:
    """Outcomes of every contribution, the held parts with the reason, and the best released accuracy."""
    held_parts = sorted(set(agg.candidates) - set(gate.kept))
    outcomes: dict[str, dict[str, str]] = defaultdict(dict)
    for pid, cs in agg.by_part.items():
        for c in cs:
            outcomes[c.delta_id][pid] = ("dropped" if c.delta_id in agg.dropped[pid] else
                                         "merged" if pid in gate.kept or pid in agg.unchanged else "held")
    reason = ""
    if held_parts:
        drops = ", ".join(f"{p}: {gate.harms[p]:.3f}" for p in held_parts)
        reason = (f"held back {held_parts}: merging them would bring validation accuracy below the best "
                  f"released {gate.best:.4f} minus {margin:g} (below it, alone: {drops})")
    released = max(gate.best, gate.after) if gate.kept and gate.after == gate.after else gate.best
    return Decision(dict(outcomes), held_parts, sorted({d for ds in agg.dropped.values() for d in ds}), reason,
                    released)

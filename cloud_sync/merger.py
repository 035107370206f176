"""Merge rounds: pending deltas -> per-module merged versions, gated on the cloud's validation split."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.ledger import Ledger
from cloud_sync.strategies import STRATEGIES, Contribution
from cloud_sync.validation import MAX_SAMPLES, Limits, Verdict, check_delta
from eclm import wire
from eclm.errors import BankError, ConfigError, DataError
from eclm.hashing import sha256_file
from eclm.parts import is_module_id, parse_module_id
from exporter.bank import BankInfo, DirectoryBank
from exporter.config import ModelConfig

log = logging.getLogger("eclm.sync.merge")


@dataclass(frozen=True)
class MergeSettings:
    """How rounds merge."""

    strategy: str = "weighted"
    gate_margin: float = 0.02  # a merge may lower validation accuracy by at most this much
    server_lr: float = 1.0  # step size applied to the merged delta (1.0: the method's plain average)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown merge strategy {self.strategy!r}", hint=f"use one of {sorted(STRATEGIES)}")


@dataclass
class RoundResult:
    """What one round did."""

    round: int
    merged: list[str]
    held: list[str]
    versions: dict[str, int]
    val_before: float
    val_after: float
    seconds: float
    reason: str = ""
    quarantined: dict[str, str] = field(default_factory=dict)  # delta id -> why it could not be merged

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "merged": len(self.merged), "held": len(self.held), "versions": self.versions,
                "val_before": self.val_before, "val_after": self.val_after, "seconds": self.seconds,
                "reason": self.reason, "quarantined": len(self.quarantined)}


NO_CHANGE_NORM = 1e-7  # a merged change of a part below this L2 norm changes nothing: no new version


def module_weight(msg: wire.DeltaMessage, part_id: str, current_version: int | None = None) -> float:
    """Importance of the module for the sending device x its sample count (METHOD.md section 4),
    divided by 1 + staleness (versions its base lags behind), as asynchronous federated learning does.

    Raises :class:`DataError` for a weight that is not a finite positive number (a forged header).
    """
    importance = 1.0
    if msg.importance and is_module_id(part_id):
        layer, index = parse_module_id(part_id)
        if layer < len(msg.importance) and index < len(msg.importance[layer]):
            importance = float(msg.importance[layer][index])
    staleness = max(0, (current_version or 0) - msg.base_versions.get(part_id, current_version or 0))
    if not isinstance(msg.sample_count, int) or not 0 <= msg.sample_count <= MAX_SAMPLES:
        raise DataError(f"sample count {str(msg.sample_count)[:20]} is out of range", hint=f"at most {MAX_SAMPLES}")
    samples = max(1, msg.sample_count)
    weight = max(importance, 1e-6) * samples / (1 + staleness)
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"merge weight of {part_id} is {weight!r}", hint="importance values must be finite")
    return weight


class Merger:
    """Holds the bank's current parameters and validation data; validates deltas and runs rounds."""

    def __init__(self, bank_dir: Path, ledger: Ledger, settings: MergeSettings) -> None:
        self.bank = DirectoryBank(bank_dir)
        self.ledger = ledger
        self.settings = settings
        self.reconcile()
        info = self.bank.info()
        self.bank_id = info.bank_id
        self.config = ModelConfig.from_dict(info.config)
        self.params: dict[str, dict[str, np.ndarray]] = {pid: self.bank.read_part(pid) for pid in info.parts}
        self.layer_sizes = [len(layer.widths) for layer in self.config.layers]
        self._val = self._validation_data(info)

    def reconcile(self) -> None:
        """Make ``bank.json`` agree with the ledger (after a crash between commit and rewrite)."""
        info = self.bank.info()
        recorded = self.ledger.versions()
        if not recorded:
            self.ledger.seed_versions({pid: rec.version for pid, rec in info.parts.items()})
            return
        changed = False
        for pid, version in recorded.items():
            rec = info.parts.get(pid)
            if rec is not None and rec.version != version and self.bank.part_file(pid, version).is_file():
                rec.version = version
                rec.sha256 = sha256_file(self.bank.part_file(pid, version))
                rec.lineage = self.ledger.lineage(pid)
                changed = True
        if changed:
            log.warning("bank.json lagged behind the ledger; reconciled")
            self.bank.write_info(info)

    def _validation_data(self, info: BankInfo) -> tuple[Any, Any] | None:
        from exporter.data import load_dataset, split
        from exporter.train import to_tensors

        try:
            splits = split(load_dataset(info.dataset), info.seed)
        except Exception as exc:  # a bank whose data is not here cannot be gated
            log.warning("no validation data for the gate (%s); merges are not gated", exc)
            return None
        return to_tensors(splits.val, info.normalisation["mean"], info.normalisation["std"])

    def versions(self) -> dict[str, int]:
        return self.ledger.versions()

    def check(self, msg: wire.DeltaMessage) -> Verdict:
        return check_delta(msg, self.bank_id, self.versions(), self.params, self.settings.limits, self.layer_sizes)

    def validation_accuracy(self, params: dict[str, dict[str, np.ndarray]]) -> float:
        if self._val is None:
            return float("nan")
        from exporter.torchio import model_from_tensors
        from exporter.train import accuracy

        flat = {k: v for part in params.values() for k, v in part.items()}
        model = model_from_tensors(self.config, flat)
        return accuracy(model, *self._val)

    def run_round(self) -> RoundResult | None:
        """Merge every pending delta; None when there is nothing to merge.

        A delta that cannot be merged (undecodable, a weight that is not a number, or one that makes its
        round fail while the bank itself is sound) is quarantined with the reason; it never blocks later
        rounds. A fault of the bank (its files cannot be read or written) raises :class:`BankError`.
        """
        stored = self.ledger.pending()
        if not stored:
            return None
        t0 = time.perf_counter()
        current = self.versions()
        contribs: dict[str, dict[str, list[Contribution]]] = {}
        bad: dict[str, str] = {}
        for s in stored:
            try:
                contribs[s.delta_id] = self._contributions(s.payload, current)
            except Exception as exc:  # whatever a stored payload does, it is that delta's fault
                bad[s.delta_id] = f"cannot be merged: {type(exc).__name__}: {str(exc)[:200]}"
        self._quarantine(bad)
        if not contribs:
            return RoundResult(self.ledger.next_round(), [], [], {}, float("nan"), float("nan"),
                               time.perf_counter() - t0, "nothing mergeable", bad)
        try:
            result = self._merge(contribs, t0)
        except Exception as exc:
            fault = self.bank_fault(sorted({p for c in contribs.values() for p in c}))
            if fault:
                raise BankError(f"a merge round failed and the bank is at fault: {fault}",
                                hint="repair the bank directory and restart the daemon; the deltas stay pending"
                                ) from exc
            log.warning("a round of %d deltas failed (%s: %s); merging them one by one", len(contribs),
                        type(exc).__name__, exc)
            result = self._one_by_one(contribs, t0)
        result.quarantined.update(bad)
        return result

    def _one_by_one(self, contribs: dict[str, dict[str, list[Contribution]]], t0: float) -> RoundResult:
        """After a failed round: each delta alone; the ones that fail alone are quarantined."""
        merged: list[str] = []
        held: list[str] = []
        versions: dict[str, int] = {}
        bad: dict[str, str] = {}
        last: RoundResult | None = None
        for delta_id, c in contribs.items():
            try:
                last = self._merge({delta_id: c}, t0)
            except Exception as exc:
                bad[delta_id] = f"makes its round fail: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            merged += last.merged
            held += last.held
            versions.update(last.versions)
        self._quarantine(bad)
        if last is None:
            return RoundResult(self.ledger.next_round(), [], [], {}, float("nan"), float("nan"),
                               time.perf_counter() - t0, "every delta failed", bad)
        return RoundResult(last.round, merged, held, versions, last.val_before, last.val_after,
                           time.perf_counter() - t0, last.reason, bad)

    def _quarantine(self, bad: dict[str, str]) -> None:
        for delta_id, why in bad.items():
            log.error("delta %s quarantined: %s", delta_id, why)
            self.ledger.quarantine(delta_id, why)

    def bank_fault(self, parts: list[str]) -> str:
        """Why the bank cannot take a new version of ``parts`` (empty when it can)."""
        try:
            info = self.bank.info()
            for pid in parts:
                path = self.bank.part_file(pid, info.parts[pid].version + 1)
                if path.exists() and not path.is_file():
                    return f"{path} is not a regular file"
                probe = path.parent / f".probe-{pid}"
                probe.write_bytes(b"")
                probe.unlink()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _contributions(self, payload: bytes, current: dict[str, int]) -> dict[str, list[Contribution]]:
        msg = wire.decode(payload)
        if not isinstance(msg, wire.DeltaMessage):
            raise DataError(f"a stored {msg.TYPE} message is not a delta")
        out: dict[str, list[Contribution]] = {}
        for part_id, names in msg.parts.items():
            if part_id not in self.params:
                raise DataError(f"part {part_id!r} is not in the bank")
            out[part_id] = [Contribution(msg.delta_id, {n: msg.tensors[n] for n in names},
                                         module_weight(msg, part_id, current.get(part_id)))]
        return out

    def _merge(self, contribs: dict[str, dict[str, list[Contribution]]], t0: float) -> RoundResult:
        round_no = self.ledger.next_round()
        ids = list(contribs)
        by_part: dict[str, list[Contribution]] = defaultdict(list)
        for per_part in contribs.values():
            for part_id, cs in per_part.items():
                by_part[part_id] += cs
        strategy = STRATEGIES[self.settings.strategy]
        new_params = dict(self.params)
        lineage: dict[str, list[str]] = {}
        unchanged: list[str] = []
        lr = self.settings.server_lr
        for part_id, part_contribs in sorted(by_part.items()):
            # Per parameter: each one merges the deltas that carry it, so devices that trained
            # different subsets of a module are each counted once.
            updated = dict(self.params[part_id])
            change = 0.0
            for name in sorted({n for c in part_contribs for n in c.tensors}):
                carrying = [Contribution(c.delta_id, {name: c.tensors[name]}, c.weight)
                            for c in part_contribs if name in c.tensors]
                d = strategy(carrying).tensors[name]
                old = updated[name]
                updated[name] = (old.astype(np.float32) + lr * d).astype(old.dtype)
                change += float(np.square(updated[name].astype(np.float64) - old.astype(np.float64)).sum())
            lineage[part_id] = [c.delta_id for c in part_contribs]
            if math.sqrt(change) < NO_CHANGE_NORM:  # nothing changed: no version, no staleness for others
                unchanged.append(part_id)
                continue
            new_params[part_id] = updated
        candidates = sorted(set(lineage) - set(unchanged))
        kept, before, after, harms, best = self._gate(new_params, candidates)
        held_parts = sorted(set(candidates) - set(kept))
        merged_ids = sorted({d for pid in [*kept, *unchanged] for d in lineage[pid]})
        held_ids = sorted(set(ids) - set(merged_ids))
        reason = ""
        if held_parts:
            drops = ", ".join(f"{p}: {harms[p]:.3f}" for p in held_parts)
            reason = (f"held back {held_parts}: merging them would bring validation accuracy below the best "
                      f"released {best:.4f} minus {self.settings.gate_margin:g} (below it, alone: {drops})")
            log.warning("round %d: %s", round_no, reason)
        current = self.versions()
        new_versions = {pid: current[pid] + 1 for pid in kept}
        shas = {pid: self.bank.write_part_version(pid, v, new_params[pid]) for pid, v in new_versions.items()}
        released = max(best, after) if kept and after == after else best
        self.ledger.commit_round(round_no, {pid: (v, lineage[pid]) for pid, v in new_versions.items()}, merged_ids,
                                 held_ids, "validation_gate",
                                 {"val_before": before, "val_after": after, "deltas": len(ids),
                                  "held_parts": held_parts, "unchanged_parts": unchanged,
                                  "best_released": released, "seconds": time.perf_counter() - t0},
                                 best_released=released if released == released else None)
        info = self.bank.info()
        for pid, v in new_versions.items():
            rec = info.parts[pid]
            rec.version, rec.sha256 = v, shas[pid]
            rec.lineage.append({"version": v, "round": round_no, "deltas": lineage[pid]})
        self.bank.write_info(info)
        self.params = {pid: (new_params[pid] if pid in new_versions else v) for pid, v in self.params.items()}
        return RoundResult(round_no, merged_ids, held_ids, new_versions, before, after, time.perf_counter() - t0,
                           reason)

    def _gate(self, new_params: dict[str, dict[str, np.ndarray]], parts: list[str]
              ) -> tuple[list[str], float, float, dict[str, float], float]:
        """Parts whose merge keeps validation accuracy within the margin of the best released, alone and together.

        The floor is the best validation accuracy any released version reached (kept in the ledger)
        minus the margin: a cumulative budget, so a run of small losses cannot add up. Each part is first
        tried alone; then, while the kept parts together fall below the floor, the part that hurt most
        alone is held back. Returns kept parts, accuracy before and after, each part's loss alone
        (against the best), and the best released accuracy.
        """
        def with_parts(chosen: list[str]) -> dict[str, dict[str, np.ndarray]]:
            return {pid: (new_params[pid] if pid in chosen else v) for pid, v in self.params.items()}

        before = self.validation_accuracy(self.params) if parts else float("nan")
        if before != before:  # no validation data (or nothing to gate): nothing to gate on
            return parts, before, before, {p: 0.0 for p in parts}, self.ledger.best_released() or float("nan")
        recorded = self.ledger.best_released()
        best = before if recorded is None else max(recorded, before)
        floor = best - self.settings.gate_margin
        alone = {p: self.validation_accuracy(with_parts([p])) for p in parts}
        harms = {p: best - acc for p, acc in alone.items()}
        kept = [p for p in parts if alone[p] >= floor]
        after = self.validation_accuracy(with_parts(kept)) if kept else before
        while kept and after < floor:
            kept.remove(max(kept, key=lambda p: harms[p]))
            after = self.validation_accuracy(with_parts(kept)) if kept else before
        return kept, before, after, harms, best

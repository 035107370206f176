"""Merge rounds: pending deltas -> per-module merged versions, gated on the cloud's validation split."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.ledger import Ledger
from cloud_sync.strategies import STRATEGIES, Contribution
from cloud_sync.validation import Limits, Verdict, check_delta
from eclm import wire
from eclm.errors import ConfigError
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

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "merged": len(self.merged), "held": len(self.held), "versions": self.versions,
                "val_before": self.val_before, "val_after": self.val_after, "seconds": self.seconds,
                "reason": self.reason}


def module_weight(msg: wire.DeltaMessage, part_id: str, current_version: int | None = None) -> float:
    """Importance of the module for the sending device x its sample count (METHOD.md section 4),
    divided by 1 + staleness (versions its base lags behind), as asynchronous federated learning does.
    """
    importance = 1.0
    if msg.importance and is_module_id(part_id):
        layer, index = parse_module_id(part_id)
        if layer < len(msg.importance) and index < len(msg.importance[layer]):
            importance = float(msg.importance[layer][index])
    staleness = max(0, (current_version or 0) - msg.base_versions.get(part_id, current_version or 0))
    return max(importance, 1e-6) * max(1, msg.sample_count) / (1 + staleness)


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
        return check_delta(msg, self.bank_id, self.versions(), self.params, self.settings.limits)

    def validation_accuracy(self, params: dict[str, dict[str, np.ndarray]]) -> float:
        if self._val is None:
            return float("nan")
        from exporter.torchio import model_from_tensors
        from exporter.train import accuracy

        flat = {k: v for part in params.values() for k, v in part.items()}
        model = model_from_tensors(self.config, flat)
        return accuracy(model, *self._val)

    def run_round(self) -> RoundResult | None:
        """Merge every pending delta; None when there is nothing to merge."""
        stored = self.ledger.pending()
        if not stored:
            return None
        t0 = time.perf_counter()
        round_no = self.ledger.next_round()
        by_part: dict[str, list[Contribution]] = defaultdict(list)
        ids = []
        current_versions = self.versions()
        for s in stored:
            msg = wire.decode(s.payload)
            assert isinstance(msg, wire.DeltaMessage)
            ids.append(msg.delta_id)
            for part_id, names in msg.parts.items():
                by_part[part_id].append(Contribution(msg.delta_id, {n: msg.tensors[n] for n in names},
                                                     module_weight(msg, part_id, current_versions.get(part_id))))
        strategy = STRATEGIES[self.settings.strategy]
        new_params = dict(self.params)
        lineage: dict[str, list[str]] = {}
        lr = self.settings.server_lr
        for part_id, contribs in sorted(by_part.items()):
            # Per parameter: each one merges the deltas that carry it, so devices that trained
            # different subsets of a module are each counted once.
            updated = dict(self.params[part_id])
            for name in sorted({n for c in contribs for n in c.tensors}):
                carrying = [Contribution(c.delta_id, {name: c.tensors[name]}, c.weight)
                            for c in contribs if name in c.tensors]
                d = strategy(carrying).tensors[name]
                updated[name] = (updated[name].astype(np.float32) + lr * d).astype(updated[name].dtype)
            new_params[part_id] = updated
            lineage[part_id] = [c.delta_id for c in contribs]
        kept, before, after, harms = self._gate(new_params, sorted(lineage))
        held_parts = sorted(set(lineage) - set(kept))
        merged_ids = sorted({d for pid in kept for d in lineage[pid]})
        held_ids = sorted(set(ids) - set(merged_ids))
        reason = ""
        if held_parts:
            drops = ", ".join(f"{p}: {harms[p]:.3f}" for p in held_parts)
            reason = (f"held back {held_parts}: merging them would lower validation accuracy by more than "
                      f"{self.settings.gate_margin:g} (alone: {drops})")
            log.warning("round %d: %s", round_no, reason)
        current = self.versions()
        new_versions = {pid: current[pid] + 1 for pid in kept}
        shas = {pid: self.bank.write_part_version(pid, v, new_params[pid]) for pid, v in new_versions.items()}
        self.ledger.commit_round(round_no, {pid: (v, lineage[pid]) for pid, v in new_versions.items()}, merged_ids,
                                 held_ids, "validation_gate",
                                 {"val_before": before, "val_after": after, "deltas": len(ids),
                                  "held_parts": held_parts, "seconds": time.perf_counter() - t0})
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
              ) -> tuple[list[str], float, float, dict[str, float]]:
        """Parts whose merge keeps validation accuracy within the margin, alone and together.

        Each part is first tried alone; then, while the kept parts together still lose more than the
        margin, the part that hurt most alone is held back.
        """
        def with_parts(chosen: list[str]) -> dict[str, dict[str, np.ndarray]]:
            return {pid: (new_params[pid] if pid in chosen else v) for pid, v in self.params.items()}

        before = self.validation_accuracy(self.params)
        if before != before:  # no validation data: nothing to gate on
            return parts, before, before, {p: 0.0 for p in parts}
        margin = self.settings.gate_margin
        harms = {p: before - self.validation_accuracy(with_parts([p])) for p in parts}
        kept = [p for p in parts if harms[p] <= margin]
        after = self.validation_accuracy(with_parts(kept)) if kept else before
        while kept and after < before - margin:
            kept.remove(max(kept, key=lambda p: harms[p]))
            after = self.validation_accuracy(with_parts(kept)) if kept else before
        return kept, before, after, harms

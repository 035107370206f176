"""Merge rounds: pending deltas -> per-module merged versions, gated on the cloud's validation split."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_sync.strategies import STRATEGIES, Contribution, cap_shares
from cloud_sync.support import SupportRules, Waiting, book, plan
from cloud_sync.validation import Limits, Verdict, check_delta
from cloud_sync.weights import held_importance, module_weight
from eclm import wire
from eclm.errors import BankError, ConfigError, DataError
from exporter.config import ModelConfig
from module_bank import BankInfo, BankStore, ClaimLost, Ledger, StoredDelta

log = logging.getLogger("eclm.sync.merge")
__all__ = ["MergeSettings", "Merger", "RoundResult", "module_weight"]


@dataclass(frozen=True)
class MergeSettings:
    """How rounds merge."""

    strategy: str = "robust"  # weighted mean with norm clipping and a disagreement check (docs/sync.md)
    gate_margin: float = 0.02  # a merge may lower validation accuracy by at most this much
    gate: bool = True  # False: merge without the validation gate (said in status); True and no data: no merging
    server_lr: float = 1.0  # step size applied to the merged delta (1.0: the method's plain average)
    limits: Limits = field(default_factory=Limits)
    min_devices: int = 2  # distinct devices a part needs in a round; also caps a device's share at 1/min_devices
    support_max_age: float = 6 * 3600.0  # seconds a delta may wait for support before its waiting parts expire
    support_max_rounds: int = 10  # merge rounds a delta may wait for support before its waiting parts expire

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown merge strategy {self.strategy!r}", hint=f"use one of {sorted(STRATEGIES)}")
        if not isinstance(self.min_devices, int) or self.min_devices < 1:
            raise ConfigError(f"min devices must be at least 1, not {self.min_devices!r}",
                              hint="pass --min-devices 1 to let one device merge alone, 2 or more otherwise")
        if self.support_max_age <= 0 or self.support_max_rounds < 1:
            raise ConfigError("support expiry must be positive", hint="pass --support-max-age > 0 and "
                              "--support-max-rounds >= 1")

    @property
    def max_share(self) -> float:
        """No device holds more than this share of a part's merge weight in a round."""
        return 1.0 / self.min_devices

    def support_rules(self) -> SupportRules:
        return SupportRules(self.min_devices, self.support_max_age, self.support_max_rounds,
                            self.limits.max_staleness)


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
    waiting: list[str] = field(default_factory=list)  # deltas with parts still waiting for support
    expired: list[str] = field(default_factory=list)  # deltas ended because their waiting parts expired
    dropped: list[str] = field(default_factory=list)  # deltas the strategy left out (against the others)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "merged": len(self.merged), "held": len(self.held), "versions": self.versions,
                "val_before": self.val_before, "val_after": self.val_after, "seconds": self.seconds,
                "reason": self.reason, "quarantined": len(self.quarantined), "waiting": len(self.waiting),
                "expired": len(self.expired), "dropped": len(self.dropped)}


NO_CHANGE_NORM = 1e-7  # a merged change of a part below this L2 norm changes nothing: no new version


class Merger:
    """Holds the bank's current parameters and validation data; validates deltas and runs rounds."""

    def __init__(self, store: BankStore, ledger: Ledger, settings: MergeSettings) -> None:
        self.bank = store
        self.ledger = ledger
        self.settings = settings
        self.reconcile()
        info = self.bank.info()
        self.bank_id = info.bank_id
        self.config = ModelConfig.from_dict(info.config)
        self.params: dict[str, dict[str, np.ndarray]] = {pid: self.bank.read_part(pid) for pid in info.parts}
        self._loaded = {pid: rec.version for pid, rec in info.parts.items()}  # the versions ``params`` hold
        self.layer_sizes = [len(layer.widths) for layer in self.config.layers]
        self.gate_problem = ""  # why the gate cannot run ("" when it can, or when it is switched off)
        self._val = self._validation_data(info) if self.settings.gate else None
        self.ledger.set_meta("gate_problem", self.gate_problem)

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
            sha = self.bank.version_sha256(pid, version) if rec is not None and rec.version != version else None
            if rec is not None and sha is not None:
                rec.version = version
                rec.sha256 = sha
                rec.lineage = self.ledger.lineage(pid)
                changed = True
        if changed:
            log.warning("bank.json lagged behind the ledger; reconciled")
            self.bank.write_info(info)

    def _validation_data(self, info: BankInfo) -> tuple[Any, Any] | None:
        """The gate's validation split, drawn by the bank's secret (made now, and said so, if the bank has none)."""
        import hashlib

        from exporter.data import gate_split, load_dataset
        from exporter.train import to_tensors

        secret, made = self.bank.validation_secret()
        if made:
            log.warning("bank %s had no validation secret: made one (%s, mode 0600); the gate's validation split "
                        "is now drawn by it and cannot be rebuilt from public data and the seed", self.bank.location,
                        "validation.secret")
        key = hashlib.sha256(secret).hexdigest()[:16]
        if self.ledger.meta("validation_key") != key:
            if self.ledger.best_released() is not None:
                log.warning("the gate's validation split changed: the best released accuracy is measured anew")
            self.ledger.reset_best_released(key)
        try:
            val = gate_split(load_dataset(info.dataset), info.seed, secret)
        except Exception as exc:  # a bank whose data is not here cannot be gated: then nothing merges
            self.gate_problem = (f"no validation data for the gate ({type(exc).__name__}: {str(exc)[:200]}): "
                                 "nothing is merged, deltas stay pending; make the bank's data set loadable "
                                 "or pass --no-gate to merge without the gate")
            log.error("%s", self.gate_problem)
            return None
        return to_tensors(val, info.normalisation["mean"], info.normalisation["std"])

    def versions(self) -> dict[str, int]:
        return self.ledger.versions()

    def refresh(self) -> dict[str, int]:
        """Load the parts another worker merged since this one last looked; returns the versions now current."""
        current = self.ledger.versions()
        for pid, version in current.items():
            if pid in self.params and self._loaded.get(pid) != version:
                self.params[pid] = self.bank.read_part(pid, version)
        self._loaded = dict(current)
        return current

    def check(self, msg: wire.DeltaMessage) -> Verdict:
        """Check a delta against the versions and parameters this worker holds (see :meth:`refresh`)."""
        return check_delta(msg, self.bank_id, self._loaded, self.params, self.settings.limits, self.layer_sizes)

    def validation_accuracy(self, params: dict[str, dict[str, np.ndarray]]) -> float:
        if self._val is None:
            return float("nan")
        from exporter.torchio import model_from_tensors
        from exporter.train import accuracy

        flat = {k: v for part in params.values() for k, v in part.items()}
        model = model_from_tensors(self.config, flat)
        return accuracy(model, *self._val)

    def run_round(self) -> RoundResult | None:
        """Merge every pending contribution whose part has enough support; None when nothing is pending.

        A part is merged only with deltas of at least ``min_devices`` distinct devices; the other parts
        wait in the ledger (their deltas stay pending) until support comes or they expire. A delta that
        cannot be merged (undecodable, a weight that is not a number, or one that makes its round fail
        while the bank itself is sound) is quarantined with the reason; it never blocks later rounds. A
        fault of the bank (its files cannot be read or written) raises :class:`BankError`.
        """
        stored = self.ledger.pending()
        if not stored or self.gate_problem:  # a gate that cannot run never passes: the deltas wait
            return None
        t0 = time.perf_counter()
        current = self.versions()
        round_no = self.ledger.next_round()
        pending: list[Waiting] = []
        bad: dict[str, str] = {}
        for s in stored:
            try:
                pending.append(self._waiting(s, current))
            except Exception as exc:  # whatever a stored payload does, it is that delta's fault
                bad[s.delta_id] = f"cannot be merged: {type(exc).__name__}: {str(exc)[:200]}"
        self._quarantine(bad)
        self._stored = {s.delta_id: s for s in stored if s.delta_id not in bad}
        self._plan = plan(pending, self.settings.support_rules(), time.time(), round_no)
        if not self._plan.ready:
            result = self._settle_only(round_no, t0, "nothing mergeable" if not pending else "")
            result.quarantined.update(bad)
            return result
        try:
            result = self._merge(self._plan.ready, t0)
        except ClaimLost:  # not the deltas' fault: another worker holds the round
            raise
        except Exception as exc:
            fault = self.bank_fault(sorted({p for c in self._plan.ready.values() for p in c}))
            if fault:
                raise BankError(f"a merge round failed and the bank is at fault: {fault}",
                                hint="repair the bank directory and restart the daemon; the deltas stay pending"
                                ) from exc
            log.warning("a round of %d deltas failed (%s: %s); trying them one by one", len(self._plan.ready),
                        type(exc).__name__, exc)
            result = self._one_by_one(pending, round_no, t0)
        result.quarantined.update(bad)
        return result

    def _waiting(self, s: StoredDelta, current: dict[str, int]) -> Waiting:
        """A stored delta's contributions to the parts no round has taken yet, weighted by what the cloud holds."""
        msg = wire.decode(s.payload)
        if not isinstance(msg, wire.DeltaMessage):
            raise DataError(f"a stored {msg.TYPE} message is not a delta")
        importance = held_importance(self.ledger.device(s.device_id))
        parts: dict[str, list[Contribution]] = {}
        staleness: dict[str, int] = {}
        for part_id, names in msg.parts.items():
            if part_id not in self.params:
                raise DataError(f"part {part_id!r} is not in the bank")
            weight = module_weight(msg, part_id, current.get(part_id), importance)
            if part_id in s.done:
                continue
            parts[part_id] = [Contribution(msg.delta_id, {n: msg.tensors[n] for n in names}, weight, s.device_id)]
            staleness[part_id] = max(0, current.get(part_id, 0) - msg.base_versions.get(part_id, 0))
        return Waiting(s.delta_id, s.device_id, s.received, s.waiting_since, parts, staleness)

    def _book(self, round_no: int, outcomes: dict[str, dict[str, str]]
              ) -> tuple[list[str], list[str], dict[str, Any]]:
        return book(self._stored, self._plan, outcomes)

    def _settle_only(self, round_no: int, t0: float, reason: str) -> RoundResult:
        """No part has support: record what waits and what expired; no round, no version."""
        _, _, books = self._book(round_no, {})
        self.ledger.settle(round_no, books["done"], books["waiting"], books["expired"], books["expired_parts"])
        if books["waiting"]:
            reason = reason or (f"{len(books['waiting'])} deltas wait for support from "
                                f"{self.settings.min_devices} devices")
        return RoundResult(round_no, [], [], {}, float("nan"), float("nan"), time.perf_counter() - t0, reason,
                           waiting=sorted(books["waiting"]), expired=sorted(books["expired"]))

    def _one_by_one(self, pending: list[Waiting], round_no: int, t0: float) -> RoundResult:
        """After a failed round: each delta is tried alone without committing.

        The ones that fail alone are quarantined; the others are planned and merged again (their support
        counted anew).
        """
        bad: dict[str, str] = {}
        for w in pending:
            if w.delta_id not in self._plan.ready:
                continue
            try:
                self._merge({w.delta_id: self._plan.ready[w.delta_id]}, t0, dry_run=True)
            except Exception as exc:
                bad[w.delta_id] = f"makes its round fail: {type(exc).__name__}: {str(exc)[:200]}"
        self._quarantine(bad)
        rest = [w for w in pending if w.delta_id not in bad]
        self._stored = {k: v for k, v in self._stored.items() if k not in bad}
        self._plan = plan(rest, self.settings.support_rules(), time.time(), round_no)
        if not self._plan.ready:
            result = self._settle_only(round_no, t0, "every delta failed" if not rest else "")
        else:
            try:
                result = self._merge(self._plan.ready, t0)
            except Exception as exc:  # they fail only together: set them aside rather than retry forever
                together = {d: f"makes its round fail with others: {type(exc).__name__}: {str(exc)[:200]}"
                            for d in self._plan.ready}
                self._quarantine(together)
                bad.update(together)
                self._stored = {k: v for k, v in self._stored.items() if k not in together}
                self._plan = plan([w for w in rest if w.delta_id not in together], self.settings.support_rules(),
                                  time.time(), round_no)
                self._plan.ready = {}
                result = self._settle_only(round_no, t0, "every delta failed")
        result.quarantined.update(bad)
        return result

    def _quarantine(self, bad: dict[str, str]) -> None:
        for delta_id, why in bad.items():
            log.error("delta %s quarantined: %s", delta_id, why)
            self.ledger.quarantine(delta_id, why)

    def bank_fault(self, parts: list[str]) -> str:
        """Why the bank cannot take a new version of ``parts`` (empty when it can)."""
        return self.bank.fault(parts)

    def _capped(self, contribs: list[Contribution]) -> list[Contribution]:
        """The contributions with no device above ``max_share`` of their total weight (docs/sync.md)."""
        totals: dict[str, float] = defaultdict(float)
        for c in contribs:
            totals[c.device or c.delta_id] += c.weight
        capped = cap_shares(dict(totals), self.settings.max_share)
        return [Contribution(c.delta_id, c.tensors, c.weight * capped[c.device or c.delta_id]
                             / totals[c.device or c.delta_id], c.device) for c in contribs]

    def _merge(self, contribs: dict[str, dict[str, list[Contribution]]], t0: float,
               dry_run: bool = False) -> RoundResult:
        round_no = self.ledger.next_round()
        by_part: dict[str, list[Contribution]] = defaultdict(list)
        for per_part in contribs.values():
            for part_id, cs in per_part.items():
                by_part[part_id] += cs
        strategy = STRATEGIES[self.settings.strategy]
        new_params = dict(self.params)
        lineage: dict[str, list[str]] = {}
        dropped: dict[str, set[str]] = defaultdict(set)
        unchanged: list[str] = []
        lr = self.settings.server_lr
        for part_id, part_contribs in sorted(by_part.items()):
            # Parameters carried by the same deltas are merged together (one strategy call: the robust
            # checks see the whole module), so devices that trained different subsets are each counted once.
            updated = dict(self.params[part_id])
            change = 0.0
            groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
            for name in sorted({n for c in part_contribs for n in c.tensors}):
                groups[tuple(c.delta_id for c in part_contribs if name in c.tensors)].append(name)
            for carriers, names in groups.items():
                carrying = self._capped([Contribution(c.delta_id, {n: c.tensors[n] for n in names}, c.weight,
                                                      c.device) for c in part_contribs if c.delta_id in carriers])
                out = strategy(carrying)
                dropped[part_id].update(out.dropped)
                for name in names:
                    old = updated[name]
                    updated[name] = (old.astype(np.float32) + lr * out.tensors[name]).astype(old.dtype)
                    change += float(np.square(updated[name].astype(np.float64) - old.astype(np.float64)).sum())
            lineage[part_id] = [c.delta_id for c in part_contribs if c.delta_id not in dropped[part_id]]
            if math.sqrt(change) < NO_CHANGE_NORM:  # nothing changed: no version, no staleness for others
                unchanged.append(part_id)
                continue
            new_params[part_id] = updated
        candidates = sorted(set(lineage) - set(unchanged))
        kept, before, after, harms, best = self._gate(new_params, candidates)
        if dry_run:
            return RoundResult(round_no, [], [], {}, before, after, time.perf_counter() - t0, "dry run")
        held_parts = sorted(set(candidates) - set(kept))
        outcomes: dict[str, dict[str, str]] = defaultdict(dict)
        for pid, cs in by_part.items():
            for c in cs:
                outcomes[c.delta_id][pid] = ("dropped" if c.delta_id in dropped[pid] else
                                             "merged" if pid in kept or pid in unchanged else "held")
        merged_ids, held_ids, books = self._book(round_no, outcomes)
        reason = ""
        if held_parts:
            drops = ", ".join(f"{p}: {harms[p]:.3f}" for p in held_parts)
            reason = (f"held back {held_parts}: merging them would bring validation accuracy below the best "
                      f"released {best:.4f} minus {self.settings.gate_margin:g} (below it, alone: {drops})")
            log.warning("round %d: %s", round_no, reason)
        all_dropped = sorted({d for ds in dropped.values() for d in ds})
        if all_dropped:
            log.warning("round %d: left out deltas pointing against the others: %s", round_no, all_dropped)
        current = self.versions()
        new_versions = {pid: current[pid] + 1 for pid in kept}
        shas = {pid: self.bank.write_part_version(pid, v, new_params[pid]) for pid, v in new_versions.items()}
        released = max(best, after) if kept and after == after else best
        self.ledger.commit_round(round_no, {pid: (v, lineage[pid]) for pid, v in new_versions.items()}, merged_ids,
                                 held_ids, "validation_gate",
                                 {"val_before": before, "val_after": after, "deltas": len(contribs),
                                  "held_parts": held_parts, "unchanged_parts": unchanged,
                                  "best_released": released, "seconds": time.perf_counter() - t0,
                                  "waiting": len(books["waiting"]), "expired": len(books["expired"]),
                                  "dropped": all_dropped},
                                 best_released=released if released == released else None, **books)
        info = self.bank.info()
        for pid, v in new_versions.items():
            rec = info.parts[pid]
            rec.version, rec.sha256 = v, shas[pid]
            rec.lineage.append({"version": v, "round": round_no, "deltas": lineage[pid]})
        self.bank.write_info(info)
        self.params = {pid: (new_params[pid] if pid in new_versions else v) for pid, v in self.params.items()}
        self._loaded.update(new_versions)
        return RoundResult(round_no, merged_ids, held_ids, new_versions, before, after, time.perf_counter() - t0,
                           reason, waiting=sorted(books["waiting"]), expired=sorted(books["expired"]),
                           dropped=all_dropped)

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

        before = self.validation_accuracy(self.params) if parts and self.settings.gate else float("nan")
        if before != before:  # the gate is switched off (--no-gate), or nothing to gate
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

"""Merge rounds: pending deltas -> per-module merged versions, gated on the cloud's validation split.

The :class:`Merger` orchestrates the pure steps of :mod:`cloud_sync.pipeline` (gather, weight, aggregate,
check, decide) and is the only place a round writes: its commit methods, to the bank and the ledger.
It is given the bank and the gate's evaluation (:mod:`cloud_sync.ports`); it imports neither torch nor
:mod:`exporter`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from cloud_sync.lines import environments, is_line, line_parts, past_cap, rekey, too_many, view
from cloud_sync.pipeline import Aggregate, Decision, Decoded, GateResult, aggregate, check, decide, gather, weight
from cloud_sync.ports import Evaluate, EvaluatorFactory, Params
from cloud_sync.strategies import STRATEGIES, Contribution
from cloud_sync.support import SupportRules, Waiting, book, plan
from cloud_sync.validation import Limits, Verdict, check_delta
from cloud_sync.weights import WEIGHTINGS, held_importance, module_weight
from eclm import wire
from eclm.errors import BankError, ConfigError, EclmError
from eclm.parts import split_line_key
from module_bank import BankStore, ClaimLost, Ledger

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
    environments: bool = True  # deltas merge into their environment's line (False: every one into the shared line)
    weighting: str = "importance"  # merge weights: importance x samples, samples only, or equal (cloud_sync.weights)
    max_environments: int = 256  # environments with lines at most; a delta that would open one more is refused

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown merge strategy {self.strategy!r}", hint=f"use one of {sorted(STRATEGIES)}")
        if not isinstance(self.min_devices, int) or self.min_devices < 1:
            raise ConfigError(f"min devices must be at least 1, not {self.min_devices!r}",
                              hint="pass --min-devices 1 to let one device merge alone, 2 or more otherwise")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}", hint=f"use one of {', '.join(WEIGHTINGS)}")
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


class Merger:
    """Holds the bank's current parameters and the gate's evaluation; validates deltas and runs rounds.

    ``bank`` is the module bank (:class:`cloud_sync.ports.Bank`); ``evaluator`` builds the gate's
    evaluation from the bank's info and validation secret. While the gate is on, a missing evaluator or
    one that cannot be built sets :attr:`gate_problem`: then nothing merges (never a silent pass).
    """

    def __init__(self, bank: BankStore, ledger: Ledger, settings: MergeSettings,
                 evaluator: EvaluatorFactory | None = None) -> None:
        self.bank = bank
        self.ledger = ledger
        self.settings = settings
        self.reconcile()
        info = self.bank.info()
        self.bank_id: str = info.bank_id
        records = {**info.parts, **info.lines}  # the shared parts and their environment lines
        self.params: Params = {pid: self.bank.read_part(pid) for pid in records}
        self._loaded = {pid: rec.version for pid, rec in records.items()}  # the versions ``params`` hold
        self._environments = environments(self._loaded)  # those with lines in ``_loaded``
        self._born: dict[str, int] = {}  # lines a round opened, not committed yet: the version they start from
        self.layer_sizes = [len(layer["widths"]) for layer in info.config["layers"]]
        self.gate_problem = ""  # why the gate cannot run ("" when it can, or when it is switched off)
        self._evaluate = self._gate_evaluation(info, evaluator) if self.settings.gate else None
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
            if is_line(pid) and split_line_key(pid)[0] in info.parts:
                info.line_record(pid)  # a line born in a round whose bank.json rewrite a crash cut off
            rec = info.record(pid)
            sha = self.bank.version_sha256(pid, version) if rec is not None and rec.version != version else None
            if rec is not None and sha is not None:
                rec.version = version
                rec.sha256 = sha
                rec.lineage = self.ledger.lineage(pid)
                changed = True
        if changed:
            log.warning("bank.json lagged behind the ledger; reconciled")
            self.bank.write_info(info)

    def _gate_evaluation(self, info: Any, evaluator: EvaluatorFactory | None) -> Evaluate | None:
        """The gate's evaluation on the split the bank's secret draws (made now, and said so, if it has none)."""
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
        stop = "nothing is merged, deltas stay pending; "
        if evaluator is None:
            self.gate_problem = (f"no evaluation was given to the validation gate: {stop}start the daemon with "
                                 "`eclm-cloud sync` (it builds one from the bank's data set) or pass --no-gate "
                                 "to merge without the gate")
        else:
            try:
                return evaluator(info, secret)
            except Exception as exc:  # a bank whose data is not here cannot be gated: then nothing merges
                why = exc.message if isinstance(exc, EclmError) else str(exc)
                self.gate_problem = (f"no validation data for the gate ({type(exc).__name__}: {why[:200]}): {stop}"
                                     "make the bank's data set loadable or pass --no-gate to merge without the gate")
        log.error("%s", self.gate_problem)
        return None

    def versions(self) -> dict[str, int]:
        return self.ledger.versions()

    def refresh(self) -> dict[str, int]:
        """Load the parts another worker merged since this one last looked; returns the versions now current."""
        current = self.ledger.versions()
        for pid, version in current.items():
            if (pid in self.params or is_line(pid)) and self._loaded.get(pid) != version:
                self.params[pid] = self.bank.read_part(pid, version)
        self._loaded = dict(current)
        self._environments = environments(self._loaded)
        return current

    def check(self, msg: wire.DeltaMessage) -> Verdict:
        """Check a delta against the versions and parameters this worker holds (see :meth:`refresh`); a delta
        trained from a version another worker merged since makes this one load it first.
        """
        base_env, env = ((msg.base_environment, msg.environment) if self.settings.environments else ("", ""))
        if env:
            msg = line_parts(msg)  # what the lines take (the head stays with the device)
            known = self._environments
            if env not in known and len(known) >= self.settings.max_environments:
                return Verdict(False, "too_many_environments", too_many(len(known), self.settings.max_environments))
            if not msg.parts:
                return Verdict(False, "no_line_parts", f"a delta from environment {env!r} must carry modules: "
                               "the head has no environment lines (it stays on the device)")
        seen = view(self._loaded, base_env)
        if any(isinstance(v, int) and v > seen.get(pid, v) for pid, v in msg.base_versions.items()):
            self.refresh()
        return check_delta(msg, self.bank_id, view(self._loaded, base_env), view(self.params, env),
                           self.settings.limits, self.layer_sizes)

    def validation_accuracy(self, params: Params) -> float:
        """The gate's evaluation of full parameters (NaN while the gate is off or cannot run)."""
        return float("nan") if self._evaluate is None else self._evaluate(params)

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
        gathered = gather(stored)
        if self.settings.environments:
            gathered.bad.update(past_cap([(d.stored.delta_id, d.msg.environment) for d in gathered.decoded],
                                         self._environments, self.settings.max_environments))
            gathered.decoded = [Decoded(d.stored, rekey(d.msg, current)) for d in gathered.decoded
                                if d.stored.delta_id not in gathered.bad]
            self._open_lines([k for d in gathered.decoded for k in d.msg.parts if is_line(k)], current)
        importance = {d.stored.device_id: held_importance(self.ledger.device(d.stored.device_id))
                      for d in gathered.decoded}
        weighted = weight(gathered.decoded, set(self.params), current, importance, self.settings.weighting)
        pending = weighted.waiting
        bad = {**gathered.bad, **weighted.bad}
        self._commit_quarantine(bad)
        self._stored = {s.delta_id: s for s in stored if s.delta_id not in bad}
        self._plan = plan(pending, self.settings.support_rules(), time.time(), round_no)
        if not self._plan.ready:
            result = self._commit_settle(round_no, t0, "nothing mergeable" if not pending else "")
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
        self._commit_quarantine(bad)
        rest = [w for w in pending if w.delta_id not in bad]
        self._stored = {k: v for k, v in self._stored.items() if k not in bad}
        self._plan = plan(rest, self.settings.support_rules(), time.time(), round_no)
        if not self._plan.ready:
            result = self._commit_settle(round_no, t0, "every delta failed" if not rest else "")
        else:
            try:
                result = self._merge(self._plan.ready, t0)
            except Exception as exc:  # they fail only together: set them aside rather than retry forever
                together = {d: f"makes its round fail with others: {type(exc).__name__}: {str(exc)[:200]}"
                            for d in self._plan.ready}
                self._commit_quarantine(together)
                bad.update(together)
                self._stored = {k: v for k, v in self._stored.items() if k not in together}
                self._plan = plan([w for w in rest if w.delta_id not in together], self.settings.support_rules(),
                                  time.time(), round_no)
                self._plan.ready = {}
                result = self._commit_settle(round_no, t0, "every delta failed")
        result.quarantined.update(bad)
        return result

    def _open_lines(self, keys: list[str], current: dict[str, int]) -> None:
        """Start the environment lines ``keys`` names that do not exist yet: the shared part, at its version."""
        for key in keys:
            if key not in self._loaded:  # not committed yet: a fresh copy of the shared part, every round
                pid = split_line_key(key)[0]
                self.params[key] = dict(self.params[pid])
                self._born[key] = self._loaded[pid]
            current.setdefault(key, self._loaded.get(key, self._born.get(key, 0)))

    def bank_fault(self, parts: list[str]) -> str:
        """Why the bank cannot take a new version of ``parts`` (empty when it can)."""
        return self.bank.fault(parts)

    def _merge(self, contribs: dict[str, dict[str, list[Contribution]]], t0: float,
               dry_run: bool = False) -> RoundResult:
        """The steps of one merge: aggregate, check, decide, commit (nothing is written on a dry run)."""
        round_no = self.ledger.next_round()
        s = self.settings
        agg = aggregate(contribs, self.params, s.strategy, s.max_share, s.server_lr)
        # The gate judges the shared line on the cloud's clean validation split. An environment line is
        # judged where its data is: each device of the environment keeps it only if its holdout does not
        # get worse (edge_runtime/updates.py); clean data would take environment-specific gains for losses.
        shared = {pid: v for pid, v in self.params.items() if not is_line(pid)}
        gate = check(shared, agg.updated, [p for p in agg.candidates if not is_line(p)],
                     self.validation_accuracy if s.gate else None, s.gate_margin, self.ledger.best_released())
        gate = replace(gate, kept=gate.kept + [p for p in agg.candidates if is_line(p)])
        if dry_run:
            return RoundResult(round_no, [], [], {}, gate.before, gate.after, time.perf_counter() - t0, "dry run")
        return self._commit_round(round_no, agg, gate, decide(agg, gate, s.gate_margin), len(contribs), t0)

    # -- commit: the only writes of a round, to the bank and the ledger -----------------------------------------

    def _commit_quarantine(self, bad: dict[str, str]) -> None:
        for delta_id, why in bad.items():
            log.error("delta %s quarantined: %s", delta_id, why)
            self.ledger.quarantine(delta_id, why)

    def _commit_settle(self, round_no: int, t0: float, reason: str) -> RoundResult:
        """No part has support: record what waits and what expired; no round, no version."""
        _, _, books = book(self._stored, self._plan, {})
        self.ledger.settle(round_no, books["done"], books["waiting"], books["expired"], books["expired_parts"])
        if books["waiting"]:
            reason = reason or (f"{len(books['waiting'])} deltas wait for support from "
                                f"{self.settings.min_devices} devices")
        return RoundResult(round_no, [], [], {}, float("nan"), float("nan"), time.perf_counter() - t0, reason,
                           waiting=sorted(books["waiting"]), expired=sorted(books["expired"]))

    def _commit_round(self, round_no: int, agg: Aggregate, gate: GateResult, decision: Decision, deltas: int,
                      t0: float) -> RoundResult:
        """Write the kept parts' new versions, commit the round to the ledger, then rewrite ``bank.json``."""
        merged_ids, held_ids, books = book(self._stored, self._plan, decision.outcomes)
        if decision.reason:
            log.warning("round %d: %s", round_no, decision.reason)
        if decision.dropped:
            log.warning("round %d: left out deltas pointing against the others: %s", round_no, decision.dropped)
        current = self.versions()
        new_versions = {pid: (current[pid] if pid in current else self._born[pid]) + 1 for pid in gate.kept}
        shas = {pid: self.bank.write_part_version(pid, v, agg.updated[pid]) for pid, v in new_versions.items()}
        released = decision.released
        self.ledger.commit_round(round_no, {pid: (v, agg.lineage[pid]) for pid, v in new_versions.items()},
                                 merged_ids, held_ids, "validation_gate",
                                 {"val_before": gate.before, "val_after": gate.after, "deltas": deltas,
                                  "held_parts": decision.held_parts, "unchanged_parts": agg.unchanged,
                                  "best_released": released, "seconds": time.perf_counter() - t0,
                                  "waiting": len(books["waiting"]), "expired": len(books["expired"]),
                                  "dropped": decision.dropped},
                                 best_released=released if released == released else None, **books)
        info = self.bank.info()
        for pid, v in new_versions.items():
            rec = info.line_record(pid) if is_line(pid) else info.parts[pid]
            rec.version, rec.sha256 = v, shas[pid]
            rec.lineage.append({"version": v, "round": round_no, "deltas": agg.lineage[pid]})
        self.bank.write_info(info)
        self.params = {pid: (agg.updated[pid] if pid in new_versions else v) for pid, v in self.params.items()}
        self._loaded.update(new_versions)
        self._environments |= environments(new_versions)
        for pid in new_versions:
            self._born.pop(pid, None)  # committed: its versions count in the ledger now
        return RoundResult(round_no, merged_ids, held_ids, new_versions, gate.before, gate.after,
                           time.perf_counter() - t0, decision.reason, waiting=sorted(books["waiting"]),
                           expired=sorted(books["expired"]), dropped=decision.dropped)

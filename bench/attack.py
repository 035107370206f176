"""`eclm bench --suite attack`, part 1: poisoned deltas from a share of the fleet against every merge strategy.

Each cell of the matrix (strategy x malicious share x attack) runs the daemon's own decision code,
:class:`cloud_sync.core.SyncCore` (validation at the edge, the known-device check, the ledger, the
merge round with its strategy and validation gate), on a fresh copy of the bank, without a broker:
every device sends its profile and one delta as the bytes it would publish; the first ``k`` devices
send an attack instead of their honest delta. The merger is configured only through its public
settings (:class:`cloud_sync.merger.MergeSettings`, built from ``key=value`` options, see
:func:`merge_settings`), so new settings of the merger need no change here.

Honest and backdoor deltas are real (the edge runtime trained each device once, :mod:`bench.attack_fleet`);
the other attacks transform the attacker's honest delta (scale, sign flip, NaN, Inf, claimed weight).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.attack_fleet import Fleet, FleetDevice, stamp
from eclm.errors import ConfigError

Cap = Callable[[str, np.ndarray], np.ndarray]  # a tensor scaled down to just under the daemon's norm bound
HONEST_CODEC = "int8+zlib"  # what devices send
ATTACK_CODEC = "fp32+zlib"  # an attacker picks a codec that carries NaN and large values exactly


# -- attacks: pure functions from the attacker's deltas to the message it sends ------------------------


def _with(msg: Any, tensors: dict[str, np.ndarray] | None = None, **fields: Any) -> Any:
    out = dataclasses.replace(msg, delta_id=uuid.uuid4().hex, **fields)
    if tensors is not None:
        out.tensors = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    return out


def _max_weight(msg: Any) -> dict[str, Any]:
    """The largest weight the daemon's checks let a device claim: 10^9 samples, importance 10^6 everywhere."""
    from cloud_sync.validation import MAX_IMPORTANCE, MAX_SAMPLES

    importance = None if msg.importance is None else [[MAX_IMPORTANCE] * len(r) for r in msg.importance]
    return {"sample_count": MAX_SAMPLES, "importance": importance}


def scale100(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The honest delta x100."""
    return _with(d.honest, {name: v * 100.0 for name, v in d.honest.tensors.items()})


def signflip(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The honest delta with its sign flipped (pushes the merge backwards)."""
    return _with(d.honest, {name: -v for name, v in d.honest.tensors.items()})


def nan(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The honest delta with NaN in every tensor."""
    return _with(d.honest, {name: np.where(np.arange(v.size).reshape(v.shape) == 0, np.nan, v)
                            for name, v in d.honest.tensors.items()})


def inf(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The honest delta with +Inf in every tensor."""
    return _with(d.honest, {name: np.where(np.arange(v.size).reshape(v.shape) == 0, np.inf, v)
                            for name, v in d.honest.tensors.items()})


def inflate(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The sign-flipped delta x(n/k) (each tensor capped under the norm bound), claiming the largest weight."""
    return _with(d.honest, {name: cap(name, -v * (n / k)) for name, v in d.honest.tensors.items()},
                 **_max_weight(d.honest))


def backdoor(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The delta of a real training run on the device's samples plus triggered copies labelled the target."""
    return _with(d.backdoor)


def backdoor_boost(d: FleetDevice, n: int, k: int, cap: Cap) -> Any:
    """The backdoor delta x(n/k), each tensor capped under the norm bound, claiming the largest weight the checks
    allow (model replacement, Bagdasaryan et al. 2020, by an attacker who knows the bound).
    """
    return _with(d.backdoor, {name: cap(name, v * (n / k)) for name, v in d.backdoor.tensors.items()},
                 **_max_weight(d.backdoor))


ATTACKS: dict[str, Callable[[FleetDevice, int, int, Cap], Any]] = {
    "scale100": scale100, "signflip": signflip, "nan": nan, "inf": inf, "inflate": inflate,
    "backdoor": backdoor, "backdoor_boost": backdoor_boost,
}
BACKDOORS = ("backdoor", "backdoor_boost")
SILENT = "silent"  # not an attack: the first k devices send no delta (the second control)


def select_attacks(names: str) -> list[str]:
    """Attack names by comma-separated list, or "all"."""
    chosen = list(ATTACKS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack(s) {', '.join(unknown)}", hint=f"use all or some of {', '.join(ATTACKS)}")
    return chosen


# -- the merger's settings from key=value options ------------------------------------------------------


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: a string (e.g. strategy=median)


def merge_settings(options: Sequence[str]) -> Any:
    """:class:`MergeSettings` from ``key=value`` options; ``limits.max_relative_norm=1e9`` sets a nested field.

    Values are JSON (numbers, true/false, null, lists) or else strings. Any field MergeSettings has, now or
    later, can be set this way; an unknown key is a :class:`ConfigError` naming the fields there are.
    """
    from cloud_sync.merger import MergeSettings

    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for opt in options:
        key, sep, raw = opt.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"merge option {opt!r} is not key=value", hint="e.g. --merge-option gate_margin=0.05")
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = _value(raw)
        else:
            top[key] = _value(raw)
    fields = {f.name: f for f in dataclasses.fields(MergeSettings)}
    unknown = sorted(k for k in [*top, *nested] if k not in fields)
    if unknown:
        raise ConfigError(f"MergeSettings has no field {', '.join(unknown)}", hint=f"fields: {', '.join(fields)}")
    default = MergeSettings()
    for head, values in nested.items():
        inner = getattr(default, head)
        if not dataclasses.is_dataclass(inner):
            raise ConfigError(f"merge option {head} is not a group of settings", hint=f"use {head}=VALUE")
        names = {f.name for f in dataclasses.fields(inner)}
        bad = sorted(set(values) - names)
        if bad:
            raise ConfigError(f"{head} has no field {', '.join(bad)}", hint=f"fields: {', '.join(sorted(names))}")
        top[head] = dataclasses.replace(inner, **values)  # type: ignore[type-var]
    try:
        return MergeSettings(**top)
    except TypeError as exc:
        raise ConfigError(f"merge options: {exc}", hint="check the value types") from exc


def settings_dict(settings: Any) -> dict[str, Any]:
    """Every field of the settings, nested groups included (for the report)."""
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


# -- one cell ----------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    """Accuracy of the cloud model and of each device's sub-model for given bank parameters."""

    fleet: Fleet
    config: Any
    mean: list[float]
    std: list[float]
    bundle_weights: dict[Path, dict[str, np.ndarray]]

    @classmethod
    def make(cls, fleet: Fleet) -> Evaluator:
        from eclm.onnx_weights import read_initializers
        from exporter.config import ModelConfig
        from module_bank import DirectoryBank

        info = DirectoryBank(fleet.bank).info()
        weights = {d.bundle: read_initializers(d.bundle / "model.onnx") for d in fleet.devices}
        return cls(fleet, ModelConfig.from_dict(info.config), info.normalisation["mean"], info.normalisation["std"],
                   weights)

    def cloud(self, params: dict[str, dict[str, np.ndarray]]) -> tuple[float, float]:
        """Test accuracy and backdoor success (triggered test samples of other classes predicted as the target)."""
        import torch

        from exporter.torchio import model_from_tensors

        model = model_from_tensors(self.config, {k: v for part in params.values() for k, v in part.items()})
        m = torch.tensor(self.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).reshape(1, -1, 1, 1)
        target = self.fleet.spec.target
        others = self.fleet.test_y != target
        with torch.no_grad():
            clean = model((torch.from_numpy(self.fleet.test_x) - m) / s).argmax(1).numpy()
            trig = model((torch.from_numpy(stamp(self.fleet.test_x[others])) - m) / s).argmax(1).numpy()
        return float((clean == self.fleet.test_y).mean()), float((trig == target).mean())

    def device(self, d: FleetDevice, params: dict[str, dict[str, np.ndarray]] | None) -> tuple[float, float]:
        """The device's bundle with the bank's parameters (None: as exported): accuracy and backdoor success."""
        from eclm.parts import onnx_name
        from eclm.train_step import open_session

        weights = dict(self.bundle_weights[d.bundle])
        if params is not None:
            for part in params.values():
                for name, arr in part.items():
                    mine = weights.get(onnx_name(name))  # parts the sub-model holds, as a module update sends
                    if mine is not None and arr.dtype.kind == "f" and mine.shape == arr.shape:
                        weights[onnx_name(name)] = np.ascontiguousarray(arr, dtype=np.float32)
        sess, _kept = open_session(d.bundle / "model.onnx", weights)
        pred = sess.run(None, {"input": d.test_x.astype(np.float32)})[0].argmax(1)
        others = d.test_y != self.fleet.spec.target
        hit = float("nan")
        if others.any():
            trig = sess.run(None, {"input": stamp(d.test_x[others])})[0].argmax(1)
            hit = float((trig == self.fleet.spec.target).mean())
        return float((pred == d.test_y).mean()), hit


def _profile(d: FleetDevice, bank_id: str, importance: list[list[float]]) -> bytes:
    from eclm import wire

    msg = wire.ProfileMessage(d.name, bank_id, d.honest.bundle, d.honest.importance or importance,
                              d.honest.sample_count, profile_name="pi4",
                              modules={pid: int(v) for pid, v in d.honest.base_versions.items()}, trainable=True)
    return wire.encode(msg)


def run_cell(fleet: Fleet, ev: Evaluator, settings: Any, attack: str | None, k: int, work: Path) -> dict[str, Any]:
    """One round of the daemon's decision code with ``k`` attackers (the first ``k`` devices) sending ``attack``."""
    from cloud_sync.cli import build_hooks
    from cloud_sync.core import SyncCore, SyncSettings
    from eclm import topics, wire

    t0 = time.perf_counter()
    cell = work / f"cell-{uuid.uuid4().hex[:8]}"
    shutil.copytree(fleet.bank, cell, ignore=shutil.ignore_patterns("sync.sqlite*", "sync-client-id"))
    core = SyncCore(SyncSettings(bank_dir=cell, round_deltas=10**6, round_seconds=10**9, merge=settings), None,
                    build_hooks(cell, None, settings.gate))
    flat = {name: a for part in core.merger.params.values() for name, a in part.items()}

    def cap(name: str, v: np.ndarray) -> np.ndarray:
        # the bound of cloud_sync.validation: ||delta|| <= max_relative_norm x (||param|| + 1); the attacker
        # knows the parameters (module updates carry them) and stays 1% under it
        factor = float(getattr(settings.limits, "max_relative_norm", 1.0))
        bound = 0.99 * factor * (float(np.linalg.norm(flat[name].astype(np.float64))) + 1.0)
        norm = float(np.linalg.norm(v.astype(np.float64)))
        return v * min(1.0, bound / norm) if math.isfinite(bound) and norm > 0 else v

    try:
        n = len(fleet.devices)
        acks: dict[str, str] = {}
        sent: dict[str, str] = {}  # device -> the delta id it sent
        for i, d in enumerate(fleet.devices):
            core.handle(topics.profile(d.name), _profile(d, core.merger.bank_id, fleet.importance))
            bad = attack is not None and i < k
            if bad and attack == SILENT:
                continue
            msg = ATTACKS[attack](d, n, k, cap) if bad and attack is not None else d.honest
            sent[d.name] = msg.delta_id
            for _topic, data in core.handle(topics.delta(d.name), wire.encode(msg, codec=ATTACK_CODEC if bad
                                                                               else HONEST_CODEC)):
                ack = wire.decode(data)
                if isinstance(ack, wire.AckMessage):
                    acks[d.name] = ack.status + (f": {ack.reason.split(':')[0]}" if ack.reason else "")
        result, _ = core.run_round()
        params = core.merger.params
        val = core.merger.validation_accuracy(params)
        test, bd = ev.cloud(params)
        devices = {d.name: ev.device(d, params) for d in fleet.devices}
        summary = core.ledger.summary()
        statuses = dict(summary["deltas"])
        last = summary["recent_rounds"][0] if summary["recent_rounds"] else {}
        fate = {name: core.ledger.known(delta_id) for name, delta_id in sent.items()}
        return {
            "attack": attack or "none", "attackers": k, "val_accuracy": val, "test_accuracy": test,
            "backdoor_success": bd,
            "device_accuracy": {name: a for name, (a, _b) in devices.items()},
            "device_backdoor": {name: b for name, (_a, b) in devices.items()},
            "acks": acks, "ledger": statuses, "delta_status": fate,
            "attacker_acks": sorted({acks.get(d.name, "no ack") for d in fleet.devices[:k]}) if attack else [],
            "held_parts": list(last.get("held_parts", [])),
            "attackers_merged": sum(1 for d in fleet.devices[:k] if fate.get(d.name) == "merged")
            if attack and attack != SILENT else 0,
            "round": result.to_dict() if result is not None else None,
            "held_reason": result.reason if result is not None else "",
            "seconds": time.perf_counter() - t0,
        }
    finally:
        core.close()
        shutil.rmtree(cell, ignore_errors=True)


def attackers_for(devices: int, share: float) -> int:
    """Malicious devices for a share of the fleet: at least one."""
    return max(1, int(round(devices * share)))


def run_matrix(fleet: Fleet, strategies: Sequence[str], shares: Sequence[float], attacks: Sequence[str],
               options: Sequence[str], work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Every strategy: an honest-only control, then each share x attack; and the devices before any merge."""
    ev = Evaluator.make(fleet)
    base = merge_settings(options)
    from module_bank import DirectoryBank

    bank_params = {pid: DirectoryBank(fleet.bank).read_part(pid) for pid in DirectoryBank(fleet.bank).info().parts}
    start_test, start_bd = ev.cloud(bank_params)
    before = {d.name: ev.device(d, None) for d in fleet.devices}
    own = {}  # the attack as its sender sees it: the attacker's sub-model with its own backdoor delta applied
    for d in fleet.devices:
        if d.backdoor is not None:
            mine = {pid: {n: (a + d.backdoor.tensors[n] if n in d.backdoor.tensors else a) for n, a in part.items()}
                    for pid, part in bank_params.items()}
            own[d.name] = dict(zip(("accuracy", "backdoor_success"), ev.device(d, mine), strict=True))
    out: dict[str, Any] = {"settings": {}, "controls": {}, "silent": {}, "cells": [], "test_samples": len(fleet.test_y),
                           "start": {"test_accuracy": start_test, "backdoor_success": start_bd,
                                     "device_accuracy": {n: a for n, (a, _b) in before.items()},
                                     "device_backdoor": {n: b for n, (_a, b) in before.items()},
                                     "attacker_own_model": own}}
    for strategy in strategies:
        settings = dataclasses.replace(base, strategy=strategy)
        out["settings"][strategy] = settings_dict(settings)
        control = run_cell(fleet, ev, settings, None, 0, work)
        out["controls"][strategy] = control
        say(f"{strategy}: honest-only control: validation {control['val_accuracy']:.4f}, test "
            f"{control['test_accuracy']:.4f} ({control['seconds']:.1f} s)")
        for share in shares:
            k = attackers_for(len(fleet.devices), share)
            silent = run_cell(fleet, ev, settings, SILENT, k, work)
            out["silent"].setdefault(strategy, {})[str(share)] = silent
            for attack in attacks:
                cell = run_cell(fleet, ev, settings, attack, k, work)
                cell.update({"strategy": strategy, "share": share,
                             "val_shift": cell["val_accuracy"] - control["val_accuracy"],
                             "test_shift": cell["test_accuracy"] - control["test_accuracy"],
                             "val_shift_vs_silent": cell["val_accuracy"] - silent["val_accuracy"]})
                out["cells"].append(cell)
                say(f"{strategy} {share:.0%} {attack}: validation {cell['val_accuracy']:.4f} "
                    f"({100 * cell['val_shift']:+.1f} points), backdoor {cell['backdoor_success']:.3f}, "
                    f"acks {sorted(set(cell['acks'].values()))} ({cell['seconds']:.1f} s)")
    return out

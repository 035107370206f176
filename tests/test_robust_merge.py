"""Robust by default: support from several devices, capped weights, robust aggregation, a secret gate split,
rate-limited derivations.

Unit level with small numpy modules where the decision is pure; through the real SyncCore (a copy of the
trained digits bank, the real ledger and the validation gate's torch forward passes) where it is not.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sync_hooks import exporter_hooks
from sync_messages import layer_sizes, make_delta, make_profile

from cloud_sync.core import SyncCore, SyncSettings
from cloud_sync.merger import MergeSettings, module_weight
from cloud_sync.strategies import STRATEGIES, Contribution, cap_shares, robust_mean, weighted_mean
from cloud_sync.support import SupportRules, Waiting, plan
from cloud_sync.weights import held_importance, relative_importance
from eclm import topics, wire
from eclm.signing import generate_keys, load_signer
from exporter.data import gate_split, load_dataset, split
from module_bank import BANK_FILE, VALIDATION_SECRET_FILE, DirectoryBank

# -- strategies: pure, small numpy modules ---------------------------------------------------------------------


def c(delta: str, vec: list[float], weight: float = 1.0, device: str = "") -> Contribution:
    return Contribution(delta, {"w": np.asarray(vec, dtype=np.float32)}, weight, device or delta)


def test_robust_drops_a_sign_flipped_delta_against_two_agreeing_ones() -> None:
    honest = [c("a", [1.0, 0.9, 1.1]), c("b", [0.9, 1.1, 1.0])]
    flipped = c("x", [-10.0, -10.0, -10.0])
    out = robust_mean([*honest, flipped])
    assert out.dropped == ("x",) and "x" in out.clipped
    np.testing.assert_allclose(out.tensors["w"], [0.95, 1.0, 1.05], rtol=1e-6)
    # The plain weighted mean (FedAvg) stays available and is moved against the honest direction.
    assert float(weighted_mean([*honest, flipped]).tensors["w"].sum()) < 0
    assert STRATEGIES["weighted"] is weighted_mean and STRATEGIES["robust"] is robust_mean


def test_robust_merges_nothing_when_two_devices_point_against_each_other() -> None:
    out = robust_mean([c("a", [1.0, 1.0]), c("x", [-1.0, -1.2])])
    assert out.dropped == ("a", "x") and out.delta_norm == 0.0


def test_robust_clips_a_long_delta_to_the_others_median_norm() -> None:
    # Same direction, 100 times longer: not dropped, but no longer than the honest one.
    out = robust_mean([c("a", [3.0, 4.0]), c("big", [300.0, 400.0])])
    assert out.dropped == () and out.clipped == ("big",)
    np.testing.assert_allclose(out.tensors["w"], [3.0, 4.0], rtol=1e-6)


def test_a_zero_delta_does_not_clip_the_others_to_nothing() -> None:
    # A device whose module did not move (measured: real pi4 deltas can be all zero for a module).
    out = robust_mean([c("a", [3.0, 4.0]), c("zero", [0.0, 0.0])])
    assert out.clipped == () and out.dropped == ()
    np.testing.assert_allclose(out.tensors["w"], [1.5, 2.0], rtol=1e-6)


def test_robust_keeps_orthogonal_heterogeneous_deltas() -> None:
    # Devices of different classes move different coordinates: neither is against the other.
    out = robust_mean([c("a", [1.0, 0.0, 0.1]), c("b", [0.0, 1.0, 0.1])])
    assert out.dropped == () and out.contributors == 2


def test_one_device_alone_gets_the_plain_mean() -> None:
    out = robust_mean([c("a", [1.0], device="d"), c("b", [3.0], device="d")])
    np.testing.assert_allclose(out.tensors["w"], [2.0])


def test_cap_shares_holds_every_device_to_the_share() -> None:
    capped = cap_shares({"liar": 1e12, "a": 32.0, "b": 40.0}, 0.5)
    assert capped["liar"] == pytest.approx(72.0) and capped["a"] == 32.0 and capped["b"] == 40.0
    assert capped["liar"] / sum(capped.values()) == pytest.approx(0.5)
    two = cap_shares({"liar": 1e12, "a": 32.0}, 0.5)
    assert two == {"liar": 32.0, "a": 32.0}
    assert cap_shares({"a": 1.0, "b": 1e9}, 1.0) == {"a": 1.0, "b": 1e9}  # min devices 1: no cap
    fair = {"a": 10.0, "b": 12.0, "c": 9.0}
    assert cap_shares(fair, 0.5) == fair  # nobody above the share: untouched


# -- weights: importance from what the cloud holds, never the header ------------------------------------------


def _msg(importance: Any = None, samples: int = 32) -> wire.DeltaMessage:
    return wire.DeltaMessage(delta_id="d", device_id="dev", bank_id="b", bundle="x", base_versions={"L0M1": 1},
                             parts={"L0M1": ["w"]}, tensors={"w": np.zeros(2, np.float32)}, sample_count=samples,
                             importance=importance)


def test_header_importance_does_not_count() -> None:
    held = [[1.0, 1.0, 1.0, 1.0]]
    forged = _msg(importance=[[0.0, 1e6, 0.0, 0.0]])
    assert module_weight(forged, "L0M1", 1, held) == module_weight(_msg(), "L0M1", 1, held) == 32.0
    assert module_weight(forged, "L0M1", 1, None) == 32.0  # nothing held: neutral, not the header's
    # Relative importance is bounded by the layer's module count whatever the raw values are.
    assert relative_importance([[0.0, 1e6, 0.0, 0.0]], "L0M1") == pytest.approx(4.0)
    assert relative_importance([[0.25] * 4], "L0M3") == pytest.approx(1.0)
    assert relative_importance([[0.25] * 4], "head") == 1.0


def test_held_importance_prefers_what_the_bundle_was_derived_for() -> None:
    assert held_importance({"last_derived": json.dumps([[0.1, 0.9]]), "importance": [[0.5, 0.5]]}) == [[0.1, 0.9]]
    assert held_importance({"last_derived": "", "importance": [[0.5, 0.5]]}) == [[0.5, 0.5]]
    assert held_importance(None) is None


# -- support: pure planning ------------------------------------------------------------------------------------


def _waiting(delta: str, device: str, part: str = "L0M0", received: float = 1000.0, since: int | None = None,
             staleness: int = 0) -> Waiting:
    return Waiting(delta, device, received, since, {part: [c(delta, [1.0], device=device)]}, {part: staleness})


def test_a_lone_device_waits_and_two_devices_merge() -> None:
    rules = SupportRules(min_devices=2)
    p = plan([_waiting("a1", "A"), _waiting("a2", "A")], rules, now=1001.0, round_no=3)
    assert p.ready == {} and set(p.waiting) == {"a1", "a2"}
    assert "1 of 2 devices" in p.waiting["a1"]["L0M0"]
    p = plan([_waiting("a1", "A"), _waiting("b1", "B")], rules, now=1001.0, round_no=3)
    assert set(p.ready) == {"a1", "b1"} and p.waiting == {}


def test_waiting_parts_expire_by_age_rounds_and_staleness() -> None:
    rules = SupportRules(min_devices=2, max_age=60.0, max_rounds=3, max_staleness=2)
    p = plan([_waiting("old", "A", received=0.0)], rules, now=100.0, round_no=1)
    assert "waited 100 s" in p.expired["old"]["L0M0"]
    p = plan([_waiting("long", "A", since=2)], rules, now=1001.0, round_no=5)
    assert "3 rounds" in p.expired["long"]["L0M0"]
    p = plan([_waiting("stale", "A", staleness=3), _waiting("b", "B")], rules, now=1001.0, round_no=1)
    assert "versions behind" in p.expired["stale"]["L0M0"] and p.waiting == {"b": {"L0M0": p.waiting["b"]["L0M0"]}}


# -- through the real core ---------------------------------------------------------------------------------------


@pytest.fixture
def bank(digits_bank: Any, tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))


class Cores:
    def __init__(self, bank: Path, tmp: Path) -> None:
        self.bank = bank
        self.key, _ = generate_keys(tmp / "keys")
        self.opened: list[SyncCore] = []

    def __call__(self, **merge: Any) -> SyncCore:
        core = SyncCore(SyncSettings(bank_dir=self.bank, signing_key=self.key, round_deltas=1,
                                     merge=MergeSettings(**merge)), load_signer(self.key),
                        exporter_hooks(self.bank, self.key))
        self.opened.append(core)
        return core


@pytest.fixture
def cores(bank: Path, tmp_path: Path) -> Iterator[Cores]:
    made = Cores(bank, tmp_path)
    yield made
    for core in made.opened:
        core.close()


def send(core: SyncCore, msg: Any) -> wire.AckMessage | None:
    kind = "delta" if isinstance(msg, wire.DeltaMessage) else "profile"
    pubs = core.handle(f"{topics.PREFIX}/devices/{msg.device_id}/{kind}", wire.encode(msg))
    if not pubs:
        return None
    ack = wire.decode(pubs[0][1])
    assert isinstance(ack, wire.AckMessage)
    return ack


def join(core: SyncCore, bank: Path, device: str, **delta: Any) -> wire.DeltaMessage:
    assert send(core, make_profile(bank, device)) is None
    msg = make_delta(bank, device, **delta)
    ack = send(core, msg)
    assert ack is not None and ack.status == "stored", ack
    return msg


def test_lone_delta_waits_acked_stored_until_a_second_device_comes(cores: Cores, bank: Path) -> None:
    core = cores()
    assert core.settings.merge.min_devices == 2 and core.settings.merge.strategy == "robust"
    assert send(core, make_profile(bank, "a")) is None
    lone = make_delta(bank, "a", seed=1)
    ack = send(core, lone)
    assert ack is not None and ack.status == "stored" and "waits for support: head has 1 of 2 devices" in ack.reason
    again = make_delta(bank, "a", seed=2)  # more deltas of the same device are no more support
    assert "1 of 2" in send(core, again).reason  # type: ignore[union-attr]
    result, pubs = core.run_round()
    assert result is not None and result.versions == {} and pubs == []
    assert sorted(result.waiting) == sorted([lone.delta_id, again.delta_id])
    assert core.ledger.known(lone.delta_id) == "pending" and core.ledger.waiting() == 2
    assert core.ledger.versions()["head"] == 1
    assert not core.due() or core.ledger.ready_count() == 0  # waiting deltas do not trigger rounds by count
    other = join(core, bank, "b", seed=3)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    assert sorted(result.merged) == sorted([lone.delta_id, again.delta_id, other.delta_id])
    assert core.ledger.waiting() == 0 and core.ledger.pending_count() == 0


def test_parts_wait_apart_from_the_ones_with_support(cores: Cores, bank: Path) -> None:
    core = cores()
    a = join(core, bank, "a", part_ids=("head", "L0M0"), seed=1)
    b = join(core, bank, "b", part_ids=("head",), seed=2)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    assert result.merged == [b.delta_id] and result.waiting == [a.delta_id]
    assert core.ledger.known(a.delta_id) == "pending"
    c2 = join(core, bank, "c", part_ids=("L0M0",), seed=3)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"L0M0": 2}
    assert sorted(result.merged) == sorted([a.delta_id, c2.delta_id])
    assert sorted(core.ledger.lineage("head")[-1]["deltas"]) == sorted([a.delta_id, b.delta_id])


def test_waiting_delta_expires_visibly(cores: Cores, bank: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cloud_sync.metrics import SyncCollector

    core = cores(support_max_age=60.0)
    lone = join(core, bank, "a", seed=1)
    assert core.run_round()[0].waiting == [lone.delta_id]  # type: ignore[union-attr]
    with core.ledger.transaction() as db:  # it arrived two minutes ago
        db.execute("UPDATE deltas SET received = received - 120 WHERE delta_id = ?", (lone.delta_id,))
    result, _ = core.run_round()
    assert result is not None and result.expired == [lone.delta_id] and result.versions == {}
    assert core.ledger.known(lone.delta_id) == "expired"
    assert core.ledger.summary()["deltas"] == {"expired": 1} and core.ledger.expired_parts() == 1
    assert core.counters["expired_delta"] == 1
    registry = CollectorRegistry()
    registry.register(SyncCollector(core))
    text = generate_latest(registry).decode()
    assert 'eclm_sync_deltas{state="expired"} 1.0' in text and "eclm_sync_expired_parts_total 1.0" in text
    assert core.run_round() == (None, [])


def test_waiting_delta_expires_after_rounds(cores: Cores, bank: Path) -> None:
    core = cores(support_max_rounds=2)
    lone = join(core, bank, "a", part_ids=("L0M0",), seed=1)
    core.run_round()
    for i in range(2):  # two merge rounds of other devices' head deltas
        join(core, bank, f"h{i}a", seed=10 + i)
        join(core, bank, f"h{i}b", seed=20 + i)
        result, _ = core.run_round()
        assert result is not None and result.versions == {"head": 2 + i}
    assert core.ledger.known(lone.delta_id) == "pending"
    result, _ = core.run_round()
    assert result is not None and result.expired == [lone.delta_id]


def test_min_devices_one_merges_alone(cores: Cores, bank: Path) -> None:
    core = cores(min_devices=1)
    lone = join(core, bank, "a", seed=1)
    assert send(core, make_delta(bank, "a", seed=9)).reason == ""  # type: ignore[union-attr]
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2} and lone.delta_id in result.merged


def test_huge_sample_count_gets_no_more_than_the_capped_share(cores: Cores, bank: Path) -> None:
    """A delta claiming 10^9 samples (the most the edge check lets in) weighs as much as the honest one."""
    core = cores(strategy="weighted")
    before = {n: a.copy() for n, a in core.merger.params["head"].items()}
    honest = join(core, bank, "honest", seed=1, sample_count=32)
    liar = join(core, bank, "liar", seed=2, sample_count=10**9)
    result, _ = core.run_round()
    assert result is not None and result.versions == {"head": 2}
    after = core.merger.params["head"]
    for name, d_h in honest.tensors.items():
        expected = before[name].astype(np.float32) + 0.5 * d_h + 0.5 * liar.tensors[name]
        np.testing.assert_allclose(after[name], expected, atol=1e-6)


def test_header_importance_is_ignored_in_a_round(cores: Cores, bank: Path) -> None:
    """Two devices with the same registered importance weigh the same, whatever their headers claim."""
    core = cores(strategy="weighted")
    before = {n: a.copy() for n, a in core.merger.params["L0M0"].items()}
    sizes = layer_sizes(bank)
    forged = [[1e6] + [0.0] * (n - 1) for n in sizes]
    a = join(core, bank, "a", part_ids=("L0M0",), seed=1, importance=forged)
    b = join(core, bank, "b", part_ids=("L0M0",), seed=2, importance=[[0.0] * n for n in sizes])
    result, _ = core.run_round()
    assert result is not None and result.versions == {"L0M0": 2}
    for name in a.tensors:
        expected = before[name].astype(np.float32) + 0.5 * a.tensors[name] + 0.5 * b.tensors[name]
        np.testing.assert_allclose(core.merger.params["L0M0"][name], expected, atol=1e-6)


def test_sign_flipped_delta_is_left_out_by_default(cores: Cores, bank: Path) -> None:
    core = cores()
    before = {n: a.copy() for n, a in core.merger.params["head"].items()}
    a = join(core, bank, "a", seed=1)
    b = join(core, bank, "b", tensors={n: (t + 2e-4).astype(np.float32) for n, t in a.tensors.items()})
    flipped = join(core, bank, "x", tensors={n: (-50 * t).astype(np.float32) for n, t in a.tensors.items()},
                   sample_count=10**9)
    result, _ = core.run_round()
    assert result is not None and result.dropped == [flipped.delta_id] and result.versions == {"head": 2}
    assert sorted(result.merged) == sorted([a.delta_id, b.delta_id]) and result.held == [flipped.delta_id]
    assert core.ledger.known(flipped.delta_id) == "held"
    assert flipped.delta_id not in core.ledger.lineage("head")[-1]["deltas"]
    for name, d in a.tensors.items():  # moved along the honest direction only
        moved = core.merger.params["head"][name].astype(np.float64) - before[name]
        assert float((moved * d).sum()) > 0


# -- the gate's validation split is secret ----------------------------------------------------------------------


def test_bank_has_a_private_validation_secret_that_decides_the_gate_split(bank: Path) -> None:
    path = bank / VALIDATION_SECRET_FILE
    secret = path.read_bytes()
    assert len(secret) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret.hex() not in (bank / BANK_FILE).read_text() and "secret" not in (bank / BANK_FILE).read_text()
    ds = load_dataset("digits")
    public = split(ds, 0).val
    gate = gate_split(ds, 0, secret)
    assert len(gate.y) == len(public.y)
    assert not np.array_equal(gate.x, public.x)  # not the split anyone can rebuild from the seed
    other = gate_split(ds, 0, b"\x01" * 32)
    assert not np.array_equal(gate.x, other.x) and np.array_equal(gate.x, gate_split(ds, 0, secret).x)


def test_bank_without_a_secret_gets_one_on_first_use(cores: Cores, bank: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    (bank / VALIDATION_SECRET_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="eclm.sync.merge"):
        core = cores()
    assert "had no validation secret: made one" in caplog.text
    assert stat.S_IMODE((bank / VALIDATION_SECRET_FILE).stat().st_mode) == 0o600
    secret = (bank / VALIDATION_SECRET_FILE).read_bytes()
    core.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eclm.sync.merge"):
        cores()
    assert "validation secret" not in caplog.text and (bank / VALIDATION_SECRET_FILE).read_bytes() == secret
    assert DirectoryBank(bank).validation_secret() == (secret, False)


def test_a_new_split_forgets_the_best_released_of_the_old_one(cores: Cores, bank: Path) -> None:
    core = cores()
    core.ledger.set_meta("best_released", "0.999")  # measured on another split: not comparable
    core.close()
    (bank / VALIDATION_SECRET_FILE).unlink()
    assert cores().ledger.best_released() is None


# -- derivations are rate-limited per device, whatever asks for them ------------------------------------------


def test_profile_and_drift_requests_share_the_per_device_interval(cores: Cores, bank: Path) -> None:
    core = cores()
    sizes = layer_sizes(bank)
    flat = [[1.0 / n] * n for n in sizes]
    moved = [[1.0] + [0.0] * (n - 1) for n in sizes]
    ran: list[str] = []
    core.derivations._run_job = lambda job: ran.append(job.reason) or []  # type: ignore[method-assign]
    assert send(core, make_profile(bank, "dev", want_bundle=True)) is None
    assert core.derivations.run_once() and ran == ["requested"]
    # A drift signal (measured importance moved away from the bundle's) right after: queued, not run.
    assert send(core, make_profile(bank, "dev", measured=True, importance=moved, derived_for=flat)) is None
    assert len(core.derivations) == 1 and not core.derivations.run_once()
    assert send(core, make_profile(bank, "dev", want_bundle=True)) is None  # and again: still one job
    assert len(core.derivations) == 1 and not core.derivations.run_once()
    assert ran == ["requested"]
    assert core.derivations.run_once(now=time.time() + core.settings.derive_interval + 1)
    assert ran == ["requested", "requested"]
    # Another device is not held up by this one's interval.
    assert send(core, make_profile(bank, "other", measured=True, importance=moved, derived_for=flat)) is None
    assert core.derivations.run_once() and ran[-1] == "importance profile moved"


def test_status_says_what_waits_and_what_expired(cores: Cores, bank: Path) -> None:
    from typer.testing import CliRunner

    from cloud_sync.cli import app

    core = cores(support_max_rounds=1)
    join(core, bank, "a", part_ids=("L0M0",), seed=1)
    core.run_round()
    report = json.loads(CliRunner().invoke(app, ["status", "--bank", str(bank), "--json"]).stdout)
    assert (report["waiting_support"], report["expired_parts"]) == (1, 0)
    join(core, bank, "h1", seed=2)
    join(core, bank, "h2", seed=3)
    assert core.run_round()[0].versions == {"head": 2}  # type: ignore[union-attr]
    assert core.run_round()[0].expired  # type: ignore[union-attr]
    text = CliRunner().invoke(app, ["status", "--bank", str(bank)]).stdout
    assert "expired 1" in text and "waiting for support from more devices: 0 deltas; parts expired waiting: 1" in text


def test_no_bundle_carries_the_validation_secret(digits_bank: Any, digits_bundles: dict[str, Any]) -> None:
    secret = (digits_bank[0] / VALIDATION_SECRET_FILE).read_bytes()
    for out_dir, _ in digits_bundles.values():
        for f in Path(out_dir).rglob("*"):
            assert f.name != VALIDATION_SECRET_FILE
            if f.is_file():
                data = f.read_bytes()
                assert secret not in data and secret.hex().encode() not in data, f

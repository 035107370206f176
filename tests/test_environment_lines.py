"""Environment lines in the cloud (issue 14): deltas merge into their environment's line of each module, a
device entering an environment gets that environment's lines, round updates follow each device's environment.

Real parts: a copy of the trained digits bank, the SQLite ledger, the validation gate's torch forward passes,
Ed25519 signatures; no broker (the core is driven with the bytes a broker would deliver).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sync_messages import make_profile_in
from test_sync_core import Env, bank_env, deliver, keys, one_ack, register, updates  # noqa: F401  (keys: a fixture)

from cloud_sync.lines import behind, of_environment, rekey, view
from cloud_sync.merger import MergeSettings
from cloud_sync.validation import Limits
from cloud_sync.weights import module_weight
from eclm import topics, wire
from eclm.errors import DataError
from eclm.ids import check_environment, is_environment
from eclm.parts import line_key, split_line_key
from module_bank import DirectoryBank

PARTS = ("L0M0", "L1M0")


@pytest.fixture
def cloud(digits_bank: Any, tmp_path: Path, keys: Any) -> Iterator[Env]:  # noqa: F811
    yield from bank_env(digits_bank, tmp_path, keys)


def test_environment_and_line_key_grammar() -> None:
    assert is_environment("") and is_environment("line-3") and is_environment("site_a.cam2")
    for bad in ("a/b", "+", "#", "x" * 65, "..", "a b", "@x", 3, None):
        assert not is_environment(bad), bad
    with pytest.raises(DataError, match="environment"):
        check_environment("a/b")
    assert line_key("L0M2", "line-3") == "L0M2@line-3" and line_key("L0M2", "") == "L0M2"
    assert split_line_key("L0M2@line-3") == ("L0M2", "line-3") and split_line_key("head") == ("head", "")
    for bad in ("L0M2@", "L0M2@a/b", "nope@line-3"):
        with pytest.raises(DataError):
            split_line_key(bad)


def test_line_views_and_rekeying() -> None:
    versions = {"L0M0": 5, "head": 3, "L0M0@a": 8, "head@b": 9}
    assert view(versions, "") == {"L0M0": 5, "head": 3}
    assert view(versions, "a") == {"L0M0": 8, "head": 3}
    assert of_environment(versions, "a") == {"L0M0": 8} and of_environment(versions, "") == {"L0M0": 5, "head": 3}
    x, y = np.zeros(2, np.float32), np.ones(3, np.float32)
    msg = wire.DeltaMessage("d1", "dev", "bank", "b", {"L0M0": 7, "L1M0": 3, "head": 3},
                            {"L0M0": ["x"], "L1M0": ["z"], "head": ["y"]}, {"x": x, "z": x, "y": y}, 10,
                            environment="a", base_environment="a")
    keyed = rekey(msg, versions)
    assert keyed.parts == {"L0M0@a": ["x"], "L1M0@a": ["z"]}  # the head stays with the device: no line
    assert set(keyed.tensors) == {"x", "z"}
    assert keyed.base_versions == {"L0M0@a": 7, "L1M0@a": 3}  # counted in line a: L0M0@a lags by one
    moved = rekey(msg.__class__(**{**msg.__dict__, "base_environment": "b"}), versions)
    assert moved.base_versions == {"L0M0@a": 8, "L1M0@a": 0}  # new to line a: not stale there
    assert rekey(wire.DeltaMessage("d2", "dev", "bank", "b", {"head": 3}, {"head": ["y"]}, {}, 1), versions).parts \
        == {"head": ["y"]}


@pytest.mark.parametrize("weighting,expected", [("importance", 1.5 * 30 / 2), ("samples", 30 / 2), ("equal", 1 / 2)])
def test_weighting_ablations(weighting: str, expected: float) -> None:
    """importance x samples / (1 + staleness); ``samples`` drops the importance, ``equal`` the samples too."""
    msg = wire.DeltaMessage("d1", "dev", "bank", "b", {"L0M1@a": 4}, {"L0M1@a": ["x"]}, {}, 30)
    importance = [[0.5, 1.0, 0.5]]  # L0M1 holds 1.0 of 2.0 over 3 modules: relative importance 1.5
    assert module_weight(msg, "L0M1@a", 5, importance, weighting) == pytest.approx(expected)  # staleness 1
    with pytest.raises(Exception, match="weighting"):
        MergeSettings(weighting="loudest")


def _deliver_in(core: Any, env: Env, device: str, environment: str, *, base_environment: str | None = None,
                seed: int = 0, scale: float = 1e-3, **overrides: Any) -> wire.DeltaMessage:
    msg = env.delta(device, PARTS, seed=seed, scale=scale, environment=environment,
                    base_environment=environment if base_environment is None else base_environment, **overrides)
    pubs, _ = deliver(core, msg)
    one_ack(pubs, device, msg.delta_id, "stored")
    return msg


def test_deltas_merge_into_their_environment_line_not_the_shared_one(cloud: Env) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    info = env.info()
    before = {pid: env.params(pid) for pid in PARTS}
    v0 = {pid: info.parts[pid].version for pid in PARTS}
    a = _deliver_in(core, env, "dev-a", "line-a", seed=1)
    b = _deliver_in(core, env, "dev-b", "line-b", seed=2)
    result, _ = core.run_round()
    assert result is not None and sorted(result.merged) == sorted([a.delta_id, b.delta_id])
    assert result.versions == {f"{pid}@{e}": v0[pid] + 1 for pid in PARTS for e in ("line-a", "line-b")}
    after = env.info()
    assert {pid: after.parts[pid].version for pid in PARTS} == v0  # the shared line did not move
    for pid in PARTS:
        for n, arr in before[pid].items():
            np.testing.assert_array_equal(env.params(pid)[n], arr)
    bank = DirectoryBank(env.bank)
    for msg, e in ((a, "line-a"), (b, "line-b")):
        for pid in PARTS:
            line = bank.read_part(f"{pid}@{e}")  # checked against the hash bank.json records for the line
            for n in msg.parts[pid]:
                np.testing.assert_allclose(line[n] - before[pid][n], msg.tensors[n], atol=1e-6)
    assert set(after.lines) == {f"{pid}@{e}" for pid in PARTS for e in ("line-a", "line-b")}
    # A restarted daemon holds the lines it merged.
    again = env.reopen(core, merge=MergeSettings(min_devices=1))
    name = sorted(bank.read_part("L1M0@line-a"))[0]
    np.testing.assert_array_equal(again.merger.params["L1M0@line-a"][name], bank.read_part("L1M0@line-a")[name])


def test_the_clean_gate_holds_the_shared_line_but_not_an_environment_line(cloud: Env) -> None:
    env = cloud
    # A margin below zero: no change can pass the clean-data gate (the floor is above the best accuracy).
    core = env.core(merge=MergeSettings(min_devices=1, gate_margin=-1.0))
    v0 = {pid: env.info().parts[pid].version for pid in PARTS}
    shared = _deliver_in(core, env, "dev-s", "", seed=3)
    line = _deliver_in(core, env, "dev-a", "line-a", seed=4)
    result, _ = core.run_round()
    assert result is not None
    assert shared.delta_id in result.held and line.delta_id in result.merged
    assert result.versions == {f"{pid}@line-a": v + 1 for pid, v in v0.items()}


def test_a_device_entering_an_environment_receives_its_lines(cloud: Env) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    _deliver_in(core, env, "dev-a", "line-a", seed=5)
    result, _ = core.run_round()
    assert result is not None and result.versions
    info = env.info()
    held = {pid: info.parts[pid].version for pid in PARTS}
    pubs = core.handle(topics.profile("dev-n"), wire.encode(make_profile_in(env.bank, "dev-n", "line-a", held)))
    got = updates(pubs, env.verifier)["dev-n"]
    assert len(got) == 1 and got[0].environment == "line-a" and got[0].device_id == "dev-n"
    assert got[0].versions == {pid: info.lines[f"{pid}@line-a"].version for pid in PARTS}
    line = DirectoryBank(env.bank).read_part("L1M0@line-a")
    name = sorted(line)[0]
    np.testing.assert_array_equal(got[0].tensors[name], line[name])
    assert core.counters.get("line_pushes") == 1
    # Already there: the next profile brings nothing (round updates carry what changes later).
    assert core.handle(topics.profile("dev-n"), wire.encode(make_profile_in(env.bank, "dev-n", "line-a", held))) \
        == []
    # An environment nobody has trained in yet: nothing to send.
    assert core.handle(topics.profile("dev-m"), wire.encode(make_profile_in(env.bank, "dev-m", "line-z", held))) \
        == []


def test_round_updates_go_to_the_devices_of_the_environment_only(cloud: Env) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    info = env.info()
    held = {pid: info.parts[pid].version for pid in PARTS}
    for device, e in (("dev-x", "line-a"), ("dev-y", ""), ("dev-z", "line-b")):
        core.handle(topics.profile(device), wire.encode(make_profile_in(env.bank, device, e, held)))
    _deliver_in(core, env, "dev-a", "line-a", seed=6)
    _, pubs = core.run_round()
    by_device = updates(pubs, env.verifier)
    assert set(by_device) == {"dev-x", "dev-a"} or set(by_device) == {"dev-x"}
    assert all(m.environment == "line-a" for ms in by_device.values() for m in ms)


def test_without_environments_every_delta_merges_into_the_shared_line(cloud: Env) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1, environments=False))
    v0 = env.info().parts["L1M0"].version
    _deliver_in(core, env, "dev-a", "line-a", seed=7)
    result, _ = core.run_round()
    assert result is not None and result.versions["L1M0"] == v0 + 1 and not env.info().lines


def test_a_device_new_to_a_line_is_not_stale_there(cloud: Env) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1, limits=Limits(max_staleness=1)))
    for i in range(3):  # line-a moves 3 versions past the shared one; dev-a trains from its newest each time
        base = {pid: view(core.merger.versions(), "line-a")[pid] for pid in PARTS}
        _deliver_in(core, env, "dev-a", "line-a", seed=10 + i, base_versions=base)
        assert core.run_round()[0] is not None
    assert view(core.merger.versions(), "line-a")["L1M0"] == env.info().parts["L1M0"].version + 3
    # From the shared line (its versions count there): new to line-a, stored.
    _deliver_in(core, env, "dev-n", "line-a", base_environment="", seed=20)
    # Claiming line-a's counting with the shared base: three behind, over the limit of 1.
    stale = env.delta("dev-n", PARTS, seed=21, environment="line-a", base_environment="line-a")
    pubs, _ = deliver(core, stale)
    assert one_ack(pubs, "dev-n", stale.delta_id, "rejected").reason.startswith("stale")


def test_a_bad_environment_name_is_a_malformed_message(cloud: Env) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    register(core, "dev-a")
    msg = env.delta("dev-a", PARTS, environment="../etc")
    assert core.handle(topics.delta("dev-a"), wire.encode(msg)) == []
    assert core.ledger.summary()["rejected_by_reason"] == {"malformed": 1}


def test_module_bank_lines_survive_a_fresh_open(cloud: Env, tmp_path: Path) -> None:
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    _deliver_in(core, env, "dev-a", "line-a", seed=8)
    core.run_round()
    info = DirectoryBank(env.bank).info()
    rec = info.record("L1M0@line-a")
    assert rec is not None and rec.layer == info.parts["L1M0"].layer and rec.lineage
    assert "L1M0@line-a" not in info.parts  # export and derivation see the shared parts only


def test_status_shows_the_lines_of_each_environment(cloud: Env) -> None:
    import json

    from typer.testing import CliRunner

    import cloud_sync.cli

    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    held = {pid: env.info().parts[pid].version for pid in PARTS}
    core.handle(topics.profile("dev-x"), wire.encode(make_profile_in(env.bank, "dev-x", "line-a", held)))
    _deliver_in(core, env, "dev-a", "line-a", seed=9)
    core.run_round()
    core.close()
    report = json.loads(CliRunner().invoke(cloud_sync.cli.app, ["status", "--bank", str(env.bank), "--json"]).output)
    assert report["environment_lines"] == {"line-a": {pid: held[pid] + 1 for pid in PARTS}}
    text = CliRunner().invoke(cloud_sync.cli.app, ["status", "--bank", str(env.bank)]).output
    assert "environment line-a: 2 module lines" in text and "1 devices there now" in text


def test_the_head_has_no_lines_it_stays_with_the_device(cloud: Env) -> None:
    """The head is fitted to each device's own classes: a delta of an environment merges its modules into
    the lines and leaves its head out; a delta of nothing but a head is refused with the reason.
    """
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    head_v = env.info().parts["head"].version
    before = env.params("head")
    msg = env.delta("dev-a", ("L1M0", "head"), seed=30, environment="line-a", base_environment="line-a")
    pubs, _ = deliver(core, msg)
    one_ack(pubs, "dev-a", msg.delta_id, "stored")
    result, _ = core.run_round()
    assert result is not None and result.versions == {"L1M0@line-a": env.info().parts["L1M0"].version + 1}
    assert env.info().parts["head"].version == head_v and "head@line-a" not in env.info().lines
    np.testing.assert_array_equal(env.params("head")["head.fc.bias"], before["head.fc.bias"])
    only_head = env.delta("dev-a", ("head",), seed=31, environment="line-a", base_environment="line-a")
    pubs, _ = deliver(core, only_head)
    assert one_ack(pubs, "dev-a", only_head.delta_id, "rejected").reason.startswith("no_line_parts")
    # In the shared line the head merges as before.
    shared = env.delta("dev-b", ("head",), seed=32)
    pubs, _ = deliver(core, shared)
    one_ack(pubs, "dev-b", shared.delta_id, "stored")


def test_devices_cannot_open_environments_without_bound(cloud: Env) -> None:
    """Each environment holds copies of modules: past --max-environments a delta opening one more is refused."""
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1, max_environments=1))
    _deliver_in(core, env, "dev-a", "line-a", seed=40)
    assert core.run_round()[0] is not None
    _deliver_in(core, env, "dev-b", "line-a", seed=41)  # the one that exists takes more
    extra = env.delta("dev-c", PARTS, seed=42, environment="line-b", base_environment="line-b")
    pubs, _ = deliver(core, extra)
    ack = one_ack(pubs, "dev-c", extra.delta_id, "rejected")
    assert ack.reason.startswith("too_many_environments") and "--max-environments" in ack.reason


def test_one_round_cannot_open_environments_past_the_bound(cloud: Env) -> None:
    """Deltas from new environments wait together (each passed the check alone): the round opens lines
    up to --max-environments in arrival order and quarantines the rest, with the reason."""
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1, max_environments=2))
    a = _deliver_in(core, env, "dev-a", "line-a", seed=50)
    b = _deliver_in(core, env, "dev-b", "line-b", seed=51)
    c = _deliver_in(core, env, "dev-c", "line-c", seed=52)  # stored: no line existed when it arrived
    result, _ = core.run_round()
    assert result is not None and sorted(result.merged) == sorted([a.delta_id, b.delta_id])
    assert set(result.quarantined) == {c.delta_id}
    assert result.quarantined[c.delta_id].startswith("too_many_environments") and "--max-environments" in \
        result.quarantined[c.delta_id]
    assert {split_line_key(k)[1] for k in env.info().lines} == {"line-a", "line-b"}
    later = env.delta("dev-d", PARTS, seed=53, environment="line-d", base_environment="line-d")
    pubs, _ = deliver(core, later)  # the cap counts the committed lines at arrival now
    assert one_ack(pubs, "dev-d", later.delta_id, "rejected").reason.startswith("too_many_environments")


def test_behind_names_what_a_device_lacks_and_was_not_sent() -> None:
    current = {"L0M0": 5, "L1M0": 4, "L0M0@a": 8, "L1M0@a": 2}
    assert behind(current, "", {"L0M0": 3, "L1M0": 4}, "", {}) == {"L0M0": 5}
    assert behind(current, "", {"L0M0": 3}, "", {"L0M0": 5}) == {}  # sent before (and refused): not again
    assert behind(current, "a", {"L0M0": 9, "L1M0": 4}, "", {}) == {"L0M0@a": 8, "L1M0@a": 2}  # just entered
    assert behind(current, "a", {"L0M0": 8, "L1M0": 1}, "a", {}) == {"L1M0@a": 2}
    assert behind(current, "b", {"L0M0": 1}, "", {}) == {}  # nobody trained in b yet


def test_a_device_away_during_rounds_catches_up_in_one_update_when_it_connects(cloud: Env) -> None:
    """Round updates go to online devices; one that was away gets the newest versions once when it connects
    (not every round's update queued at the broker), and a version it refused is not sent again."""
    env = cloud
    core = env.core(merge=MergeSettings(min_devices=1))
    info = env.info()
    held = {pid: info.parts[pid].version for pid in PARTS}
    core.handle(topics.profile("dev-o"), wire.encode(make_profile_in(env.bank, "dev-o", "", held)))
    core.handle(topics.status("dev-o"), wire.encode(wire.StatusMessage("dev-o", False)))  # it goes away
    for i in range(3):
        _deliver_in(core, env, "dev-a", "", seed=60 + i,
                    base_versions={pid: core.merger.versions()[pid] for pid in PARTS})
        result, pubs = core.run_round()
        assert result is not None and result.versions
        assert "dev-o" not in updates(pubs, env.verifier)
    assert core.counters.get("module_updates_deferred", 0) >= 3
    back = wire.encode(make_profile_in(env.bank, "dev-o", "", held))
    got = updates(core.handle(topics.profile("dev-o"), back), env.verifier)["dev-o"]
    assert len(got) == 1 and got[0].versions == {pid: core.merger.versions()[pid] for pid in PARTS}
    assert held != got[0].versions and core.counters.get("catch_up_updates") == 1
    # It refused them (its profile still reports the old versions): not sent again on its next connect,
    # nor by a daemon restarted meanwhile (what was sent is kept in the ledger, not in one process).
    assert core.handle(topics.profile("dev-o"), back) == []
    again = env.reopen(core, merge=MergeSettings(min_devices=1))
    assert again.handle(topics.profile("dev-o"), back) == []
    assert again.ledger.device("dev-o")["sent"] == got[0].versions

"""A validation gate that cannot run never passes a merge: nothing merges, and status and metrics say why.

Before, a bank whose data set could not be loaded logged a warning and merged every delta ungated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from sync_hooks import exporter_hooks
from sync_messages import make_delta, make_profile
from typer.testing import CliRunner

from cloud_sync.cli import app
from cloud_sync.core import SyncCore, SyncSettings
from cloud_sync.merger import MergeSettings
from cloud_sync.metrics import SyncCollector
from cloud_sync.ports import SyncHooks
from eclm import topics, wire
from eclm.errors import DataError
from module_bank import BANK_FILE


def _bank_without_data(digits_bank, tmp_path: Path) -> Path:
    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))
    info = json.loads((bank / BANK_FILE).read_text())
    info["dataset"] = str(tmp_path / "gone.npz")  # the data set the bank was trained on is not on this machine
    (bank / BANK_FILE).write_text(json.dumps(info))
    return bank


def _deliver(core: SyncCore, bank: Path, device: str, seed: int) -> str:
    core.handle(topics.profile(device), wire.encode(make_profile(bank, device)))
    msg = make_delta(bank, device, seed=seed)
    core.handle(topics.delta(device), wire.encode(msg))
    return msg.delta_id


def test_without_validation_data_nothing_merges_and_status_and_metrics_say_why(digits_bank, tmp_path: Path) -> None:
    bank = _bank_without_data(digits_bank, tmp_path)
    core = SyncCore(SyncSettings(bank_dir=bank, merge=MergeSettings(min_devices=1)), None, exporter_hooks(bank))
    try:
        ids = [_deliver(core, bank, f"dev-{i}", i) for i in range(2)]
        assert core.merger.gate_problem and "--no-gate" in core.merger.gate_problem
        result, _pubs = core.run_round()
        assert result is None  # no round ran
        assert core.ledger.summary()["deltas"].get("pending") == len(ids)  # nothing lost, nothing merged
        registry = CollectorRegistry()
        registry.register(SyncCollector(core))
        assert "eclm_sync_gate_unavailable 1.0" in generate_latest(registry).decode()
    finally:
        core.close()
    status = CliRunner().invoke(app, ["status", "--bank", str(bank), "--json"])
    assert status.exit_code == 0, status.output
    assert "no validation data for the gate" in json.loads(status.output)["gate_problem"]
    text = CliRunner().invoke(app, ["status", "--bank", str(bank)])
    assert "MERGING STOPPED" in text.output


def test_no_gate_merges_without_validation_data_when_asked(digits_bank, tmp_path: Path) -> None:
    bank = _bank_without_data(digits_bank, tmp_path)
    core = SyncCore(SyncSettings(bank_dir=bank, merge=MergeSettings(min_devices=1, gate=False)), None,
                    exporter_hooks(bank, gate=False))
    try:
        ids = [_deliver(core, bank, f"dev-{i}", i) for i in range(2)]
        assert core.merger.gate_problem == ""
        result, _pubs = core.run_round()
        assert result is not None and sorted(result.merged) == sorted(ids)
    finally:
        core.close()


def test_without_an_injected_evaluation_nothing_merges(digits_bank, tmp_path: Path) -> None:
    """The bank's data is here, but nobody handed the daemon the gate's evaluation: that stops merging too."""
    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))
    core = SyncCore(SyncSettings(bank_dir=bank, merge=MergeSettings(min_devices=1)), None,
                    SyncHooks())
    try:
        ids = [_deliver(core, bank, f"dev-{i}", i) for i in range(2)]
        assert "no evaluation was given to the validation gate" in core.merger.gate_problem
        assert core.run_round() == (None, [])
        assert core.ledger.summary()["deltas"].get("pending") == len(ids)
    finally:
        core.close()
    assert "MERGING STOPPED" in CliRunner().invoke(app, ["status", "--bank", str(bank)]).output


def test_an_evaluation_that_cannot_be_built_stops_merging(digits_bank, tmp_path: Path) -> None:
    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))

    def broken(info: object, secret: bytes) -> None:
        raise DataError("the validation set is on another machine", hint="copy it here")

    core = SyncCore(SyncSettings(bank_dir=bank, merge=MergeSettings(min_devices=1)), None,
                    SyncHooks(broken))  # type: ignore[arg-type]
    try:
        _deliver(core, bank, "dev-0", 0)
        assert "the validation set is on another machine" in core.merger.gate_problem
        assert core.run_round() == (None, [])
    finally:
        core.close()


def test_no_gate_needs_no_evaluation(digits_bank, tmp_path: Path) -> None:
    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))
    core = SyncCore(SyncSettings(bank_dir=bank, merge=MergeSettings(min_devices=1, gate=False)), None,
                    SyncHooks())
    try:
        delta_id = _deliver(core, bank, "dev-0", 0)
        result, _ = core.run_round()
        assert core.merger.gate_problem == "" and result is not None and result.merged == [delta_id]
    finally:
        core.close()

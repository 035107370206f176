"""The merger, status and the exporter on a PostgreSQL bank: the same behaviour as on a directory bank."""

from __future__ import annotations

import json
from pathlib import Path

from pg import pg_url  # noqa: F401 - fixture
from sync_hooks import exporter_hooks
from sync_messages import make_delta, make_profile
from typer.testing import CliRunner

from cloud_sync.cli import app
from cloud_sync.core import SyncCore, SyncSettings
from cloud_sync.merger import MergeSettings
from eclm import topics, wire
from eclm.manifest import read_manifest
from exporter.export import ExportRequest, export_bundle
from module_bank import copy_bank, open_store


def test_a_bank_copied_into_postgresql_merges_reports_and_exports(digits_bank, pg_url: str, tmp_path: Path  # noqa: F811
                                                                  ) -> None:
    info = copy_bank(digits_bank[0], pg_url)
    assert open_store(pg_url).info().bank_id == info.bank_id
    assert open_store(pg_url).validation_secret()[0] == open_store(digits_bank[0]).validation_secret()[0]
    core = SyncCore(SyncSettings(bank_dir=pg_url, merge=MergeSettings(min_devices=2)), None, exporter_hooks(pg_url))
    try:
        acks = []
        for i in range(2):
            core.handle(topics.profile(f"dev-{i}"), wire.encode(make_profile(pg_url, f"dev-{i}")))
            msg = make_delta(pg_url, f"dev-{i}", seed=i)
            acks += [wire.decode(p) for _t, p in core.handle(topics.delta(f"dev-{i}"), wire.encode(msg))]
        assert [a.status for a in acks] == ["stored", "stored"]  # type: ignore[attr-defined]
        result, _ = core.run_round()
        assert result is not None and result.versions == {"head": 2}, result
    finally:
        core.close()
    assert open_store(pg_url).info().parts["head"].version == 2
    status = CliRunner().invoke(app, ["status", "--bank", pg_url, "--json"])
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert report["module_versions"] == {"head": 2} and report["deltas"] == {"merged": 2}
    assert report["merge_claim"].startswith("local ")  # the round's updates were not published: still held
    assert report["derive_queue"] == {"queued": 0, "running": 0}
    out = tmp_path / "bundle"
    export_bundle(ExportRequest(bank_dir=pg_url, profile="pi4", out_dir=out, measure=False))
    manifest = read_manifest(out)
    assert manifest.bank_id == info.bank_id
    versions = {m.get("part_id", m.get("id")): m.get("version") for m in manifest.modules + manifest.fixed_parts}
    assert versions.get("head") == 2, versions


def test_copy_bank_command_moves_a_lab_bank_into_postgresql_once(digits_bank, pg_url: str) -> None:  # noqa: F811
    done = CliRunner().invoke(app, ["copy-bank", "--from", str(digits_bank[0]), "--to", pg_url])
    assert done.exit_code == 0, done.output
    assert open_store(pg_url).info().bank_id == open_store(digits_bank[0]).info().bank_id
    again = CliRunner().invoke(app, ["copy-bank", "--from", str(digits_bank[0]), "--to", pg_url])
    assert again.exit_code != 0 and "already holds a bank" in again.output

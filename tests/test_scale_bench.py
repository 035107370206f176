"""The scale suite's driver (`eclm bench --suite scale`) end to end, small: 50 simulated devices over a real
mosquitto against one real `eclm-cloud sync` on SQLite, then a kill -9 of the daemon mid-round and a restart.

Every delta must be acknowledged as stored and merged exactly once (one lineage entry per part), the
kill -9 included, and the JSON and markdown must be written with those counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broker import mosquitto_binary

from bench.scale import names, scale_suite
from bench.scale_cell import cli_error
from eclm.errors import ConfigError

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto")


def test_fifty_devices_and_a_kill_are_merged_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.scale_fault

    monkeypatch.setattr(bench.scale_fault, "RESEND_AFTER", 3.0)  # the simulated outboxes retry sooner
    out = tmp_path / "out"
    res = scale_suite(out, False, [1], ["sqlite"], lambda m: None, devices=[50], rate_run=False,
                      cache=tmp_path / "cache", timeout=60, stage_deltas=50)
    cell = res["cells"][0]
    assert cell["available"], cell
    assert cell["acked"] == 50 and cell["ack_statuses"] == {"stored": 50}
    assert cell["ledger"] == {"merged": 50}
    assert cell["exactly_once"]["ok"] and cell["exactly_once"]["stored"] == 50
    assert cell["updated_devices"] == 50  # every device got a module update after its delta
    assert cell["stored_per_s"] > 0 and cell["ack_ms_p99"] >= cell["ack_ms_p50"] > 0
    assert cell["broker_rss_mib"] > 0 and cell["workers_rss_mib"] > 0

    fault = res["fault"]
    assert fault["available"] and fault["workers"] == 1
    assert fault["fault"]["killed"] == "the sync process"
    assert fault["exactly_once"]["ok"], fault["exactly_once"]
    assert fault["exactly_once"]["stored"] == 50 and fault["ledger"] == {"merged": 50}

    saved = json.loads((out / "scale.json").read_text())
    assert saved["cells"][0]["exactly_once"]["ok"]
    md = (out / "scale.md").read_text()
    assert "`eclm bench --suite scale --devices 50 --workers 1 --backends sqlite`" in md
    assert "50/50 acked, 50 merged, exactly once" in md and "every stored delta merged exactly once" in md
    assert (out / "scale.png").exists()
    assert saved["stages"]["acks"] == 50 and saved["stages"]["handle_ms_per_delta"] > 0


def test_a_refused_flag_is_reported_by_its_error_line() -> None:
    text = "Usage: eclm-cloud sync [OPTIONS]\n╭─ Error ───╮\n│ No such option: --workers │\n╰───────────╯"
    assert cli_error(text) == "No such option: --workers"
    with pytest.raises(ConfigError):
        names("sqlite,mysql")

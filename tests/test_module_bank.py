"""The bank package on both backends: migrations, parts, the ledger, claims and jobs (real SQLite, real PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _eclm_testutil import subprocess_env
from pg import pg_url  # noqa: F401 - fixture

from eclm.errors import BankError
from module_bank import BankInfo, ClaimLost, Job, JobQueue, Ledger, PartRecord, open_bank, open_store
from module_bank.db import connect, redact
from module_bank.migrations import LATEST, migrate, schema_version
from module_bank.work import claim, fence, holder, release


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        tmp_path.joinpath("bank").mkdir()
        return str(tmp_path / "bank")
    return str(request.getfixturevalue("pg_url"))


def small_bank(location: str) -> tuple[BankInfo, dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    tensors = {"stem": {"stem.w": rng.normal(size=(4, 3)).astype(np.float32)},
               "l0m0": {"layers.0.0.w": rng.normal(size=(3, 3)).astype(np.float32),
                        "layers.0.0.n": np.array(3, dtype=np.int64)}}
    parts = {"stem": PartRecord("stem", "fixed", 1, "", {"params": 12}),
             "l0m0": PartRecord("l0m0", "module", 1, "", {"params": 9}, layer=0, index=0, width=1.0)}
    info = BankInfo("b" * 16, {"name": "t"}, "digits", 0, {"mean": [0.0], "std": [1.0]}, ["a", "b"], parts)
    open_store(location).write(info, tensors)
    return info, tensors


def test_migrations_run_once_and_refuse_a_newer_schema(location: str) -> None:
    db = connect(location)
    assert migrate(db) == LATEST
    assert migrate(db) == 0
    assert schema_version(db) == LATEST
    with db.transaction() as tx:
        tx.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (?, 'future', 0)", (LATEST + 1,))
    with pytest.raises(BankError, match="upgrade ECLM"):
        migrate(db)
    db.close()


def test_a_ledger_from_before_versioned_migrations_is_brought_up_to_date(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(str(tmp_path / "sync.sqlite"))
    old.executescript("CREATE TABLE deltas (delta_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, received REAL NOT "
                      "NULL, status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', "
                      "payload BLOB, merged_round INTEGER, bytes INTEGER NOT NULL DEFAULT 0);"
                      "INSERT INTO deltas (delta_id, device_id, received, status, payload) "
                      "VALUES ('d1', 'dev', 1.0, 'pending', x'00');")
    old.close()
    ledger = Ledger(tmp_path / "sync.sqlite")
    assert [s.delta_id for s in ledger.pending()] == ["d1"]
    assert ledger.support() == {}  # the added parts column defaults to none
    ledger.close()


def test_parts_round_trip_and_tampering_is_caught(location: str) -> None:
    info, tensors = small_bank(location)
    store = open_store(location)
    assert store.exists()
    again = store.info()
    assert again.bank_id == info.bank_id and again.parts["l0m0"].sha256 == info.parts["l0m0"].sha256
    got = store.read_part("l0m0")
    np.testing.assert_array_equal(got["layers.0.0.w"], tensors["l0m0"]["layers.0.0.w"])
    sha2 = store.write_part_version("l0m0", 2, {"layers.0.0.w": np.zeros((3, 3), np.float32)})
    assert store.version_sha256("l0m0", 2) == sha2 and store.version_sha256("l0m0", 3) is None
    secret, made = store.validation_secret()
    assert len(secret) == 32 and made is False  # made when the bank was written
    assert store.validation_secret() == (secret, False)
    # Corrupt version 1 behind the bank's back: reading it is refused.
    if location.startswith("postgresql"):
        db = connect(location)
        with db.transaction() as tx:
            tx.execute("UPDATE part_tensors SET data = ? WHERE part_id = 'l0m0' AND version = 1", (b"junk",))
    else:
        Path(location, "parts", "l0m0", "v1.safetensors").write_bytes(b"junk")
    with pytest.raises(BankError, match="sha256"):
        store.read_part("l0m0")


def test_ledger_stores_each_delta_once_across_processes(location: str) -> None:
    """Two processes store the same 300 delta ids at once: 300 rows, each id stored by exactly one."""
    connect(location).close()
    script = textwrap.dedent(f"""
        from module_bank import Ledger
        from module_bank.db import connect
        ledger = Ledger(connect({location!r}))
        print(sum(ledger.store_delta(f"d{{i}}", f"dev{{i % 7}}", b"x" * 10, ["l0m0"]) for i in range(300)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env()) for _ in range(2)]
    stored = [int(p.communicate(timeout=120)[0].strip()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(stored) == 300
    ledger = Ledger(connect(location))
    assert ledger.pending_count() == 300
    assert ledger.support() == {"l0m0": {f"dev{i}" for i in range(7)}}
    ledger.close()


def test_ledger_round_commit_and_reports(location: str) -> None:
    ledger = Ledger(connect(location))
    ledger.seed_versions({"l0m0": 1})
    assert ledger.store_delta("a", "dev1", b"p", ["l0m0"]) and not ledger.store_delta("a", "dev1", b"p", ["l0m0"])
    ledger.store_delta("b", "dev2", b"p", ["l0m0"])
    ledger.reject("bad_shape", "x", "c", "dev3", 5)
    ledger.reject("bad_shape", "x", "c", "dev3", 5)  # the same id is not counted twice
    ledger.commit_round(1, {"l0m0": (2, ["a", "b"])}, ["a", "b"], [], "validation_gate", {"val_after": 0.9},
                        best_released=0.9)
    assert ledger.versions() == {"l0m0": 2}
    assert ledger.lineage("l0m0")[-1]["deltas"] == ["a", "b"]
    assert ledger.delta_states()["a"] == ("merged", 1)
    summary = ledger.summary()
    assert summary["deltas"] == {"merged": 2, "rejected": 1} and summary["rejected_by_reason"] == {"bad_shape": 1}
    assert ledger.best_released() == 0.9 and ledger.next_round() == 2
    ledger.touch_device("dev1", modules={"l0m0": 2}, profiled=1)
    assert ledger.known_device("dev1") and ledger.devices()[0]["modules"] == {"l0m0": 2}
    ledger.record_quarantine("message", "t", "why")
    assert ledger.quarantined()[0]["reason"] == "why"
    assert ledger.set_meta_once("k", "1") and not ledger.set_meta_once("k", "2") and ledger.meta("k") == "1"
    ledger.close()


def test_claims_lease_renew_lapse_and_fence(location: str) -> None:
    db = connect(location)
    migrate(db)
    assert claim(db, "merge", "w1", 30, now=100.0)
    assert not claim(db, "merge", "w2", 30, now=110.0)  # held
    assert claim(db, "merge", "w1", 30, now=120.0)  # renewed by its owner
    assert claim(db, "merge", "w2", 30, now=151.0)  # lapsed: taken over
    assert holder(db, "merge") == ("w2", 181.0)
    with pytest.raises(ClaimLost), db.transaction() as tx:
        tx.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
        fence(tx, "merge", "w1")
    assert db.query("SELECT COUNT(*) FROM meta WHERE key = 'x'")[0][0] == 0  # rolled back
    with db.transaction() as tx:
        fence(tx, "merge", "w2")
    release(db, "merge", "w2")
    assert holder(db, "merge") is None
    db.close()


def test_jobs_newest_wins_one_per_device_rate_limited(location: str) -> None:
    queue = JobQueue(connect(location), min_interval=60.0, lease=10.0)
    queue.submit(Job("dev1", "pi4", [[0.1]], "old"), now=1.0)
    queue.submit(Job("dev1", "pi4", [[0.2]], "new"), now=2.0)
    queue.submit(Job("dev2", "pi4", [[0.3]], "other"), now=3.0)
    assert queue.counts(now=3.0) == {"queued": 2, "running": 0}
    first = queue.take("w1", now=4.0)
    second = queue.take("w2", now=4.0)
    assert first is not None and second is not None
    assert (first.device, first.reason, first.importance) == ("dev1", "new", [[0.2]]) and second.device == "dev2"
    assert queue.take("w3", now=5.0) is None  # both leased
    assert queue.counts(now=5.0) == {"queued": 0, "running": 2}
    queue.submit(Job("dev1", "pi4", [[0.4]], "newer"), now=6.0)  # arrives while dev1's job runs
    queue.finish(first, now=7.0)
    queue.finish(second, now=7.0)
    assert queue.take("w1", now=8.0) is None  # dev1 derived 1 s ago: its next job waits for the interval
    again = queue.take("w1", now=68.0)
    assert again is not None and again.reason == "newer"
    # A worker that died holding a job: the lease lapses and another takes it.
    assert queue.take("w3", now=70.0) is None
    lapsed = queue.take("w3", now=68.0 + 10.0 + 1.0)
    assert lapsed is not None and lapsed.device == "dev1"
    queue.db.close()


def test_take_skips_rows_locked_by_another_worker(pg_url: str) -> None:  # noqa: F811
    """On PostgreSQL two workers taking at the same moment get different jobs (FOR UPDATE SKIP LOCKED)."""
    queue = JobQueue(connect(pg_url), min_interval=0.0)
    for i in range(4):
        queue.submit(Job(f"dev{i}", "pi4", [[0.0]], "r"), now=float(i))
    import psycopg

    other = psycopg.connect(pg_url, autocommit=False)
    locked = other.execute("SELECT device_id FROM jobs ORDER BY enqueued LIMIT 1 FOR UPDATE").fetchone()
    got = queue.take("w1", now=10.0)  # does not wait for the locked row
    assert locked is not None and got is not None and got.device != locked[0]
    other.rollback()
    other.close()
    queue.db.close()


def test_open_bank_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="eclm-cloud train"):
        open_bank(tmp_path / "nothing")
    with pytest.raises(BankError, match="start PostgreSQL"):
        open_bank("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1")
    assert redact("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


def test_read_ledger_reads_beside_a_writer_without_writing(location: str) -> None:
    from module_bank import read_ledger

    writer = Ledger(connect(location))
    writer.store_delta("a", "dev", b"p", ["l0m0"])
    reader = read_ledger(location)
    with writer.transaction() as tx:  # a writer holds its transaction open: the reader still reads
        tx.execute("UPDATE deltas SET reason = 'x' WHERE delta_id = 'a'")
        assert reader.delta_rows() == [("a", "dev", "pending", "")]
    assert reader.delta_rows() == [("a", "dev", "pending", "x")]
    if not location.startswith("postgresql"):
        with pytest.raises(Exception, match="readonly"):
            reader.store_delta("b", "dev", b"p", [])
    reader.close()
    writer.close()

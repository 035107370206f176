"""The module bank: reproducible training, its bank.json, and refusal of missing or tampered files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _eclm_testutil import SEED

from eclm.errors import BankError
from eclm.hashing import sha256_file
from eclm.tensors import tensors_digest
from exporter.cloud import TrainOptions, train_bank
from exporter.config import ModelConfig, get_config
from exporter.export import ExportRequest, export_bundle
from exporter.torchio import model_from_bank
from exporter.train import accuracy, to_tensors
from module_bank import BANK_FILE, BankInfo, DirectoryBank, bank_id_for

COST_KEYS = {"params", "param_bytes", "flops", "activation_bytes"}


def _small(bank_dir: Path, seed: int = 0) -> BankInfo:
    return train_bank(TrainOptions(dataset="digits", bank_dir=bank_dir, seed=seed, epochs=3, enhance_epochs=1))


@pytest.fixture(scope="module")
def twin_banks(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[Path, BankInfo], tuple[Path, BankInfo]]:
    root = tmp_path_factory.mktemp("twins")
    return (root / "a", _small(root / "a")), (root / "b", _small(root / "b"))


def _copy_bank(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_same_seed_same_bank(twin_banks) -> None:
    (dir_a, info_a), (dir_b, info_b) = twin_banks
    assert info_a.bank_id == info_b.bank_id
    assert info_a.subtasks == info_b.subtasks
    a, b = DirectoryBank(dir_a).read_all(), DirectoryBank(dir_b).read_all()
    assert set(a) == set(b) and a
    different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    assert not different, different[:5]
    files_a = sorted(p.relative_to(dir_a) for p in dir_a.rglob("*.safetensors"))
    files_b = sorted(p.relative_to(dir_b) for p in dir_b.rglob("*.safetensors"))
    assert files_a == files_b
    for rel in files_a:
        assert (dir_a / rel).read_bytes() == (dir_b / rel).read_bytes(), rel


def test_different_seed_different_bank(twin_banks, tmp_path: Path) -> None:
    (_, info_a), _ = twin_banks
    other = train_bank(TrainOptions(dataset="digits", bank_dir=tmp_path / "c", seed=1, epochs=1, enhance_epochs=1))
    assert other.bank_id != info_a.bank_id


def test_reduced_config_is_recorded(twin_banks) -> None:
    (_, info), _ = twin_banks
    cfg = ModelConfig.from_dict(info.config)
    assert cfg.train.epochs == 3 and cfg.train.enhance_epochs == 1
    assert info.metrics["stage1"]["epochs"] == 3 and info.metrics["enhance"]["epochs"] == 1


def test_bank_json(digits_bank) -> None:
    bank_dir, info = digits_bank
    data = json.loads((bank_dir / BANK_FILE).read_text(encoding="utf-8"))
    assert data["schema_version"] == 1
    assert data["bank_id"] == info.bank_id
    assert data["dataset"] == "digits" and data["seed"] == SEED
    assert data["labels"] == [str(i) for i in range(10)]
    cfg = get_config("digits")
    modules = {f"L{la}M{i}" for la, ls in enumerate(cfg.layers) for i in range(ls.num_modules)}
    fixed = {"stem", "selector.embed", "head"} | {f"selector.gate{la}" for la in range(len(cfg.layers))}
    assert set(data["parts"]) == modules | fixed
    for pid, part in data["parts"].items():
        assert part["part_id"] == pid
        assert part["version"] == 1, pid
        assert set(part["costs"]) == COST_KEYS, pid
        assert all(isinstance(v, int) and v >= 0 for v in part["costs"].values()), pid
        assert part["kind"] == ("module" if pid in modules else "fixed")
        assert part["lineage"] and part["lineage"][0]["version"] == 1
        path = bank_dir / "parts" / pid / "v1.safetensors"
        assert path.is_file() and sha256_file(path) == part["sha256"], pid
        if pid in modules:
            layer, index = (int(v) for v in pid[1:].split("M"))
            assert (part["layer"], part["index"]) == (layer, index)
            assert part["width"] == cfg.layers[layer].widths[index]
            spec = cfg.layers[layer]
            identity = part["width"] == 0.0 and spec.in_channels == spec.out_channels and spec.stride == 1
            assert (part["costs"]["params"] == 0) == identity, pid
    assert data["parts"]["head"]["costs"]["params"] == 32 * 10 + 10


def test_bank_id_is_content_address(digits_bank) -> None:
    bank_dir, info = digits_bank
    bank = DirectoryBank(bank_dir)
    digests = {pid: tensors_digest(bank.read_part(pid)) for pid in info.parts}
    assert bank_id_for(bank.info().config, digests) == info.bank_id


def test_metrics_and_subtasks(digits_bank) -> None:
    _, info = digits_bank
    m = info.metrics
    assert m["train_samples"] + m["val_samples"] + m["test_samples"] == 1797
    assert 0.0 <= m["test_accuracy"] <= 1.0
    flat = sorted(c for group in info.subtasks for c in group)
    assert flat == list(range(10))
    assert len(info.subtasks) == get_config("digits").train.num_subtasks


def test_bank_reloads_the_trained_model(digits_bank, digits_splits) -> None:
    bank_dir, info = digits_bank
    model = model_from_bank(DirectoryBank(bank_dir))
    x, y = to_tensors(digits_splits.pool, info.normalisation["mean"], info.normalisation["std"])
    assert accuracy(model, x, y) == pytest.approx(info.metrics["test_accuracy"], abs=1e-12)


def test_tampered_part_is_refused(digits_bank, tmp_path: Path) -> None:
    bank_dir, _ = digits_bank
    copy = _copy_bank(bank_dir, tmp_path / "bank")
    bank = DirectoryBank(copy)
    bank.read_part("L1M2")  # intact copy reads fine
    path = copy / "parts" / "L1M2" / "v1.safetensors"
    _flip_byte(path)
    with pytest.raises(BankError, match="does not match its recorded sha256") as exc:
        bank.read_part("L1M2")
    assert str(path) in str(exc.value) and exc.value.hint
    with pytest.raises(BankError):
        bank.read_all()
    bank.read_part("L1M3")  # other parts are unaffected


def test_missing_part_file_and_unknown_part(digits_bank, tmp_path: Path) -> None:
    bank_dir, _ = digits_bank
    copy = _copy_bank(bank_dir, tmp_path / "bank")
    (copy / "parts" / "head" / "v1.safetensors").unlink()
    bank = DirectoryBank(copy)
    with pytest.raises(BankError, match="missing"):
        bank.read_part("head")
    with pytest.raises(BankError, match="no part 'L9M9'"):
        bank.read_part("L9M9")


def test_corrupt_or_future_bank_json(digits_bank, tmp_path: Path) -> None:
    bank_dir, _ = digits_bank
    copy = _copy_bank(bank_dir, tmp_path / "bank")
    bank_json = copy / BANK_FILE
    data = json.loads(bank_json.read_text())
    bank_json.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(BankError, match="schema version 2"):
        DirectoryBank(copy).info()
    bank_json.write_text("{not json")
    with pytest.raises(BankError, match="corrupt"):
        DirectoryBank(copy).info()


def test_missing_bank_dir_has_a_hint(tmp_path: Path) -> None:
    bank = DirectoryBank(tmp_path / "nope")
    assert not bank.exists()
    with pytest.raises(BankError) as exc:
        bank.info()
    assert "no module bank" in exc.value.message and str(tmp_path / "nope") in exc.value.message
    assert exc.value.hint and "eclm-cloud train" in exc.value.hint
    assert exc.value.hint in str(exc.value)
    assert exc.value.exit_code == 13
    with pytest.raises(BankError):
        bank.read_part("stem")
    with pytest.raises(BankError, match="no module bank"):
        export_bundle(ExportRequest(tmp_path / "nope", profile="pi4", out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()

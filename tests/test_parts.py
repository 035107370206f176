"""The part-id and parameter-name grammar (eclm/parts.py), and that exporter, trainer and merger agree through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from eclm import parts
from eclm.errors import DataError
from eclm.manifest import read_manifest
from eclm.wire import DeltaMessage


def test_module_ids_round_trip() -> None:
    for layer, index in [(0, 0), (0, 9), (3, 15), (12, 104)]:
        pid = parts.module_id(layer, index)
        assert pid == f"L{layer}M{index}"
        assert parts.is_module_id(pid) and parts.parse_module_id(pid) == (layer, index)
        assert parts.check_part_id(pid) == pid


def test_gate_ids_round_trip() -> None:
    for layer in (0, 1, 11):
        assert parts.parse_gate_id(parts.gate_id(layer)) == layer
        assert parts.is_gate_id(parts.gate_id(layer)) and not parts.is_module_id(parts.gate_id(layer))


@pytest.mark.parametrize("bad", ["", "L", "LM", "L1", "M1", "L1M", "LxMy", "L1Mx", "L-1M0", "L01M0", "L0M01",
                                 "l0m0", "L0M0 ", " L0M0", "L0M0M1", "L1.5M0", "L\u0661M0", "head.", "Head",
                                 "selector.gate", "selector.gatex", "selector.gate01", "normalisation"])
def test_invalid_part_ids_are_refused(bad: str) -> None:
    with pytest.raises(DataError):
        parts.check_part_id(bad)
    assert not parts.is_module_id(bad)
    with pytest.raises(DataError):
        parts.parse_module_id(bad)


def test_non_strings_and_negative_positions_are_refused() -> None:
    for bad in (None, 3, b"L0M0"):
        assert not parts.is_module_id(bad)  # type: ignore[arg-type]
        with pytest.raises(DataError):
            parts.parse_module_id(bad)  # type: ignore[arg-type]
    for layer, index in [(-1, 0), (0, -1), (True, 0)]:
        with pytest.raises(DataError):
            parts.module_id(layer, index)
    with pytest.raises(DataError):
        parts.gate_id(-1)


def test_parameter_names_map_to_their_part_and_back() -> None:
    cases = {
        "layers.2.mods.m7.conv.weight": "L2M7",
        "layers.0.mods.m0.bn.running_mean": "L0M0",
        "selector.gates.3.weight": "selector.gate3",
        "selector.noise.1.weight": "selector.gate1",
        "selector.embed.0.weight": "selector.embed",
        "stem.conv.weight": "stem",
        "head.fc.bias": "head",
    }
    for bank, pid in cases.items():
        onnx = parts.onnx_name(bank)
        assert onnx == "net." + bank and parts.bank_name(onnx) == bank and parts.bank_name(bank) == bank
        assert parts.part_of(bank) == pid and parts.part_of(onnx) == pid
        assert any(bank.startswith(p) for p in parts.prefixes(pid))
        assert any(onnx.startswith(p) for p in parts.onnx_prefixes(pid))
    assert parts.part_of("norm_mean") == parts.NORMALISATION


@pytest.mark.parametrize("bad", ["layers.x.mods.m0.w", "layers.0.mods.q0.w", "layers.0.mods.m0", "headx.w",
                                 "selector.gates.x.w", "net.unknown.w", "w"])
def test_names_of_no_part_are_refused(bad: str) -> None:
    with pytest.raises(DataError):
        parts.part_of(bad)


def test_prefixes_do_not_overlap() -> None:
    """``L1M1``'s prefix must not claim ``L1M10``'s parameters."""
    assert not "layers.1.mods.m10.w".startswith(tuple(parts.prefixes("L1M1")))
    assert not "selector.gates.10.w".startswith(tuple(parts.prefixes("selector.gate1")))
    assert parts.fixed_part_ids(2) == ["stem", "selector.embed", "selector.gate0", "selector.gate1", "head"]


def test_exporter_trainer_and_merger_agree_on_a_real_bundle(pi4: Path, digits_bank) -> None:
    """Every parameter the exporter lists under a part is the trainer's delta name for that part, lies in the
    bank part the merger updates, and a module's importance is read at the layer and index the manifest gives.
    """
    from cloud_sync.merger import module_weight
    from module_bank import DirectoryBank

    manifest = read_manifest(pi4)
    bank = DirectoryBank(digits_bank[0])
    layers = len(manifest.selection)
    importance = [[0.0] * 64 for _ in range(layers)]
    checked = 0
    for part in [*manifest.modules, *manifest.fixed_parts]:
        pid = parts.check_part_id(part["part_id"])
        bank_names = set(bank.read_part(pid))
        for onnx in part["params"]:
            assert parts.part_of(onnx) == pid
            assert parts.bank_name(onnx) in bank_names  # the merger's parameters of this part
            checked += 1
        if parts.is_module_id(pid):
            layer, index = parts.parse_module_id(pid)
            assert (layer, index) == (part["layer"], part["index"])
            mine = [row[:] for row in importance]
            mine[layer][index] = 1.0  # all of the layer's importance on this module: 64 times the mean
            msg = DeltaMessage(delta_id="d", device_id="dev", bank_id=manifest.bank_id, bundle="b",
                               base_versions={pid: 1}, parts={pid: []}, tensors={}, sample_count=4)
            assert module_weight(msg, pid, 1, mine) == pytest.approx(64 * 4)  # the importance the cloud holds
    assert checked > 0

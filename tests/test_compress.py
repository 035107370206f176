"""Tensor codecs: shapes and dtypes survive, error bounds per precision, top-k, bombs and bad names refused."""

from __future__ import annotations

import itertools
import zlib
from typing import Any

import numpy as np
import pytest

from eclm import compress
from eclm.compress import Codec
from eclm.errors import DataError

SEED = 7
CODEC_NAMES = ["+".join(p for p in parts if p)
               for parts in itertools.product(("fp32", "fp16", "int8"), ("", "top0.1"), ("none", "zlib", "lzma"))]


def _floats(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "scalar": np.array(rng.normal(), dtype=np.float32),
        "vector": rng.normal(0, 1, 7).astype(np.float32),
        "cube": rng.normal(0, 3, (3, 4, 5)).astype(np.float32),
        "conv.weight": rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32),
        "as_float64": rng.normal(0, 1, (4, 6)),
        "as_float16": rng.normal(0, 1, (5,)).astype(np.float16),
        "tiny": (rng.normal(0, 1, (50,)) * 1e-3).astype(np.float32),
    }


def _ints(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "num_batches_tracked": np.array([int(rng.integers(0, 2**40))], dtype=np.int64),
        "int32": rng.integers(-(2**31), 2**31 - 1, (3, 3), dtype=np.int32),
        "uint8": rng.integers(0, 256, (2, 2, 2), dtype=np.uint8),
        "int64_scalar": np.array(int(rng.integers(-(2**62), 2**62)), dtype=np.int64),
        "mask": rng.integers(0, 2, (6,)).astype(bool),
    }


def _round_trip(tensors: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    data, header = compress.encode(tensors, Codec.parse(name))
    assert isinstance(data, bytes)
    header = {**header}
    return compress.decode(data, header)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_round_trip_shapes_and_dtypes(codec: str) -> None:
    rng = np.random.default_rng(SEED)
    floats, ints = _floats(rng), _ints(rng)
    out = _round_trip({**floats, **ints}, codec)
    assert sorted(out) == sorted({**floats, **ints})
    for name, a in floats.items():
        assert out[name].shape == a.shape, name
        assert out[name].dtype == np.float32, name  # floats always come back as float32 (documented)
    for name, a in ints.items():  # integer (and bool) buffers travel exactly, whatever the codec
        assert out[name].shape == a.shape and out[name].dtype == a.dtype, name
        assert np.array_equal(out[name], a), name


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_error_bounds(codec: str) -> None:
    rng = np.random.default_rng(SEED)
    floats = _floats(rng)
    out = _round_trip(floats, codec)
    top = "top" in codec
    for name, a in floats.items():
        x = a.astype(np.float32).reshape(-1)
        y = out[name].reshape(-1)
        if top:
            k = max(1, int(round(0.1 * x.size)))
            kept = np.flatnonzero(y)
            assert kept.size <= k, name
            assert np.all(y[np.setdiff1d(np.arange(x.size), kept)] == 0), name
            x = np.where(np.isin(np.arange(x.size), np.argsort(-np.abs(x), kind="stable")[:k]), x, 0).astype(np.float32)
        if codec.startswith("fp32"):
            assert np.array_equal(y, x), name
        elif codec.startswith("fp16"):
            np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-7, err_msg=name)
        else:
            bound = float(np.max(np.abs(x))) / 127.0 / 2 + 1e-6 * float(np.max(np.abs(x))) + 1e-30
            err = np.abs(y - x)
            assert float(err.max()) <= bound, (name, float(err.max()), bound)


def test_int8_scales_are_per_tensor() -> None:
    rng = np.random.default_rng(SEED)
    big = rng.normal(0, 1000, 100).astype(np.float32)
    small = rng.normal(0, 1e-4, 100).astype(np.float32)
    out = _round_trip({"big": big, "small": small}, "int8+zlib")
    for name, x in (("big", big), ("small", small)):
        assert float(np.max(np.abs(out[name] - x))) <= float(np.max(np.abs(x))) / 254 * (1 + 1e-5), name


def test_fp16_relative_error() -> None:
    x = np.random.default_rng(SEED).lognormal(0, 2, 10_000).astype(np.float32) * np.sign(
        np.random.default_rng(SEED + 1).normal(size=10_000)).astype(np.float32)
    x = x[(np.abs(x) > 1e-4) & (np.abs(x) < 6e4)]
    y = _round_trip({"x": x}, "fp16+none")["x"]
    assert float(np.max(np.abs(y - x) / np.abs(x))) <= 2**-11 * 1.0001


def test_int8_of_zeros_and_constant() -> None:
    out = _round_trip({"z": np.zeros((3, 3), np.float32), "c": np.full(5, -2.5, np.float32)}, "int8+none")
    assert np.array_equal(out["z"], np.zeros((3, 3), np.float32))
    np.testing.assert_allclose(out["c"], -2.5, rtol=1e-6)


@pytest.mark.parametrize("compressor", ["none", "zlib", "lzma"])
def test_top_k_keeps_the_largest_magnitudes_exactly(compressor: str) -> None:
    rng = np.random.default_rng(SEED)
    x = rng.normal(0, 1, (20, 50)).astype(np.float32)
    y = _round_trip({"w": x}, f"fp32+top0.1+{compressor}")["w"]
    k = 100
    largest = np.argsort(-np.abs(x.reshape(-1)))[:k]
    kept = np.flatnonzero(y.reshape(-1))
    assert kept.size == k
    assert set(kept.tolist()) == set(largest.tolist())
    assert np.array_equal(y.reshape(-1)[largest], x.reshape(-1)[largest])  # exact at fp32
    assert np.count_nonzero(y) == k


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_top_k_with_lossy_precision_keeps_the_same_entries(precision: str) -> None:
    rng = np.random.default_rng(SEED)
    x = rng.normal(0, 1, 1000).astype(np.float32)
    y = _round_trip({"w": x}, f"{precision}+top0.05+zlib")["w"]
    largest = np.argsort(-np.abs(x))[:50]
    assert set(np.flatnonzero(y).tolist()) == set(largest.tolist())
    scale = float(np.max(np.abs(x[largest])))
    tol = scale * 1e-3 if precision == "fp16" else scale / 254 * (1 + 1e-5)
    assert float(np.max(np.abs(y[largest] - x[largest]))) <= tol


def test_top_fraction_one_is_dense_and_exact() -> None:
    x = np.random.default_rng(SEED).normal(size=(6, 7)).astype(np.float32)
    assert np.array_equal(_round_trip({"w": x}, "fp32+top1+zlib")["w"], x)


def test_top_k_keeps_at_least_one() -> None:
    x = np.array([0.1, -5.0, 0.2], dtype=np.float32)
    assert np.array_equal(_round_trip({"w": x}, "fp32+top0.01+none")["w"], np.array([0, -5.0, 0], np.float32))


def test_empty_tensor_dict() -> None:
    for codec in ("fp32+none", "int8+top0.1+lzma"):
        assert _round_trip({}, codec) == {}


def test_compressors_shrink_redundant_data() -> None:
    x = {"w": np.tile(np.arange(64, dtype=np.float32), 64)}
    sizes = {c: len(compress.encode(x, Codec.parse(c))[0]) for c in ("fp32+none", "fp32+zlib", "fp32+lzma")}
    assert sizes["fp32+zlib"] < sizes["fp32+none"] / 4 and sizes["fp32+lzma"] < sizes["fp32+none"] / 4


def test_header_names_the_codec() -> None:
    data, header = compress.encode({"a": np.ones((2, 3), np.float32), "n": np.ones(1, np.int64)},
                                   Codec.parse("int8+top0.5+lzma"))
    assert header["codec"] == "int8+top0.5+lzma" and header["shapes"] == {"a": [2, 3], "n": [1]}
    assert {k: np.dtype(v) for k, v in header["dtypes"].items()} == {"a": np.float32, "n": np.int64}
    assert data.startswith(b"\xfd7zXZ")


@pytest.mark.parametrize("name", CODEC_NAMES + ["int8", "zlib", "top0.5", "lzma+fp16"])
def test_codec_names_parse_and_print(name: str) -> None:
    c = Codec.parse(name)
    assert Codec.parse(c.name) == c
    assert c.precision in compress.PRECISIONS and c.compressor in compress.COMPRESSORS


@pytest.mark.parametrize("name", ["", "fp64", "int4+zlib", "fp16+gzip", "top0", "top1.5", "top-0.1", "topx",
                                  "fp32+top+zlib", "fp32 + zlib", "FP32", "fp32++zlib"])
def test_bad_codec_names(name: str) -> None:
    with pytest.raises(DataError):
        Codec.parse(name)


def test_bad_codec_name_in_a_header() -> None:
    data, header = compress.encode({"a": np.ones(3, np.float32)}, Codec.parse("fp32+zlib"))
    with pytest.raises(DataError):
        compress.decode(data, {**header, "codec": "fp32+brotli"})


@pytest.mark.parametrize("header", [
    {},
    {"codec": "fp32+zlib"},
    {"codec": "fp32+zlib", "shapes": {"a": [4]}},
    {"codec": "fp32+zlib", "shapes": {"b": [3]}},
    {"codec": "fp32+zlib", "shapes": {"a": ["x"]}},
    {"codec": "fp32+zlib", "shapes": ["a"]},
    {"codec": "int8+zlib", "shapes": {"a": [3]}},
    {"codec": "fp32+top0.5+zlib", "shapes": {"a": [3]}},
    {"codec": "fp32+lzma", "shapes": {"a": [3]}},
])
def test_malformed_headers(header: dict[str, Any]) -> None:
    data, _ = compress.encode({"a": np.ones(3, np.float32)}, Codec.parse("fp32+zlib"))
    with pytest.raises(DataError):
        compress.decode(data, header)


@pytest.mark.parametrize("data", [b"", b"junk" * 100, zlib.compress(b"not safetensors" * 10)])
def test_malformed_payloads(data: bytes) -> None:
    with pytest.raises(DataError):
        compress.decode(data, {"codec": "fp32+zlib", "shapes": {"a": [3]}})
    with pytest.raises(DataError):
        compress.decode(data, {"codec": "fp32+none", "shapes": {"a": [3]}})


def test_zlib_decompression_bomb() -> None:
    comp = zlib.compressobj(1)
    block = bytes(2**20)
    bomb = b"".join(comp.compress(block) for _ in range(600)) + comp.flush()  # 600 MB of zeros
    assert len(bomb) < 4 * 2**20
    with pytest.raises(DataError, match="beyond the limit"):
        compress.decode(bomb, {"codec": "fp32+zlib", "shapes": {}})


@pytest.mark.parametrize("codec", ["fp32+top0.1+none", "int8+top0.5+zlib", "fp16+top1+lzma"])
def test_zero_size_tensor_with_top_k(codec: str) -> None:
    out = _round_trip({"empty": np.zeros((0, 3), np.float32), "w": np.arange(4, dtype=np.float32)}, codec)
    assert out["empty"].shape == (0, 3) and out["empty"].dtype == np.float32
    assert np.count_nonzero(out["w"]) >= 1


@pytest.mark.parametrize("codec", ["fp32+none", "fp16+zlib", "int8+lzma"])
def test_zero_size_tensor_dense(codec: str) -> None:
    out = _round_trip({"empty": np.zeros((0, 3), np.float32), "e64": np.zeros((2, 0), np.int64)}, codec)
    assert out["empty"].shape == (0, 3) and out["empty"].dtype == np.float32
    assert out["e64"].shape == (2, 0) and out["e64"].dtype == np.int64


@pytest.mark.parametrize("codec", ["int8+none", "fp16+none", "fp32+top0.5+none"])
def test_big_endian_tensors(codec: str) -> None:
    x = np.arange(1, 7, dtype=">f4").reshape(2, 3)
    out = _round_trip({"w": x}, codec)["w"]
    assert out.dtype == np.float32
    keep = np.abs(x) >= 4 if "top" in codec else np.ones(x.shape, bool)
    np.testing.assert_allclose(out[keep], x.astype(np.float32)[keep], rtol=1e-2)
    assert np.all(out[~keep] == 0)
    ints = _round_trip({"n": np.array([1, 2**40, -3], dtype=">i8")}, codec)["n"]
    assert ints.dtype.kind == "i" and ints.dtype.itemsize == 8 and ints.tolist() == [1, 2**40, -3]

"""The device profile registry: built-ins, user folders, format checks and the sourcing rule."""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path

import pytest

from device_profiles import PROFILE_KEYS, available_profiles, load_profile
from device_profiles.registry import BUILTIN_DIR, ENV_VAR, parse_profile
from eclm.errors import ProfileFormatError, UnknownProfileError

BUILTINS = ["jetson-nano", "pi-zero-2w", "pi3b", "pi4", "pi5", "x86-edge"]
HARDWARE_KEYS = ("arch", "ram_mb", "cores", "sustained_gflops", "uplink_mbps")
# A comment "names a source" when it says so, or cites a URL, a host/path reference
# (github.com/..., datasheets.raspberrypi.com/...) or an arXiv id.
SOURCE_RE = re.compile(r"source|https?://|\b[\w.-]+\.(?:com|org|io|ai|net)/|arXiv:", re.IGNORECASE)
KEY_LINE_RE = re.compile(r'^(?P<key>[A-Za-z_][\w-]*)\s*=\s*(?P<rest>.*)$')


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests here control the registry's folders themselves."""
    monkeypatch.delenv(ENV_VAR, raising=False)


def _split_value_comment(rest: str) -> tuple[str, str | None]:
    """The TOML value and the trailing comment (None when there is none) of ``key = rest``."""
    if rest.startswith('"'):
        m = re.match(r'"(?:[^"\\]|\\.)*"', rest)
        assert m, f"unterminated string in {rest!r}"
        value, tail = m.group(0), rest[m.end():].strip()
        assert not tail or tail.startswith("#"), f"unexpected text after the value: {tail!r}"
        return value, tail[1:].strip() if tail else None
    value, sep, comment = rest.partition("#")
    return value.strip(), comment.strip() if sep else None


def _key_lines(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = KEY_LINE_RE.match(line)
        assert m, f"{path.name}: not a top-level key line: {raw!r}"
        assert m["key"] not in out, f"{path.name}: {m['key']} set twice"
        out[m["key"]] = _split_value_comment(m["rest"])[1]
    return out


def _pi4_text() -> str:
    return (BUILTIN_DIR / "pi4.toml").read_text(encoding="utf-8")


def _set(text: str, key: str, value: str | None) -> str:
    """``text`` with ``key``'s value replaced by the TOML literal ``value`` (None: drop the line)."""
    pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.MULTILINE)
    assert pattern.search(text), key
    return pattern.sub("" if value is None else f"{key} = {value}", text)


def _write_profile(folder: Path, stem: str, **values: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = _set(_pi4_text(), "name", f'"{stem}"')
    for key, value in values.items():
        text = _set(text, key, value)
    path = folder / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the registry -----------------------------------------------------------------------------


def test_registry_lists_the_six_builtins() -> None:
    assert available_profiles() == sorted(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_with_every_key(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert Path(profile.source) == BUILTIN_DIR / f"{name}.toml"
    for key, typ in PROFILE_KEYS.items():
        assert isinstance(getattr(profile, key), typ), key


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(UnknownProfileError) as exc:
        load_profile("nope")
    message = str(exc.value)
    assert "'nope'" in message
    for name in BUILTINS:
        assert name in message
    assert exc.value.hint and ENV_VAR in exc.value.hint
    assert exc.value.exit_code == UnknownProfileError.exit_code == 10


def test_user_profile_in_extra_dir_is_found(tmp_path: Path) -> None:
    path = _write_profile(tmp_path / "mine", "my-board", ram_mb="2048", runtime_memory_budget_mb="256.0")
    assert "my-board" in available_profiles(tmp_path / "mine")
    assert "my-board" not in available_profiles()
    profile = load_profile("my-board", extra_dir=tmp_path / "mine")
    assert profile.ram_mb == 2048
    assert profile.runtime_memory_budget_mb == 256.0
    assert Path(profile.source) == path
    with pytest.raises(UnknownProfileError):
        load_profile("my-board")  # not without the folder


def test_user_profile_via_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_profile(tmp_path / "a", "board-a")
    _write_profile(tmp_path / "b", "board-b", cores="2")
    monkeypatch.setenv(ENV_VAR, f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    names = available_profiles()
    assert {"board-a", "board-b"} <= set(names)
    assert set(BUILTINS) <= set(names)
    assert load_profile("board-b").cores == 2
    assert load_profile("board-a").name == "board-a"


def test_user_profile_overrides_builtin_of_same_name(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, "pi4", ram_mb="8192")
    profile = load_profile("pi4", extra_dir=tmp_path)
    assert profile.ram_mb == 8192 and Path(profile.source) == path
    assert load_profile("pi4").ram_mb == 4096


def test_missing_profiles_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileFormatError, match="does not exist"):
        available_profiles(tmp_path / "absent")


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"cores": None}, r"missing keys \['cores'\]"),
        ({"sustained_gflops": None}, "missing keys"),
        ({"cores": '"four"'}, "cores must be int"),
        ({"cores": "true"}, "cores must be int"),
        ({"ort_training": '"yes"'}, "ort_training must be bool"),
        ({"sustained_gflops": '"fast"'}, "sustained_gflops must be float"),
        ({"ram_mb": "-1"}, r"ram_mb must be finite and >= 0"),
        ({"uplink_mbps": "-0.5"}, r"uplink_mbps must be finite and >= 0"),
        ({"latency_target_ms": "inf"}, "finite"),
        ({"training_memory_budget_mb": "4096.0"}, "implausibly larger"),
    ],
    ids=[
        "missing-cores", "missing-gflops", "str-for-int", "bool-for-int", "str-for-bool",
        "str-for-float", "negative-int", "negative-float", "infinite", "training-budget-too-large",
    ],
)
def test_malformed_profile_raises(tmp_path: Path, values: dict[str, str | None], match: str) -> None:
    _write_profile(tmp_path, "bad-board", **values)
    with pytest.raises(ProfileFormatError, match=match) as exc:
        load_profile("bad-board", extra_dir=tmp_path)
    assert exc.value.hint
    assert exc.value.exit_code == 11


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, "good-name")
    path.rename(tmp_path / "other-name.toml")
    with pytest.raises(ProfileFormatError, match="differs from the file name"):
        load_profile("other-name", extra_dir=tmp_path)


def test_unknown_key_and_bad_syntax(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, "extra-key")
    path.write_text(path.read_text() + 'colour = "red"  # not a profile key\n')
    with pytest.raises(ProfileFormatError, match=r"unknown keys \['colour'\]"):
        load_profile("extra-key", extra_dir=tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "broken\n')
    with pytest.raises(ProfileFormatError, match="cannot read profile"):
        parse_profile(broken)


def test_integer_accepted_for_float_key(tmp_path: Path) -> None:
    _write_profile(tmp_path, "int-floats", sustained_gflops="12", uplink_mbps="100")
    profile = load_profile("int-floats", extra_dir=tmp_path)
    assert profile.sustained_gflops == 12.0 and isinstance(profile.sustained_gflops, float)
    assert isinstance(profile.uplink_mbps, float)


# --- the built-in files themselves -------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_every_key_line_has_a_comment(name: str) -> None:
    path = BUILTIN_DIR / f"{name}.toml"
    lines = _key_lines(path)
    assert set(lines) == set(PROFILE_KEYS), "a built-in profile sets exactly the registry's keys"
    uncommented = [k for k, comment in lines.items() if not comment]
    assert not uncommented, f"{path.name}: key lines without a trailing comment: {uncommented}"
    # The parser and tomllib agree on the file.
    assert tomllib.loads(path.read_text(encoding="utf-8"))["name"] == name


@pytest.mark.parametrize("name", BUILTINS)
def test_hardware_figures_name_a_source(name: str) -> None:
    path = BUILTIN_DIR / f"{name}.toml"
    lines = _key_lines(path)
    unsourced = {k: lines[k] for k in HARDWARE_KEYS if not SOURCE_RE.search(lines[k] or "")}
    assert not unsourced, f"{path.name}: hardware figures whose comment names no source: {unsourced}"


@pytest.mark.parametrize("name", BUILTINS)
def test_policy_figures_say_policy(name: str) -> None:
    lines = _key_lines(BUILTIN_DIR / f"{name}.toml")
    for key in ("runtime_memory_budget_mb", "latency_target_ms", "sync_window_s", "training_memory_budget_mb"):
        assert "policy" in (lines[key] or ""), f"{name}: {key} is ECLM policy and must say so"


@pytest.mark.parametrize("name", BUILTINS)
def test_budgets_are_positive_and_follow_the_formulas(name: str) -> None:
    p = load_profile(name)
    budgets = p.budgets()
    assert set(budgets) == {"memory_bytes", "flops", "transfer_bytes"}
    for dim, value in budgets.items():
        assert math.isfinite(value) and value > 0, dim
    assert budgets["memory_bytes"] == p.runtime_memory_budget_mb * 2**20
    assert budgets["flops"] == pytest.approx(p.sustained_gflops * 1e9 * p.latency_target_ms / 1000)
    assert budgets["transfer_bytes"] == pytest.approx(p.uplink_mbps * 1e6 / 8 * p.sync_window_s)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_policy_of_the_readme(name: str) -> None:
    """README: runtime budget 1/8 of RAM, training budget half of it (0 without training), 100 ms, 10 s."""
    p = load_profile(name)
    assert p.runtime_memory_budget_mb == p.ram_mb / 8
    assert p.training_memory_budget_mb == (p.runtime_memory_budget_mb / 2 if p.ort_training else 0)
    assert p.latency_target_ms == 100
    assert p.sync_window_s == 10


def test_budgets_never_shrink_along_the_pi_chain() -> None:
    chain = ["pi-zero-2w", "pi3b", "pi4", "pi5", "x86-edge"]
    budgets = [load_profile(n).budgets() for n in chain]
    for small, large, a, b in zip(chain, chain[1:], budgets, budgets[1:], strict=False):
        for dim in a:
            assert a[dim] <= b[dim], f"{dim}: {small} {a[dim]} > {large} {b[dim]}"


def test_source_rule_is_not_vacuous() -> None:
    assert not SOURCE_RE.search("policy: our own guess, rounded")
    assert not SOURCE_RE.search("about 20 Mbit/s over Wi-Fi")
    for cited in ("source: product brief", "https://example.org/x", "(github.com/google/XNNPACK)", "arXiv:1704.04861"):
        assert SOURCE_RE.search(cited), cited

"""Every command's `--help`, rendered as a user sees it: each option shows its help text as written, its
default and its environment variable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import bench.cli
import cloud_sync.cli
import edge_runtime.cli
import exporter.cli

APPS: dict[str, typer.Typer] = {
    "eclm": bench.cli.app,
    "eclm-cloud": cloud_sync.cli.app,
    "eclm-export": exporter.cli.app,
    "eclm-edge": edge_runtime.cli.app,
}
ACTIONS = {"--help", "--list-profiles", "--json"}  # do something once; not settings, so no variable


def _leaves(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
    """Every runnable command under ``command``, groups (e.g. `eclm-cloud pki`) walked down."""
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        yield path, command
        return
    for name, sub in subcommands.items():
        yield from _leaves([*path, name], sub)


def _commands() -> Iterator[tuple[str, list[str], Any]]:
    for prog, app in APPS.items():
        for path, command in _leaves([], typer.main.get_command(app)):
            yield prog, path, command


COMMANDS = list(_commands())


def _squash(text: str) -> str:
    """Without whitespace: help is wrapped (and hyphenated words split) at the terminal's width."""
    return "".join(text.split())


def _option_blocks(output: str) -> dict[str, str]:
    """Each option's lines in the help output, keyed by its longest name."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            column = stripped.split("  ")[0]  # the option column ends at the first wide gap
            names = [t.rstrip(",") for t in column.split() if t.startswith("-")]
            current = blocks.setdefault(max(names, key=len), [])
        elif not stripped or not line.startswith(" "):
            current = None
            continue
        if current is not None:
            current.append(stripped)
    return {k: " ".join(v) for k, v in blocks.items()}


def test_every_console_script_is_walked() -> None:
    assert {prog for prog, _, _ in COMMANDS} == set(APPS)
    assert len(COMMANDS) >= 9  # demo, bench, train, keys, sync, status, export, verify, serve


@pytest.mark.parametrize(("prog", "path", "command"), COMMANDS, ids=[" ".join([p, *c]) for p, c, _ in COMMANDS])
def test_help_shows_text_default_and_environment_variable(prog: str, path: list[str], command: Any) -> None:
    result = CliRunner().invoke(APPS[prog], [*path, "--help"], prog_name=prog)
    assert result.exit_code == 0, result.output
    blocks = _option_blocks(result.output)
    options = [p for p in command.params if isinstance(p, typer.core.TyperOption)]
    assert options, f"{prog} {path}: no options found"
    for param in options:
        name = max(param.opts, key=len)
        assert name in blocks, f"{prog} {' '.join(path)}: {name} missing from\n{result.output}"
        block = blocks[name]
        # the help text as written: nothing in [...] swallowed as markup
        assert _squash(param.help or "") in _squash(block), f"{name}: help text altered:\n{block}"
        if name in ACTIONS:
            continue
        envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        assert envvars, f"{prog} {' '.join(path)} {name} has no environment variable"
        for env in envvars:
            assert env.startswith("ECLM_") and env in block, f"{name}: {env} not shown in: {block}"
        assert "default:" in block or "required" in block, f"{prog} {' '.join(path)} {name}: no default in: {block}"


def test_edge_defaults_shown_are_the_runtime_defaults() -> None:
    """`eclm-edge serve` options default to None (a config file may set them); the help shows EdgeConfig's."""
    from edge_runtime.config import EdgeConfig

    out = _squash(CliRunner().invoke(APPS["eclm-edge"], ["serve", "--help"]).output)
    defaults = EdgeConfig()
    for option, key in (("--port", "port"), ("--train-every", "train_every_samples"), ("--host", "host"),
                        ("--state-dir", "state_dir"), ("--train-pause", "train_pause")):
        assert f"default:({getattr(defaults, key)})" in out, (option, key)


def test_one_variable_names_the_profile_folders(tmp_path: Path) -> None:
    """`ECLM_PROFILES_DIR` (several folders, ':'-separated) is what the registry and `--profiles-dir` read."""
    import os

    from device_profiles.registry import BUILTIN_DIR

    folders = []
    for name in ("board-a", "board-b"):
        folder = tmp_path / name
        folder.mkdir()
        text = (BUILTIN_DIR / "pi4.toml").read_text().replace('name = "pi4"', f'name = "{name}"')
        (folder / f"{name}.toml").write_text(text)
        folders.append(str(folder))
    result = CliRunner().invoke(APPS["eclm-export"], ["--list-profiles"],
                                env={"ECLM_PROFILES_DIR": os.pathsep.join(folders)})
    assert result.exit_code == 0, result.output
    assert {"board-a", "board-b", "pi4"} <= set(result.output.split())
    third = tmp_path / "board-c"
    third.mkdir()
    (third / "board-c.toml").write_text((Path(folders[0]) / "board-a.toml").read_text().replace("board-a", "board-c"))
    both = CliRunner().invoke(APPS["eclm-export"], ["--list-profiles", "--profiles-dir", str(third)],
                              env={"ECLM_PROFILES_DIR": folders[0]})
    assert {"board-a", "board-c"} <= set(both.output.split()), both.output

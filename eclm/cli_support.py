"""What every ECLM command shares: the Typer app factory and turning errors into messages and exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from eclm.errors import EclmError

F = TypeVar("F", bound=Callable[..., Any])


def make_app(help_text: str) -> typer.Typer:
    """A Typer app with locals hidden in tracebacks (they can hold credentials) and plain help text.

    ``rich_markup_mode=None``: help is printed as written. With Rich markup, ``[...]`` in a help text
    (``[edge]``, ``[env ...]``) is read as a style tag and silently dropped.
    """
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
        rich_markup_mode=None,
    )


def reports_errors(func: F) -> F:
    """Print an :class:`EclmError` as message plus hint on stderr and exit with its code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EclmError as exc:
            typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
            if exc.hint:
                typer.echo(f"  -> {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_int_list(text: str | None, what: str) -> list[int] | None:
    """``"1,4,7"`` -> ``[1, 4, 7]``; a malformed list is a :class:`ConfigError`."""
    from eclm.errors import ConfigError

    if text is None or text.strip() == "":
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}", hint="e.g. 1,4,7") from exc


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Columns aligned with spaces, floats rounded to 3 decimals, None shown as '-'."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)

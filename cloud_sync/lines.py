"""Environment lines: each part's versions merged from the devices of one environment (docs/method.md).

A device says where it works (``environment``, a name of :mod:`eclm.ids`; "" is the shared line). Its
deltas merge into its environment's line of each part it trained (key ``PART@ENV``, :func:`eclm.parts.line_key`),
never into the shared line, so a merge never averages environments; and the cloud sends a device the
lines of its environment, including one it has just entered (a newcomer gets what the devices there
learned before it has labelled much). A line starts as a copy of the shared part at the shared version
number and counts on from there. The head has no lines: it is the class layer, fitted to each device's
own classes (devices of one environment hold different ones), so it stays with the device; the cloud
takes a device's head deltas into the shared line only while the device works in no environment.
Pure functions over plain dicts; the merger holds the values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TypeVar

from eclm import wire
from eclm.parts import LINE_SEPARATOR, has_lines, line_key, split_line_key

T = TypeVar("T")


def is_line(key: str) -> bool:
    """Whether ``key`` names an environment line (``PART@ENV``) rather than a shared part."""
    return LINE_SEPARATOR in key


def line_parts(msg: wire.DeltaMessage) -> wire.DeltaMessage:
    """The delta as its environment's lines take it: without the parts that have no lines (the head).

    A delta of the shared line ("") is returned as it is.
    """
    if not msg.environment:
        return msg
    parts = {pid: names for pid, names in msg.parts.items() if has_lines(pid)}
    kept = {n for names in parts.values() for n in names}
    return replace(msg, parts=parts, tensors={n: a for n, a in msg.tensors.items() if n in kept},
                   base_versions={pid: v for pid, v in msg.base_versions.items() if pid in parts})


def view(values: dict[str, T], environment: str) -> dict[str, T]:
    """The shared parts' values as a device in ``environment`` sees them: its line's where there is one."""
    shared = {k: v for k, v in values.items() if not is_line(k)}
    if not environment:
        return shared
    return {pid: values.get(line_key(pid, environment), v) for pid, v in shared.items()}


def of_environment(versions: dict[str, int], environment: str) -> dict[str, int]:
    """The versions of ``environment``'s lines, keyed by part id ("": the shared parts)."""
    out: dict[str, int] = {}
    for key, v in versions.items():
        pid, env = split_line_key(key)
        if env == environment:
            out[pid] = v
    return out


def rekey(msg: wire.DeltaMessage, current: dict[str, int]) -> wire.DeltaMessage:
    """The delta with its parts keyed by its environment's lines (unchanged for the shared line).

    A delta whose base versions count in another environment's line (the device has just moved) is
    given the line's current version as its base: it is not stale there, it is new.
    """
    env = msg.environment
    if not env:
        return msg
    msg = line_parts(msg)
    parts = {line_key(pid, env): names for pid, names in msg.parts.items()}
    base: dict[str, int] = {}
    for pid in msg.parts:
        key = line_key(pid, env)
        now = current.get(key, current.get(pid, 0))
        base[key] = now if msg.base_environment != env else msg.base_versions.get(pid, now)
    return replace(msg, parts=parts, base_versions=base)


def environments(keys: Iterable[str]) -> set[str]:
    """The environments that have lines among ``keys`` (part or line keys)."""
    return {split_line_key(k)[1] for k in keys if is_line(k)}


def past_cap(deltas: list[tuple[str, str]], known: set[str], cap: int) -> dict[str, str]:
    """The deltas, (delta id, environment) in arrival order, that would open an environment past ``cap``.

    Each delta is checked when it arrives, but deltas from several new environments can wait together;
    the first ones open lines up to the cap and the rest are refused here (delta id -> why).
    """
    opened, out = set(known), {}
    for delta_id, env in deltas:
        if not env or env in opened:
            continue
        if len(opened) >= cap:
            out[delta_id] = f"too_many_environments: {too_many(len(opened), cap)}"
        else:
            opened.add(env)
    return out


def too_many(known: int, cap: int) -> str:
    """Why a delta that would open one environment more is refused."""
    return (f"{known} environments have module lines (limit {cap}); an operator can raise "
            "--max-environments")


def behind(current: dict[str, int], environment: str, held: dict[str, int], held_line: str,
           sent: dict[str, int]) -> dict[str, int]:
    """What a device in ``environment`` lacks: the keys (line keys, or part ids for the shared line) and current
    versions of its environment's lines of the parts it holds that are newer than both what it reports
    (``held``, counted in ``held_line``'s line) and what it was last sent (``sent``, by key).

    A device that reports another line's versions has just entered: every line of its environment is new
    to it. A device that refused a version it was sent is not sent it again.
    """
    have = held if held_line == environment else {}
    out = {}
    for pid, v in of_environment(current, environment).items():
        key = line_key(pid, environment)
        if pid in held and v > max(have.get(pid, 0), sent.get(key, 0)):
            out[key] = v
    return out

"""The grammar of delta ids, in one place: what devices mint, what acks may name, what the daemon stores.

A delta id is 1 to 64 characters from ``A-Z a-z 0-9 _ -`` (devices mint 32 lowercase hex digits). It
is used verbatim in file names and log lines, so it can hold no pattern, path or wildcard character.
"""

from __future__ import annotations

import re

from eclm.errors import DataError

DELTA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_DELTA_ID = 64


def is_delta_id(value: object) -> bool:
    """True when ``value`` is a string of the delta id grammar."""
    return isinstance(value, str) and DELTA_ID.fullmatch(value) is not None


def check_delta_id(value: object) -> str:
    """``value`` if it is a delta id, else :class:`DataError` saying what a delta id is."""
    return _checked(value, is_delta_id(value), "delta id", f"1-{MAX_DELTA_ID} characters of A-Z a-z 0-9 _ -",
                    "a delta id names exactly one delta; patterns and wildcards are refused")


def _checked(value: object, ok: bool, what: str, grammar: str, hint: str) -> str:
    """``value`` when ``ok``, else the one :class:`DataError` of this module: what ``value`` is not."""
    if not ok:
        raise DataError(f"{what} {repr(value)[:80]} is not {grammar}", hint=hint)
    return str(value)


# The grammar of environment names: where a device works (a line, a site, a camera's scene). Devices that
# share one merge into the same environment line of each module (docs/method.md, "Environment lines").
# "" is the shared line. A name is used in part keys, file names and log lines: no separators or wildcards.
ENVIRONMENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_ENVIRONMENT = 64


def is_environment(value: object) -> bool:
    """True for "" (the shared line) and for a name of the environment grammar."""
    return value == "" or (isinstance(value, str) and ENVIRONMENT.fullmatch(value) is not None
                           and value not in (".", ".."))


def check_environment(value: object) -> str:
    """``value`` if it is an environment name (or "", the shared line), else :class:`DataError` saying what one is."""
    return _checked(value, is_environment(value), "environment",
                    f"1-{MAX_ENVIRONMENT} characters of A-Z a-z 0-9 _ . -",
                    "name the environment a device works in, e.g. line-3 or site_a.cam2; '' is shared")

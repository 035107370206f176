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
    if not is_delta_id(value):
        shown = repr(value)[:80]
        raise DataError(f"delta id {shown} is not 1-{MAX_DELTA_ID} characters of A-Z a-z 0-9 _ -",
                        hint="a delta id names exactly one delta; patterns and wildcards are refused")
    return str(value)

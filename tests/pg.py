"""A fresh PostgreSQL database per test, created on the server ECLM_TEST_POSTGRES names and dropped after.

Default server: postgresql://postgres@127.0.0.1:5432/postgres (this machine kind runs one with trust
auth). Without a reachable server the PostgreSQL cases are skipped with the reason, unless
ECLM_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

ADMIN_URL = os.environ.get("ECLM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> object:
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def database_url(name: str) -> str:
    base, _ = ADMIN_URL.rsplit("/", 1)
    return f"{base}/{name}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of an empty database that exists for this test only."""
    try:
        admin = _admin()
    except Exception as exc:
        if os.environ.get("ECLM_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__}); set ECLM_TEST_POSTGRES")
    name = f"eclm_t_{secrets.token_hex(6)}"
    with admin:  # type: ignore[attr-defined]
        admin.execute(f"CREATE DATABASE {name}")  # type: ignore[attr-defined]
    try:
        yield database_url(name)
    finally:
        with _admin() as again:  # type: ignore[attr-defined]
            again.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

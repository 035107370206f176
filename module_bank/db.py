"""One small database interface over SQLite (embedded) and PostgreSQL (psycopg 3 with a pool).

SQL is written once with ``?`` placeholders and the portable subset both engines speak
(``INSERT ... ON CONFLICT``, ``CAST``, ``COALESCE``); PostgreSQL gets ``%s`` placeholders. Only
``module_bank`` writes SQL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from eclm.errors import BankError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str | Path) -> bool:
    """Whether a bank location names a PostgreSQL database rather than a directory."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def redact(location: str | Path) -> str:
    """A location fit for logs: a PostgreSQL URL without its password."""
    text = str(location)
    if not is_postgres(text) or "@" not in text:
        return text
    scheme, rest = text.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


class Tx(Protocol):
    """A statement runner inside one transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


class Database(Protocol):
    """Transactions and reads; ``dialect`` is ``sqlite`` or ``postgresql``."""

    dialect: str
    location: str

    def transaction(self) -> Any: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, tuple(params)).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._db.execute(sql, tuple(params)).fetchall())

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._db.execute(sql, tuple(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


class SqliteDatabase:
    """One connection shared by the process's threads (a lock orders them); WAL, every commit synced."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.location = str(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        try:
            if readonly:  # a reader beside a running daemon: never writes, never takes the write lock
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                           isolation_level=None, timeout=30)
            else:
                self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise BankError(f"cannot open the ledger {path}: {exc}",
                            hint="check that the bank directory exists and is writable") from exc
        self._tx = _SqliteTx(self._db)

    @contextmanager
    def transaction(self) -> Iterator[_SqliteTx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._tx.query(sql, params)

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._tx.query_dicts(sql, params)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class _PostgresTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._conn.execute(_pg(sql), tuple(params)).rowcount)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._conn.execute(_pg(sql), tuple(params)).fetchall()]

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._conn.execute(_pg(sql), tuple(params))
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


class PostgresDatabase:
    """A psycopg 3 connection pool; each transaction takes a connection, commits and gives it back."""

    dialect = "postgresql"

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        self.location = url
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise BankError("a PostgreSQL bank needs psycopg 3 and psycopg_pool",
                            hint="pip install 'psycopg[binary,pool]' (part of eclm[cloud])") from exc
        self._errors = psycopg.Error
        try:
            psycopg.connect(url, connect_timeout=10).close()  # fails at once, with the server's words
            self._pool = ConnectionPool(url, min_size=1, max_size=max_size, open=True, timeout=30,
                                        kwargs={"autocommit": True})
            self._pool.wait(timeout=30)
        except Exception as exc:
            raise BankError(f"cannot connect to the bank database {redact(url)}: {exc}",
                            hint="start PostgreSQL, create the database (createdb NAME) or fix --bank") from exc

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTx]:
        with self._pool.connection() as conn, conn.transaction():
            yield _PostgresTx(conn)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._pool.connection() as conn:
            return _PostgresTx(conn).query(sql, params)

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._pool.connection() as conn:
            return _PostgresTx(conn).query_dicts(sql, params)

    def close(self) -> None:
        self._pool.close()


def connect(location: str | Path, sqlite_file: str = "sync.sqlite") -> SqliteDatabase | PostgresDatabase:
    """The database of a bank: ``postgresql://...`` or, for a directory, the SQLite file in it."""
    if is_postgres(location):
        return PostgresDatabase(str(location))
    return SqliteDatabase(Path(location) / sqlite_file)

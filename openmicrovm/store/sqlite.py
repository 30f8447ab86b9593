"""The embedded backend: one SQLite file in the data dir, one writer at a time.

The writing connection, behind a lock, serialises every write transaction (BEGIN IMMEDIATE takes
the write lock at once), so SQLite needs no retries: nothing can interleave with a
compare-and-set. Reads have a connection of their own: under WAL a read sees the last commit and
never waits for a writer, which is what lets the API answer reads without a thread hop (see
Store.reads_inline). WAL with synchronous=NORMAL keeps committed transactions across a process
crash (SIGKILL); only an OS crash may lose the last few.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openmicrovm.store.connection import Row
from openmicrovm.store.errors import StoreError

BUSY_TIMEOUT_MS = 5000  # how long a connection waits for another's lock before "database is locked"


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, values, strict=True)}


class SqliteConnection:
    backend = "sqlite"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._connection.execute(sql, params).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        # Read to the end: an UPDATE ... RETURNING left unfinished would block the COMMIT.
        rows = self._connection.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._connection.execute(sql, params).fetchall()

    def contains(self, column: str) -> str:
        return f"instr({column}, ?) > 0"


class SqliteBackend:
    name = "sqlite"

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # It holds secrets (token keys): 0600 before the first byte; SQLite gives its WAL and
            # shared-memory files the database file's mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(path, 0o600)
        try:
            self._writer = _connect(path)
            _enter_wal(self._writer)
            # An in-memory database is private to its connection: reads share the writer's.
            self._reader = self._writer if path == ":memory:" else _connect(path)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the SQLite database {path}: {error}") from error
        self._write_lock = threading.Lock()
        self._read_lock = self._write_lock if self._reader is self._writer else threading.Lock()
        self.description = f"SQLite {path}"

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[SqliteConnection]:
        connection, lock = (self._writer, self._write_lock) if write else (self._reader, self._read_lock)
        with lock:
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield SqliteConnection(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def retryable(self, error: BaseException) -> bool:
        return False  # one writer at a time: nothing to lose a race to

    def unavailable(self, error: BaseException) -> bool:
        return False

    def migration_lock(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # BEGIN IMMEDIATE already excludes every other writer

    def ddl(self, statement: str) -> str:
        return statement

    def close(self) -> None:
        if self._reader is not self._writer:
            self._reader.close()
        self._writer.close()


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.row_factory = _dict_row
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return connection


def _enter_wal(connection: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting out other processes that open it at the same moment.

    SQLite answers a journal-mode change that meets another connection's lock with "database is
    locked" at once, without its busy handler (seen as about one failure in fifteen when four
    servers open one new file together), so the wait is ours, bounded like busy_timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def sqlite_path(url: str) -> str | None:
    """The file a sqlite URL names (None when the URL is not SQLite's)."""
    if url.startswith("sqlite:///"):
        # sqlite:////abs/path is absolute, sqlite:///rel/path relative, as in SQLAlchemy.
        return url[len("sqlite:///") :] or None
    if url in ("sqlite://", ":memory:"):
        return ":memory:"
    return None

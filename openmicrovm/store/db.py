"""The database connection: SQLite by default, one transaction per state change.

The server runs on one event loop, so one connection used from that thread is enough and keeps
every read consistent with the last write. WAL with synchronous=NORMAL keeps committed
transactions across a process crash (SIGKILL); only an OS crash may lose the last few.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openmicrovm.store.schema import MIGRATIONS

Row = sqlite3.Row


class StoreError(Exception):
    pass


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        path = _sqlite_path(url)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute("PRAGMA foreign_keys=ON")
        self._connection.execute("PRAGMA busy_timeout=5000")
        # Build engines report from worker threads now and then; one lock keeps transactions whole.
        self._lock = threading.RLock()
        self._depth = 0
        self._migrate()

    def close(self) -> None:
        self._connection.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """All statements inside commit together or not at all; nesting joins the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._connection.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            else:
                self._connection.execute("COMMIT")
            finally:
                self._depth = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._connection.execute(sql, params).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        with self._lock:
            return self._connection.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._connection.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def _migrate(self) -> None:
        with self.transaction():
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            current = int(self.scalar("SELECT value FROM meta WHERE key = 'schema_version'") or 0)
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"the database is at schema version {current}, newer than this openmicrovm "
                    f"({len(MIGRATIONS)}); upgrade openmicrovm or use another data dir"
                )
            for version, statements in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in statements:
                    self._connection.execute(statement)
                self._connection.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(version),),
                )

    def get_meta(self, key: str) -> str | None:
        return self.scalar("SELECT value FROM meta WHERE key = ?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        # sqlite:////abs/path is absolute, sqlite:///rel/path relative, as in SQLAlchemy.
        return url[len("sqlite:///") :]
    if url == "sqlite://" or url == ":memory:":
        return ":memory:"
    if "://" in url:
        raise StoreError(f"unsupported database URL {url!r}: only sqlite:///path is supported so far")
    return url

"""What a repository holds: one connection inside one transaction, with rows as dicts.

SQL in repositories is written once, for both backends: `?` placeholders and the SQL both
SQLite and PostgreSQL accept. The few places they differ are methods of the connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Row = dict[str, Any]


class Connection(Protocol):
    backend: str  # "sqlite" or "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def contains(self, column: str) -> str:
        """A condition: `column` holds the next parameter as a substring (case-sensitive)."""


def scalar(connection: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    row = connection.one(sql, params)
    return None if row is None else next(iter(row.values()))


def placeholders(count: int) -> str:
    return ",".join("?" * count)

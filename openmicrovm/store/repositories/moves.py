"""The one writer of a state column: a compare-and-set along the state machine's table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

from openmicrovm.states import sources
from openmicrovm.store.connection import Connection, Row, placeholders


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


S = TypeVar("S", bound=StrEnum)
KEEP: Any = _Keep()
"""A transition's `reason` default: the state reason stays what it was."""


def move(
    connection: Connection,
    table: str,
    key: tuple[str, Sequence[Any]],
    moves: Mapping[S, frozenset[S]],
    to: S,
    expect: Iterable[S] | None,
    stamp: tuple[str, float],
    reason: str | None = KEEP,
    **fields: Any,
) -> Row | None:
    """Move the row named by `key` (a WHERE condition and its parameters) to `to`, if its state is
    one the table allows `to` from (and one of `expect`, when given). The `stamp` column gets the
    time, state_reason the reason unless KEEP, and other columns `fields`. The row as it is now,
    or None when the state was not one of those (the move lost a race or is not allowed)."""
    origins = sources(moves, to, expect)
    if not origins:
        return None
    column, now = stamp
    assignments = {"state": to.value, column: now}
    if reason is not KEEP:
        assignments["state_reason"] = reason
    assignments.update(fields)
    condition, key_params = key
    sql = (
        f"UPDATE {table} SET {', '.join(f'{name} = ?' for name in assignments)} "
        f"WHERE {condition} AND state IN ({placeholders(len(origins))}) RETURNING *"
    )
    return connection.one(sql, [*assignments.values(), *key_params, *(state.value for state in origins)])


def count_by_state(connection: Connection, table: str, states: type[S]) -> dict[S, int]:
    """How many rows of `table` are in each state (states with none are absent)."""
    rows = connection.all(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
    return {states(row["state"]): row["n"] for row in rows}

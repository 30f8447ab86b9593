"""Running many awaitables with a bound on how many run at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def gather_at_most(limit: int, awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await every one, at most `limit` at a time; their results in order. Every one runs to its
    end; the first failure is raised once all are done."""
    slots = asyncio.Semaphore(limit)

    async def bounded(awaitable: Awaitable[T]) -> T:
        async with slots:
            return await awaitable

    outcomes = await asyncio.gather(*(bounded(awaitable) for awaitable in awaitables), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]  # no exception is left among them

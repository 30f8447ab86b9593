"""Cleanup that a cancellation cannot interrupt half-way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def run_to_completion(work: Awaitable[T]) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile; the cancellation is
    re-raised afterwards. (A bare asyncio.shield returns to the caller at once and lets the
    cleanup run on unobserved, so the caller could finish before its sandboxes are gone.)"""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


class Aborted(Exception):
    """Raised inside worker-thread code that noticed its abort flag."""


async def in_thread(work: Callable[[threading.Event], T]) -> T:
    """Run `work(abort)` in a worker thread. A thread cannot be interrupted, so on cancellation
    the abort flag is set and the thread is waited for (it checks the flag between steps) before
    the CancelledError propagates; the caller's cleanup then never races the thread's writes."""
    abort = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(work, abort))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        abort.set()
        await run_to_completion(asyncio.wait([task]))
        if not task.cancelled():
            task.exception()  # mark it retrieved: the build is cancelled, its outcome is moot
        raise

"""Running many blocking steps (hashing, uploads, downloads) on a small pool of threads.

Stops at the first failure: the steps not yet started are cancelled and the ones running are
waited for before the error is raised, so a caller that cleans up afterwards (fetch removing its
half-made tree) never races a worker still writing into it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def run_all(step: Callable[[Item], Result], items: Iterable[Item], workers: int) -> list[Result]:
    """step(item) for every item, `workers` at a time; results in the items' order."""
    items = list(items)
    if len(items) <= 1 or workers <= 1:
        return [step(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openmicrovm-objects") as pool:
        futures: list[Future[Result]] = [pool.submit(step, item) for item in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((future for future in futures if future in done and future.exception()), None)
        if failed is not None:
            for future in pending:
                future.cancel()
            wait(pending)
            raise failed.exception()  # type: ignore[misc]
        return [future.result() for future in futures]

"""The Service: the domain's state (store, settings, clock, engines) and its operation registry.

Operations are plain functions of one request, run on a store thread (never on the event
loop): they read and write through `service.transact`, and hand slow work to the engines with
`service.after_commit`, which runs on the event loop once the transaction has committed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from openmicrovm.config import Settings
from openmicrovm.service.context import RequestContext
from openmicrovm.service.engines import BuildEngine, IdleBuildEngine, IdleMicrovmEngine, MicrovmEngine
from openmicrovm.service.token_seal import KeyRing, load_keyring
from openmicrovm.store import Store, StoreUnavailable, Tx

Params = dict[str, Any]
Result = dict[str, Any]
Operation = Callable[["Service", RequestContext, Params], Result]
T = TypeVar("T")
log = logging.getLogger("openmicrovm.service")
# How background work waits out a database outage: pauses that double up to the longest.
OUTAGE_FIRST_PAUSE = 0.25
OUTAGE_LONGEST_PAUSE = 5.0

OPERATIONS: dict[str, Operation] = {}


def operation(name: str) -> Callable[[Operation], Operation]:
    """Register the domain handler of one API operation (named as in the botocore model)."""

    def register(handler: Operation) -> Operation:
        OPERATIONS[name] = handler
        return handler

    return register


class Service:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.clock = store.clock
        self.builds: BuildEngine = IdleBuildEngine()
        self.microvms: MicrovmEngine = IdleMicrovmEngine()
        self._loop: asyncio.AbstractEventLoop | None = None
        # A per-database secret for pagination tokens (and anything else that must not be forged).
        self.secret = bytes.fromhex(
            store.transact(lambda tx: tx.meta.add_if_absent("service_secret", secrets.token_bytes(32).hex()))
        )
        self.keyring: KeyRing = load_keyring(store, legacy_keyring_file(settings.data_dir))

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the engines live on (call on it): work after a commit is handed to it,
        and the store refuses to write on it."""
        self._loop = loop
        self.store.bind_loop_thread()

    def transact(self, work: Callable[[Tx], T]) -> T:
        return self.store.transact(work)

    def read(self, work: Callable[[Tx], T]) -> T:
        return self.store.read(work)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """From the event loop: call a blocking service function (it may transact) on a store
        thread, and wait for it without blocking the loop."""
        return await self.store.run(work, *args)

    async def fetch(self, work: Callable[[Tx], T]) -> T:
        """From the event loop: read through the repositories (on a store thread, or inline
        where the store's reads never wait, see Store.reads_inline)."""
        if self.store.reads_inline:
            return self.store.read(work)
        return await self.store.run(self.store.read, work)

    async def commit(self, work: Callable[[Tx], T]) -> T:
        """From the event loop: run work(tx) in a transaction on a store thread."""
        return await self.store.run(self.store.transact, work)

    async def persist(self, work: Callable[..., T], *args: Any) -> T:
        """From the event loop, for background work that must reach the database (a build that
        ended, a MicroVM that stopped): like `run`, but a database outage is waited out, with
        growing pauses, rather than dropping the record. `work` must be safe to repeat: its
        writes are compare-and-set transitions, which a repeat after a lost commit leaves alone."""
        pause = OUTAGE_FIRST_PAUSE
        while True:
            try:
                return await self.store.run(work, *args)
            except StoreUnavailable as error:
                log.warning("%s; trying again in %.1f s", error, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, OUTAGE_LONGEST_PAUSE)

    def after_commit(self, tx: Tx, callback: Callable[[], None]) -> None:
        """Run callback on the event loop once tx has committed (engines schedule their tasks there)."""
        tx.after_commit(lambda: self.on_loop(callback))

    def on_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            callback()
        else:
            loop.call_soon_threadsafe(callback)

    def call(self, name: str, context: RequestContext, params: Params) -> Result:
        return OPERATIONS[name](self, context, params)


def legacy_keyring_file(data_dir: Path) -> Path:
    """Where token keys lived before they moved into the database (imported once, then removed)."""
    return data_dir / "keys" / "token-keys.json"

"""The Service: the domain's state (store, settings, clock, engines) and its operation registry."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from openmicrovm.config import Settings
from openmicrovm.service.context import RequestContext
from openmicrovm.service.engines import BuildEngine, IdleBuildEngine, IdleMicrovmEngine, MicrovmEngine
from openmicrovm.service.token_seal import KeyRing
from openmicrovm.store.db import Database

Params = dict[str, Any]
Result = dict[str, Any]
Operation = Callable[["Service", RequestContext, Params], Result]

OPERATIONS: dict[str, Operation] = {}


def operation(name: str) -> Callable[[Operation], Operation]:
    """Register the domain handler of one API operation (named as in the botocore model)."""

    def register(handler: Operation) -> Operation:
        OPERATIONS[name] = handler
        return handler

    return register


def millisecond_clock() -> float:
    """Epoch seconds to the millisecond, the precision AWS timestamps have. Every stored time is
    already what the wire carries, so responses need no conversion."""
    return round(time.time(), 3)


class Service:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock or millisecond_clock
        self.builds: BuildEngine = IdleBuildEngine()
        self.microvms: MicrovmEngine = IdleMicrovmEngine()
        self._after_commit: list[Callable[[], None]] = []
        self.secret = self._load_secret()
        self.keyring = KeyRing(settings.data_dir / "keys" / "token-keys.json")

    def _load_secret(self) -> bytes:
        """A per-data-dir secret for pagination tokens (and anything else that must not be forged)."""
        existing = self.db.get_meta("service_secret")
        if existing:
            return bytes.fromhex(existing)
        with self.db.transaction():
            existing = self.db.get_meta("service_secret")
            if existing:
                return bytes.fromhex(existing)
            value = secrets.token_bytes(32)
            self.db.set_meta("service_secret", value.hex())
            return value

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """A store transaction; work registered with after_commit runs only once it committed."""
        outermost = not self._in_transaction
        if outermost:
            self._after_commit = []
        self._in_transaction = True
        try:
            with self.db.transaction() as db:
                yield db
        except BaseException:
            if outermost:
                self._after_commit = []
            raise
        finally:
            if outermost:
                self._in_transaction = False
        if outermost:
            callbacks, self._after_commit = self._after_commit, []
            for callback in callbacks:
                callback()

    _in_transaction = False

    def after_commit(self, callback: Callable[[], None]) -> None:
        if self._in_transaction:
            self._after_commit.append(callback)
        else:
            callback()

    def call(self, name: str, context: RequestContext, params: Params) -> Result:
        return OPERATIONS[name](self, context, params)

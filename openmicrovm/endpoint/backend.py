"""What the endpoint needs from the rest of the server: which MicroVM a hostname names, whether it
is running (resuming it when it may), a connection into its sandbox, and where to count traffic."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.runtime.driver import DriverError, PortNotListening, PtySession, TooManyConnections
from openmicrovm.service.core import Service
from openmicrovm.service.tokens import HTTP_INGRESS_KINDS, SHELL_INGRESS_KINDS
from openmicrovm.states import MicrovmState

log = logging.getLogger("openmicrovm.endpoint")

# How long a request to a PENDING MicroVM (or one being resumed) is held before a 502.
HOLD_SECONDS = 30.0
# Idle accounting writes the store at most this often per MicroVM.
ACTIVITY_WRITE_INTERVAL = 1.0


@dataclass(frozen=True)
class Target:
    microvm_id: str
    account: str
    state: MicrovmState
    auto_resume: bool
    ingress: frozenset[str]  # managed connector kinds: HTTP_INGRESS, SHELL_INGRESS, ...

    @property
    def http_ingress(self) -> bool:
        """Whether endpoint requests (HTTP, WebSocket, h2c) may reach the app."""
        return bool(self.ingress & HTTP_INGRESS_KINDS) and "NO_INGRESS" not in self.ingress

    @property
    def shell_ingress(self) -> bool:
        """Whether the `/shell` WebSocket may open a terminal."""
        return bool(self.ingress & SHELL_INGRESS_KINDS) and "NO_INGRESS" not in self.ingress


class Unreachable(Exception):
    """The MicroVM cannot take the request (suspended without auto-resume, terminated, ...)."""


class EndpointBackend:
    def __init__(self, service: Service, engine: MicrovmEngine) -> None:
        self.service = service
        self.engine = engine
        self._last_write: dict[str, float] = {}
        self._activity_writes: set[asyncio.Future[None]] = set()
        # Open connections into each MicroVM: cut at once when it stops, so that a request in
        # flight gets its 502 now rather than after TCP gives up on a sandbox that is gone.
        self._upstreams: dict[str, list[asyncio.StreamWriter]] = {}
        engine.listeners.append(self._state_changed)

    def _state_changed(self, microvm_id: str, state: MicrovmState) -> None:
        if state in (MicrovmState.TERMINATED, MicrovmState.SUSPENDED):
            for writer in self._upstreams.pop(microvm_id, []):
                writer.transport.abort()

    async def lookup(self, hostname: str) -> Target | None:
        microvm = await self.service.fetch(lambda tx: tx.microvms.by_endpoint(hostname.lower()))
        if microvm is None:
            return None
        connectors = microvm.config.get("ingressNetworkConnectors") or []
        return Target(
            microvm.id,
            microvm.account,
            microvm.state,
            microvm.auto_resume,
            frozenset(arn.rsplit(":", 1)[-1] for arn in connectors),
        )

    async def _state(self, microvm_id: str) -> MicrovmState | None:
        return await self.service.fetch(lambda tx: tx.microvms.state_of(microvm_id))

    async def ready(self, target: Target) -> None:
        """Return once the MicroVM is RUNNING: wait out PENDING and transitions, resume a suspended
        one that allows auto-resume; raise Unreachable otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOLD_SECONDS
        while True:
            state = await self._state(target.microvm_id)
            if state is MicrovmState.RUNNING:
                return
            if state in (None, MicrovmState.TERMINATING, MicrovmState.TERMINATED):
                raise Unreachable(f"MicroVM is {state.wire if state else 'gone'}")
            if state in (MicrovmState.SUSPENDED, MicrovmState.SUSPENDING):
                if not target.auto_resume:
                    raise Unreachable("MicroVM is suspended and auto-resume is off")
                # All requests arriving during one resume wait for that one resume.
                if not await self.engine.resume(target.microvm_id):
                    if await self._state(target.microvm_id) is not MicrovmState.RUNNING:
                        raise Unreachable("the MicroVM could not be resumed")
                return
            if loop.time() >= deadline:
                raise Unreachable(f"MicroVM still {state.wire} after {HOLD_SECONDS:g} s")
            await asyncio.sleep(0.02)

    async def connect(self, microvm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sandbox = self.engine.sandbox(microvm_id)
        if sandbox is None:
            raise Unreachable("the MicroVM has no running sandbox")
        try:
            reader, writer = await self.engine.driver.connect(sandbox, port)
        except (PortNotListening, TooManyConnections):
            raise
        except (DriverError, OSError) as error:
            raise Unreachable(str(error)) from error
        open_now = [w for w in self._upstreams.get(microvm_id, []) if not w.is_closing()]
        self._upstreams[microvm_id] = [*open_now, writer]
        return reader, writer

    async def open_shell(self, microvm_id: str, rows: int, cols: int) -> PtySession:
        sandbox = self.engine.sandbox(microvm_id)
        if sandbox is None:
            raise Unreachable("the MicroVM has no running sandbox")
        return await self.engine.driver.exec_pty(sandbox, ["/bin/sh", "-l"], None, rows, cols)

    def record_activity(self, microvm_id: str) -> None:
        """Bytes went through the endpoint: the idle timer starts again (spec §5.5)."""
        now = self.service.clock()
        if now - self._last_write.get(microvm_id, 0.0) < ACTIVITY_WRITE_INTERVAL:
            return
        self._last_write[microvm_id] = now
        # Written in the background: relaying bytes never waits on the database.
        write = asyncio.ensure_future(
            self.service.commit(lambda tx: tx.microvms.record_activity(microvm_id, now))
        )
        self._activity_writes.add(write)
        write.add_done_callback(self._activity_written)

    def _activity_written(self, write: asyncio.Future[None]) -> None:
        self._activity_writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.warning("recording endpoint activity failed: %s", write.exception())

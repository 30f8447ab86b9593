"""What the endpoint needs from the rest of the server: which MicroVM a hostname names, whether it
is running (resuming it when it may), a connection into its sandbox (on this host or relayed to
the one holding it), and where to count traffic."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

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


class SandboxAccess(Protocol):
    """What the endpoint needs of the MicroVMs' sandboxes, wherever they run (the MicroVM engine on
    this host, or a cluster dispatcher relaying to the owning host)."""

    async def resume(self, microvm_id: str) -> bool: ...

    async def connect(
        self, microvm_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    async def open_shell(self, microvm_id: str, rows: int, cols: int) -> PtySession: ...


class EndpointBackend:
    def __init__(self, service: Service, sandboxes: SandboxAccess) -> None:
        self.service = service
        self.sandboxes = sandboxes
        self._last_write: dict[str, float] = {}
        self._activity_writes: set[asyncio.Future[None]] = set()

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
        # The state the lookup just read serves first: one read per request when RUNNING.
        state: MicrovmState | None = target.state
        while True:
            if state is MicrovmState.RUNNING:
                return
            if state in (None, MicrovmState.TERMINATING, MicrovmState.TERMINATED):
                raise Unreachable(f"MicroVM is {state.wire if state else 'gone'}")
            if state in (MicrovmState.SUSPENDED, MicrovmState.SUSPENDING):
                if not target.auto_resume:
                    raise Unreachable("MicroVM is suspended and auto-resume is off")
                # All requests arriving during one resume wait for that one resume.
                if not await self.sandboxes.resume(target.microvm_id):
                    if await self._state(target.microvm_id) is not MicrovmState.RUNNING:
                        raise Unreachable("the MicroVM could not be resumed")
                return
            if loop.time() >= deadline:
                raise Unreachable(f"MicroVM still {state.wire} after {HOLD_SECONDS:g} s")
            await asyncio.sleep(0.02)
            state = await self._state(target.microvm_id)

    async def connect(self, microvm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await self.sandboxes.connect(microvm_id, port)
        except (PortNotListening, TooManyConnections):
            raise
        except (DriverError, OSError) as error:
            raise Unreachable(str(error)) from error

    async def open_shell(self, microvm_id: str, rows: int, cols: int) -> PtySession:
        try:
            return await self.sandboxes.open_shell(microvm_id, rows, cols)
        except (DriverError, OSError) as error:
            raise Unreachable(str(error)) from error

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

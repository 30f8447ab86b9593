"""What the endpoint needs from the rest of the server: which MicroVM a hostname names, whether it
is running (resuming it when it may), a connection into its sandbox, and where to count traffic."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.runtime.driver import DriverError, PortNotListening, PtySession, TooManyConnections
from openmicrovm.service.core import Service
from openmicrovm.service.tokens import HTTP_INGRESS_KINDS, SHELL_INGRESS_KINDS

# How long a request to a PENDING MicroVM (or one being resumed) is held before a 502.
HOLD_SECONDS = 30.0
# Idle accounting writes the store at most this often per MicroVM.
ACTIVITY_WRITE_INTERVAL = 1.0


@dataclass(frozen=True)
class Target:
    microvm_id: str
    account: str
    state: str
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
        # Open connections into each MicroVM: cut at once when it stops, so that a request in
        # flight gets its 502 now rather than after TCP gives up on a sandbox that is gone.
        self._upstreams: dict[str, list[asyncio.StreamWriter]] = {}
        engine.listeners.append(self._state_changed)

    def _state_changed(self, microvm_id: str, state: str) -> None:
        if state in ("TERMINATED", "SUSPENDED"):
            for writer in self._upstreams.pop(microvm_id, []):
                writer.transport.abort()

    def lookup(self, hostname: str) -> Target | None:
        row = self.service.db.one(
            "SELECT id, account, state, auto_resume, config FROM microvms WHERE endpoint = ?",
            (hostname.lower(),),
        )
        if row is None:
            return None
        connectors = json.loads(row["config"]).get("ingressNetworkConnectors") or []
        return Target(
            row["id"],
            row["account"],
            row["state"],
            bool(row["auto_resume"]),
            frozenset(arn.rsplit(":", 1)[-1] for arn in connectors),
        )

    def _state(self, microvm_id: str) -> str | None:
        return self.service.db.scalar("SELECT state FROM microvms WHERE id = ?", (microvm_id,))

    async def ready(self, target: Target) -> None:
        """Return once the MicroVM is RUNNING: wait out PENDING and transitions, resume a suspended
        one that allows auto-resume; raise Unreachable otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOLD_SECONDS
        while True:
            state = self._state(target.microvm_id)
            if state == "RUNNING":
                return
            if state in (None, "TERMINATING", "TERMINATED"):
                raise Unreachable(f"MicroVM is {state or 'gone'}")
            if state in ("SUSPENDED", "SUSPENDING"):
                if not target.auto_resume:
                    raise Unreachable("MicroVM is suspended and auto-resume is off")
                # All requests arriving during one resume wait for that one resume.
                if not await self.engine.resume(target.microvm_id):
                    if self._state(target.microvm_id) != "RUNNING":
                        raise Unreachable("the MicroVM could not be resumed")
                return
            if loop.time() >= deadline:
                raise Unreachable(f"MicroVM still {state} after {HOLD_SECONDS:g} s")
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
        self.service.db.execute(
            "UPDATE microvms SET last_activity_at = ? WHERE id = ? AND state = 'RUNNING'", (now, microvm_id)
        )

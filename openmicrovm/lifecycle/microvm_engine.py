"""Runs MicroVMs: restores them from their version's snapshot, calls their lifecycle hooks,
suspends, resumes and terminates them, and reports every state change to the service.

Operations on one MicroVM are serialised by a per-MicroVM lock; the state in the store is
changed by compare-and-set, so an operation that lost a race (a terminate arrived while a
resume was running) simply finds the state moved on and stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from openmicrovm.lifecycle.app_output import AppOutput
from openmicrovm.lifecycle.hook_calls import call_lifecycle_hook
from openmicrovm.lifecycle.version_outputs import VersionOutputs
from openmicrovm.logs.store import LogStore
from openmicrovm.runtime.driver import (
    CapacityError,
    DriverError,
    PtySession,
    Sandbox,
    SandboxDriver,
    SnapshotError,
)
from openmicrovm.runtime.host import MemoryGate
from openmicrovm.service import microvms as records
from openmicrovm.service.core import Service
from openmicrovm.service.errors import InsufficientCapacityError
from openmicrovm.service.managed import host_architecture
from openmicrovm.states import MicrovmState
from openmicrovm.store import Tx
from openmicrovm.store.records import Microvm

log = logging.getLogger("openmicrovm.microvms")
T = TypeVar("T")
# The managed connector's ARN ends so (service/arns.py managed_connector_arn), in every region.
_INTERNET_EGRESS_SUFFIX = ":aws-network-connector:INTERNET_EGRESS"


def wants_internet_egress(run_config: dict[str, Any]) -> bool:
    """Does the MicroVM's run configuration list the INTERNET_EGRESS connector? A configuration
    without the member has AWS's default, which is that connector."""
    connectors = run_config.get("egressNetworkConnectors")
    if connectors is None:
        return True
    return any(str(arn).endswith(_INTERNET_EGRESS_SUFFIX) for arn in connectors)


@dataclass
class _Live:
    """What the engine knows of one MicroVM it manages."""

    sandbox: Sandbox | None = None
    lock: asyncio.Lock | None = None
    resuming: asyncio.Future[bool] | None = None
    watcher: asyncio.Task[None] | None = None  # notices a sandbox that died under a live MicroVM
    # Open connections into the sandbox (endpoint traffic): cut at once when it stops, so that a
    # request in flight gets its 502 now rather than after TCP gives up on a sandbox that is gone.
    upstreams: list[asyncio.StreamWriter] = field(default_factory=list)


class MicrovmEngine:
    def __init__(
        self, service: Service, driver: SandboxDriver, logs: LogStore, outputs: VersionOutputs
    ) -> None:
        self.service = service
        self.driver = driver
        self.logs = logs
        self.outputs = outputs
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.app_output = AppOutput(logs)
        self.memory_gate = MemoryGate(service.settings.host_memory_reserve_mib or None)
        # Observers of state changes (metrics, the endpoint); called with (microvm_id, state).
        self.listeners: list[Callable[[str, MicrovmState], None]] = []
        # Observers of how long operations took: (kind, seconds), kind run|suspend|resume|terminate.
        self.transition_observers: list[Callable[[str, float], None]] = []

    # -- the seam -------------------------------------------------------------------------------
    def check_capacity(self, memory_mib: int, snapshot_memory_bytes: int) -> None:
        """A restore takes about the snapshot's memory at once and may grow up to the tier; the
        same admission rule as the driver's, answered before the MicroVM is even recorded."""
        try:
            self.memory_gate.check("run a MicroVM", snapshot_memory_bytes, memory_mib)
        except CapacityError as error:
            raise InsufficientCapacityError(
                f"Insufficient capacity: {error}. Terminate or suspend MicroVMs, or try again later."
            ) from None

    def schedule_start(self, microvm_id: str) -> None:
        self._spawn(self._locked(microvm_id, self._start))

    def schedule_suspend(self, microvm_id: str) -> None:
        self._spawn(self._locked(microvm_id, self._suspend))

    def schedule_resume(self, microvm_id: str) -> None:
        self._spawn(self.resume(microvm_id))

    def schedule_terminate(self, microvm_id: str) -> None:
        self._spawn(self._locked(microvm_id, self._terminate))

    # -- helpers --------------------------------------------------------------------------------
    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _entry(self, microvm_id: str) -> _Live:
        entry = self._live.get(microvm_id)
        if entry is None:
            entry = self._live[microvm_id] = _Live(lock=asyncio.Lock())
        return entry

    async def _locked(self, microvm_id: str, operation: Callable[[str, _Live], Awaitable[None]]) -> None:
        entry = self._entry(microvm_id)
        assert entry.lock is not None
        async with entry.lock:
            try:
                await operation(microvm_id, entry)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("%s: %s failed", microvm_id, operation.__name__)
                await self._fail(microvm_id, entry, f"The MicroVM stopped on an internal error: {error}")

    async def _microvm(self, microvm_id: str) -> Microvm | None:
        return await self._read(lambda tx: tx.microvms.get(microvm_id))

    async def _read(self, work: Callable[[Tx], T]) -> T:
        """Read from the store; while the database is away, wait for it (see Service.persist)."""
        return await self.service.persist(self.service.read, work)

    async def _version_config(self, microvm: Microvm) -> dict[str, Any]:
        version = await self._read(lambda tx: tx.versions.get(microvm.image_arn, microvm.version_number))
        return version.config if version else {}

    async def snapshot_dir(self, microvm: Microvm) -> Path | None:
        """The snapshot of the MicroVM's version built for this host's architecture (fetched from
        the snapshot store when another host built it). Raises SnapshotError."""
        return await self.outputs.snapshot_dir(microvm.image_arn, microvm.version_number, host_architecture())

    async def _move(
        self, microvm_id: str, to: MicrovmState, expect: MicrovmState, **fields: Any
    ) -> Microvm | None:
        """A state change the engine made; observers hear of it once it is committed."""
        moved = await self.service.persist(
            self.service.transact,
            lambda tx: tx.microvms.transition(microvm_id, to, expect=[expect], **fields),
        )
        if moved is not None:
            self._changed(moved)
        return moved

    def _event(self, microvm: Microvm, message: str) -> None:
        if "disabled" not in (microvm.config.get("logging") or {}):
            self.logs.append(f"microvms/{microvm.id}", message)

    def _follow_output(self, microvm: Microvm, sandbox: Sandbox) -> None:
        if "disabled" not in (microvm.config.get("logging") or {}):
            self.app_output.follow(microvm.id, self.driver.log_path(sandbox))

    def _changed(self, microvm: Microvm) -> None:
        self._event(microvm, f"state: {microvm.state.wire}")
        entry = self._live.get(microvm.id)
        if entry is not None and microvm.state in (MicrovmState.TERMINATED, MicrovmState.SUSPENDED):
            upstreams, entry.upstreams = entry.upstreams, []
            for writer in upstreams:
                writer.transport.abort()
        for listener in self.listeners:
            listener(microvm.id, microvm.state)

    def _watch(self, microvm_id: str) -> None:
        """Follow a live sandbox, so that one that dies (its app crashed, the memory limit struck)
        does not leave its MicroVM saying RUNNING."""
        entry = self._entry(microvm_id)
        if entry.sandbox is not None and (entry.watcher is None or entry.watcher.done()):
            entry.watcher = self._spawn(self._watch_exit(microvm_id, entry.sandbox))

    async def _watch_exit(self, microvm_id: str, sandbox: Sandbox) -> None:
        try:
            status = await self.driver.wait_exit(sandbox)
        except DriverError:
            log.exception("%s: watching its sandbox failed", microvm_id)
            return
        entry = self._live.get(microvm_id)
        microvm = await self._microvm(microvm_id)
        if entry is None or entry.sandbox is not sandbox or microvm is None:
            return  # destroyed or replaced on purpose
        if microvm.state in (MicrovmState.TERMINATING, MicrovmState.TERMINATED):
            return
        detail = status.detail or status.state
        await self._locked(
            microvm_id, lambda vm, live: self._fail(vm, live, f"The MicroVM stopped: {detail}")
        )

    async def _destroy(self, entry: _Live) -> None:
        if entry.watcher is not None and entry.watcher is not asyncio.current_task():
            entry.watcher.cancel()
        if entry.sandbox is not None:
            sandbox, entry.sandbox = entry.sandbox, None
            try:
                await self.driver.destroy(sandbox)
            except DriverError:
                log.exception("destroying %s failed", sandbox.sandbox_id)

    async def _fail(self, microvm_id: str, entry: _Live, reason: str) -> None:
        """Terminate after a failure: the sandbox goes, the record says why."""
        await self.app_output.stop(microvm_id)
        await self._destroy(entry)
        moved = await self.service.persist(records.mark_terminated, self.service, microvm_id, reason)
        if moved is not None:
            self._changed(moved)
        self._live.pop(microvm_id, None)

    def adopt(self, microvm: Microvm, sandbox: Sandbox) -> None:
        """Take charge of a sandbox found at start-up (see recovery.py)."""
        self._entry(microvm.id).sandbox = sandbox
        self._follow_output(microvm, sandbox)
        self._watch(microvm.id)

    def live_sandboxes(self) -> list[tuple[str, Sandbox]]:
        return [(microvm_id, e.sandbox) for microvm_id, e in self._live.items() if e.sandbox is not None]

    def _observe(self, kind: str, seconds: float) -> None:
        for observer in self.transition_observers:
            observer(kind, seconds)

    def sandbox(self, microvm_id: str) -> Sandbox | None:
        entry = self._live.get(microvm_id)
        return entry.sandbox if entry else None

    def busy(self, microvm_id: str) -> bool:
        """Whether an operation on the MicroVM is under way (or waiting for its turn)."""
        entry = self._live.get(microvm_id)
        return entry is not None and (
            entry.resuming is not None or (entry.lock is not None and entry.lock.locked())
        )

    # -- reaching the app (the endpoint) --------------------------------------------------------
    async def connect(self, microvm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to `port` in the MicroVM's sandbox, cut when the MicroVM is suspended or
        terminated. Raises PortNotListening, TooManyConnections, or DriverError (no sandbox)."""
        entry = self._live.get(microvm_id)
        if entry is None or entry.sandbox is None:
            raise DriverError("the MicroVM has no running sandbox")
        reader, writer = await self.driver.connect(entry.sandbox, port)
        entry.upstreams = [w for w in entry.upstreams if not w.is_closing()] + [writer]
        return reader, writer

    async def open_shell(self, microvm_id: str, rows: int, cols: int) -> PtySession:
        """A login shell on a terminal in the MicroVM's sandbox."""
        sandbox = self.sandbox(microvm_id)
        if sandbox is None:
            raise DriverError("the MicroVM has no running sandbox")
        return await self.driver.exec_pty(sandbox, ["/bin/sh", "-l"], None, rows, cols)

    # -- operations -----------------------------------------------------------------------------
    async def _start(self, microvm_id: str, entry: _Live) -> None:
        microvm = await self._microvm(microvm_id)
        if microvm is None or microvm.state is not MicrovmState.PENDING:
            return
        try:
            snapshot = await self.snapshot_dir(microvm)
        except SnapshotError as error:
            await self._fail(microvm_id, entry, f"The MicroVM could not be started: {error}")
            return
        if snapshot is None:
            await self._fail(microvm_id, entry, "The image version's snapshot for this host is missing.")
            return
        config = dict(microvm.config)
        try:
            entry.sandbox = await self.driver.restore(
                microvm_id, snapshot, egress=wants_internet_egress(config)
            )
        except DriverError as error:
            await self._fail(
                microvm_id, entry, f"The MicroVM could not be restored from its snapshot: {error}"
            )
            return
        self._follow_output(microvm, entry.sandbox)
        outcome = await call_lifecycle_hook(
            self.driver,
            entry.sandbox,
            await self._version_config(microvm),
            "run",
            {"microvmId": microvm_id, "runHookPayload": config.get("runHookPayload") or ""},
        )
        if not outcome.ok:
            await self._fail(microvm_id, entry, outcome.reason or "Run lifecycle hook failed.")
            return
        config["runHookPayload"] = None  # delivered; it may be sensitive, so it is not kept
        now = self.service.clock()
        if await self._move(
            microvm_id, MicrovmState.RUNNING, MicrovmState.PENDING, last_activity_at=now, config=config
        ):
            self._observe("run", now - microvm.started_at)
            self._watch(microvm_id)

    async def _suspend(self, microvm_id: str, entry: _Live) -> None:
        microvm = await self._microvm(microvm_id)
        if microvm is None or microvm.state is not MicrovmState.SUSPENDING or entry.sandbox is None:
            return
        started = time.monotonic()
        outcome = await call_lifecycle_hook(
            self.driver, entry.sandbox, await self._version_config(microvm), "suspend"
        )
        if not outcome.ok:
            # The live service terminates a MicroVM whose suspend hook fails (spec §5.7).
            await self._fail(microvm_id, entry, outcome.reason or "Suspend lifecycle hook failed.")
            return
        await self.driver.suspend(entry.sandbox)
        if await self.suspended(microvm_id):
            self._observe("suspend", time.monotonic() - started)

    async def suspended(self, microvm_id: str) -> Microvm | None:
        """Its sandbox is suspended: SUSPENDING → SUSPENDED (also for recovery.py, which finds one
        a crash interrupted after the sandbox was already suspended)."""
        return await self._move(
            microvm_id, MicrovmState.SUSPENDED, MicrovmState.SUSPENDING, suspended_at=self.service.clock()
        )

    async def resume(self, microvm_id: str) -> bool:
        """Resume a SUSPENDED MicroVM; concurrent callers (API, auto-resume) share one resume.
        It is RESUMING (PENDING on the wire, as seen live on AWS) meanwhile: the intent is in the
        store, so a restart finishes an acknowledged resume. True when it is RUNNING afterwards."""
        entry = self._entry(microvm_id)
        if entry.resuming is not None:
            return await asyncio.shield(entry.resuming)
        entry.resuming = asyncio.get_running_loop().create_future()
        try:
            await self.service.persist(records.begin_resume, self.service, microvm_id)
            await self._locked(microvm_id, self._resume)
            microvm = await self._microvm(microvm_id)
            result = microvm is not None and microvm.state is MicrovmState.RUNNING
            entry.resuming.set_result(result)
            return result
        except BaseException as error:
            entry.resuming.set_exception(error)
            raise
        finally:
            entry.resuming = None

    async def _resume(self, microvm_id: str, entry: _Live) -> None:
        microvm = await self._microvm(microvm_id)
        if microvm is None or microvm.state is not MicrovmState.RESUMING or entry.sandbox is None:
            return
        started = time.monotonic()
        try:
            if self.driver.is_suspended(entry.sandbox):
                await self.driver.resume(entry.sandbox)
        except DriverError as error:
            await self._fail(microvm_id, entry, f"The MicroVM could not be resumed: {error}")
            return
        outcome = await call_lifecycle_hook(
            self.driver, entry.sandbox, await self._version_config(microvm), "resume"
        )
        if not outcome.ok:
            await self._fail(microvm_id, entry, outcome.reason or "Resume lifecycle hook failed.")
            return
        now = self.service.clock()
        if await self._move(
            microvm_id, MicrovmState.RUNNING, MicrovmState.RESUMING, suspended_at=None, last_activity_at=now
        ):
            self._observe("resume", time.monotonic() - started)

    async def _terminate(self, microvm_id: str, entry: _Live) -> None:
        microvm = await self._microvm(microvm_id)
        if microvm is None or microvm.state is not MicrovmState.TERMINATING:
            return
        started = time.monotonic()
        # The sandbox says whether it is suspended: a suspend may have finished after the
        # terminate was asked for.
        if entry.sandbox is not None and not self.driver.is_suspended(entry.sandbox):
            # Best effort, bounded by the hook's timeout; termination goes on whatever it answers.
            outcome = await call_lifecycle_hook(
                self.driver, entry.sandbox, await self._version_config(microvm), "terminate"
            )
            if not outcome.ok:
                self._event(microvm, f"terminate hook: {outcome.reason}")
        await self.app_output.stop(microvm_id)
        await self._destroy(entry)
        if await self._move(
            microvm_id,
            MicrovmState.TERMINATED,
            MicrovmState.TERMINATING,
            reason=microvm.state_reason or records.SUCCESS,
            terminated_at=self.service.clock(),
        ):
            self._observe("terminate", time.monotonic() - started)
        self._live.pop(microvm_id, None)

    async def close(self, grace_seconds: float = 15.0) -> None:
        """Server shut-down: operations under way (a terminate just asked for, a suspend) get a
        moment to finish; then background work stops. Sandboxes stay for the next start to adopt."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_seconds)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.app_output.close()

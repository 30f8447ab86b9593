"""A host agent: this host's builds and sandboxes, for the cluster (or for the one-host server).

It registers the host, then keeps its lease with a heartbeat that also says how much memory is
free. On a shared database (PostgreSQL) it listens for wake-ups, sweeps for work it may have
missed, serves the relay to replicas, and fences itself: when it cannot renew its lease in time,
it stops serving and destroys its sandboxes before the cluster declares it lost, so that a cut-off
host never serves a MicroVM the cluster has already terminated. Then it tells its owner to stop
(`fenced` is set; the process exits and its supervisor starts it again as a new incarnation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from openmicrovm.builder.architecture import host_architecture
from openmicrovm.cluster import wakeups
from openmicrovm.cluster.relay_server import RelayServer
from openmicrovm.lifecycle.build_engine import BuildEngine
from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.lifecycle.recovery import recover_microvms
from openmicrovm.lifecycle.version_outputs import VersionOutputs
from openmicrovm.logs.store import LogStore
from openmicrovm.runtime.driver import SandboxDriver
from openmicrovm.service.core import Service
from openmicrovm.states import MicrovmState
from openmicrovm.store import StoreUnavailable, Tx
from openmicrovm.store.records import Host

if TYPE_CHECKING:
    from openmicrovm.store.postgres import PostgresListener

log = logging.getLogger("openmicrovm.agent")
# How often, as a share of the lease, the agent renews it; and how much of the lease it keeps in
# hand: it fences itself once only this share is left without a renewal.
HEARTBEATS_PER_LEASE = 5
FENCE_MARGIN = 0.2
SWEEP_SECONDS = 5.0
# MicroVM states in which the agent has work to do.
_WORK_STATES = {
    MicrovmState.PENDING: "schedule_start",
    MicrovmState.SUSPENDING: "schedule_suspend",
    MicrovmState.RESUMING: "schedule_resume",
    MicrovmState.TERMINATING: "schedule_terminate",
}


def boot_clock() -> float:
    """Seconds that keep counting while the machine sleeps: a lease lapses during a suspend too."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class HostAgent:
    def __init__(
        self,
        service: Service,
        driver: SandboxDriver,
        logs: LogStore,
        host_id: str,
        secret: bytes,
        advertise_url: str = "",
        listen: tuple[str, int] | None = None,
    ) -> None:
        self.service = service
        self.driver = driver
        self.logs = logs
        self.host_id = host_id
        self.secret = secret
        self.advertise_url = advertise_url
        self.listen = listen
        self.architecture = host_architecture() or "UNKNOWN"
        data_dir = service.settings.data_dir
        outputs = VersionOutputs(service, host_id, data_dir / "builds", data_dir / "versions")
        self.microvms = MicrovmEngine(service, driver, logs, outputs)
        self.builds = BuildEngine(service, driver, logs, host_id, outputs, on_slot_free=self.claim_builds)
        self.relay = RelayServer(self.microvms, logs, secret)
        self.shared = service.store.shared
        self.lease_seconds = service.settings.host_lease_seconds
        self._lease_lane = service.store.lane()
        self.build_slots = max(service.settings.quotas.concurrent_builds, 1)
        self.incarnation = 0
        self.fenced = asyncio.Event()
        self.fence_reason = ""
        self._renewed_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: PostgresListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._claiming = False

    # -- start and stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.shared and self.listen is not None:
            port = await self.relay.start(*self.listen)
            if not self.advertise_url:
                self.advertise_url = f"http://{self.listen[0]}:{port}"
        host = await self.service.run(self._register)
        log.info(
            "host %s (incarnation %d) at %s", host.id, host.incarnation, self.advertise_url or "this process"
        )
        finish_recovery = await recover_microvms(self.microvms, self.host_id)
        self._tasks.append(self._loop.create_task(finish_recovery()))
        await self.builds.resume_pending_work(self.host_id)
        self.claim_builds()
        if self.shared:
            self._listener = self.service.store.listen(
                [wakeups.host_channel(self.host_id), wakeups.ALL_HOSTS], self._delivered, self._reconnected
            )
            self._tasks.append(self._loop.create_task(self._heartbeat()))
            self._tasks.append(self._loop.create_task(self._sweep()))

    def _register(self) -> Host:
        def register(tx: Tx) -> Host:
            tx.microvms.adopt_unplaced(self.host_id)
            host = tx.hosts.register(
                self.host_id,
                self.advertise_url,
                self.architecture,
                self.microvms.memory_gate.available_mib(),
                self.build_slots,
                self.lease_seconds,
            )
            # In the same transaction: the host is never ACTIVE without the versions on its disk
            # (after it was lost, the cluster stopped counting on them).
            for image_arn, number in self.builds.versions_on_disk(tx.builds.successful()):
                tx.hosts.add_version(self.host_id, image_arn, number)
            return host

        host = self.service.transact(register)
        self.incarnation = host.incarnation
        self._renewed_at = boot_clock()
        return host

    async def close(self) -> None:
        if self._listener is not None:
            await asyncio.to_thread(self._listener.close)  # joins its thread: not on the loop
        if self.shared and not self.fenced.is_set():
            with contextlib.suppress(Exception):  # the database may be away: the lease then lapses
                await self.service.commit(lambda tx: tx.hosts.withdraw(self.host_id, self.incarnation))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._lease_lane.close()
        await self.relay.close()
        await self.builds.close()
        await self.microvms.close()

    # -- the lease --------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Renew the lease every share of it; fence by the clock, not by what a renewal says: on a
        cut link a renewal may hang (packets dropped, not refused) long after the lease is gone."""
        interval = self.lease_seconds / HEARTBEATS_PER_LEASE
        loop = asyncio.get_running_loop()
        pause = interval
        while True:
            await asyncio.sleep(max(0.0, min(pause, self._fence_at() - boot_clock())))
            pause = interval
            # A thread of its own, not the store's queue: behind a burst of API calls that wait out a
            # database outage, a renewal would otherwise wait its turn until the lease was gone.
            renewal = loop.create_task(asyncio.to_thread(self._renew))
            done, _ = await asyncio.wait({renewal}, timeout=max(0.0, self._fence_at() - boot_clock()))
            if not done:
                renewal.add_done_callback(lambda task: task.cancelled() or task.exception())
                held = boot_clock() - self._renewed_at
                await self.fence(
                    f"its lease could not be renewed for {held:.1f} s of its {self.lease_seconds:g} s"
                )
                return
            try:
                renewed = renewal.result()
            except Exception as error:  # the database is away, or refused this host for now
                left = self._fence_at() - boot_clock()
                log.warning(
                    "cannot renew the lease of host %s (fencing in %.1f s): %s", self.host_id, left, error
                )
                # Again soon, not a whole interval later: the lease is running out.
                pause = interval / HEARTBEATS_PER_LEASE
                continue
            if not renewed:
                await self.fence("the cluster declared it lost")
                return

    def _fence_at(self) -> float:
        """When, on the boot clock, the agent fences itself unless a renewal lands first: with a
        share of the lease still to run, so that it has stopped serving before any replica can
        declare the host lost."""
        return self._renewed_at + self.lease_seconds * (1 - FENCE_MARGIN)

    def _renew(self) -> bool:
        started = boot_clock()
        host = self._lease_lane.transact(
            lambda tx: tx.hosts.renew(
                self.host_id, self.incarnation, self.microvms.memory_gate.available_mib(), self.lease_seconds
            )
        )
        if host is not None:
            self._renewed_at = started
        return host is not None

    async def fence(self, reason: str) -> None:
        """Stop serving at once, then destroy every sandbox of this host."""
        if self.fenced.is_set():
            return
        self.fence_reason = reason
        log.error("host %s fences itself: %s; its sandboxes are destroyed", self.host_id, reason)
        await self.relay.close()
        await self.builds.close()
        await self.microvms.close(grace_seconds=0)
        removed = await self.driver.cleanup_strays(set())
        log.error("host %s fenced: %d sandbox(es) destroyed", self.host_id, len(removed))
        self.fenced.set()

    # -- wake-ups and sweeps ----------------------------------------------------------------------
    def _delivered(self, channel: str, payload: str) -> None:
        """On the listener's thread: hand the wake-up to the event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._wake, payload)

    def _reconnected(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._spawn, self._sweep_once())

    def _wake(self, payload: str) -> None:
        if self.fenced.is_set():
            return
        try:
            kind, words = wakeups.parse(payload)
        except ValueError:
            return
        if kind == wakeups.MICROVM and words:
            self._spawn(self.reconcile(words[0]))
        elif kind == wakeups.BUILDS_WAITING:
            self.claim_builds()
        elif kind == wakeups.FORGET_BUILDS:
            self._spawn(self.builds.forget_builds(words))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("agent work failed: %s", task.exception())

    async def reconcile(self, microvm_id: str) -> None:
        """Do what the MicroVM's state asks of this host, unless it is being done already."""
        microvm = await self.service.fetch(lambda tx: tx.microvms.get(microvm_id))
        if microvm is None or microvm.host_id != self.host_id or self.microvms.busy(microvm_id):
            return
        action = _WORK_STATES.get(microvm.state)
        if microvm.state is MicrovmState.PENDING and self.microvms.sandbox(microvm_id) is not None:
            return  # started; RUNNING is being written
        if action is not None:
            getattr(self.microvms, action)(microvm_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            await self._sweep_once()

    async def _sweep_once(self) -> None:
        if self.fenced.is_set():
            return
        try:
            live = await self.service.fetch(lambda tx: tx.microvms.live(self.host_id))
        except StoreUnavailable:
            return
        for microvm in live:
            if microvm.state in _WORK_STATES:
                await self.reconcile(microvm.id)
        self.claim_builds()

    def claim_builds(self) -> None:
        """Take as many waiting builds as this host has free build slots (in the background)."""
        if self._claiming or self.fenced.is_set():
            return
        self._claiming = True
        self._spawn(self._claim_builds())

    async def _claim_builds(self) -> None:
        try:
            claimed = await self.service.persist(self.service.transact, self._claim)
        finally:
            self._claiming = False
        for build_id in claimed:
            self.builds.schedule_build(build_id)

    def _claim(self, tx: Tx) -> list[str]:
        free = self.build_slots - tx.builds.running_on(self.host_id)
        # Builds for an architecture no host has are taken too, so that they fail with words
        # that say so (builder/architecture.py) rather than wait for ever.
        served = {host.architecture for host in tx.hosts.active(self.service.clock())}
        orphans = tx.builds.unclaimed_architectures() - served - {self.architecture}
        wanted = [self.architecture, *sorted(orphans)]
        return [
            build_id
            for build_id in tx.builds.unclaimed_ids(wanted, free)
            if tx.builds.claim(build_id, self.host_id)
        ]

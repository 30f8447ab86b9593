"""The replica's side: the engines the service sees (placement, MicroVM and build work) and the
sandbox access the endpoint sees, routed to the host that holds each MicroVM.

Work for this process's own host agent goes straight to it. Work for another host is a wake-up
on that host's channel (sent through PostgreSQL); the agent reads what to do from the database.
Endpoint traffic for another host is relayed to its agent (relay_client.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from openmicrovm.cluster import wakeups
from openmicrovm.cluster.agent import HostAgent
from openmicrovm.cluster.placement import NoHost, admission_mib, choose_host
from openmicrovm.cluster.relay_client import RelayedPty, open_relay, read_remote_log
from openmicrovm.lifecycle.version_outputs import OUTPUTS_MANIFEST
from openmicrovm.logs.store import LogChunk, LogStore
from openmicrovm.runtime.driver import DriverError, PtySession
from openmicrovm.service import microvms as records
from openmicrovm.service import versions as version_records
from openmicrovm.service.core import Service
from openmicrovm.service.engines import Placement
from openmicrovm.service.errors import InsufficientCapacityError
from openmicrovm.states import BuildState, ImageState, MicrovmState, VersionState
from openmicrovm.store import Tx
from openmicrovm.store.records import Host, Version

log = logging.getLogger("openmicrovm.dispatch")
# How long a resume on another host is waited for (the endpoint holds a request as long).
RESUME_WAIT_SECONDS = 30.0
RESUME_POLL_SECONDS = 0.02


class Dispatcher:
    def __init__(self, service: Service, local: HostAgent | None, logs: LogStore, secret: bytes) -> None:
        self.service = service
        self.local = local
        self.logs = logs
        self.secret = secret
        self.shared = service.store.shared
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- placement (in the RunMicrovm transaction, on a store thread) -------------------------------
    def place(self, tx: Tx, version: Version, memory_mib: int) -> Placement:
        builds = [
            build
            for build in tx.builds.of_version(version.image_arn, version.number)
            if build.state is BuildState.SUCCESSFUL and build.artifacts
        ]
        snapshot_bytes = max(
            (int(b.artifacts.get("memorySnapshotSizeInBytes", 0)) for b in builds if b.artifacts), default=0
        )
        need = admission_mib(snapshot_bytes, memory_mib)
        if not self.shared:
            if self.local is None:
                return Placement(None, need)
            self.local.microvms.check_capacity(memory_mib, snapshot_bytes)
            return Placement(self.local.host_id, need)
        try:
            host = choose_host(
                tx,
                version.image_arn,
                version.number,
                {build.architecture for build in builds},
                need,
                any(OUTPUTS_MANIFEST in (build.artifacts or {}) for build in builds),
                self.service.clock(),
            )
        except NoHost as reason:
            raise InsufficientCapacityError(
                f"Insufficient capacity: {reason}. Terminate or suspend MicroVMs, add hosts, or try again later."
            ) from None
        if self.local is not None and host.id == self.local.host_id:
            self.local.microvms.check_capacity(memory_mib, snapshot_bytes)  # this host, measured now
        return Placement(host.id, need)

    # -- MicroVM work --------------------------------------------------------------------------------
    def schedule_start(self, microvm_id: str) -> None:
        self._route(microvm_id, "schedule_start")

    def schedule_suspend(self, microvm_id: str) -> None:
        self._route(microvm_id, "schedule_suspend")

    def schedule_resume(self, microvm_id: str) -> None:
        self._route(microvm_id, "schedule_resume")

    def schedule_terminate(self, microvm_id: str) -> None:
        self._route(microvm_id, "schedule_terminate")

    def _route(self, microvm_id: str, action: str) -> None:
        if not self.shared:
            if self.local is not None:
                getattr(self.local.microvms, action)(microvm_id)
            return
        self._spawn(self._route_shared(microvm_id, action))

    async def _route_shared(self, microvm_id: str, action: str) -> None:
        host_id = await self.service.fetch(lambda tx: tx.microvms.host_of(microvm_id))
        if host_id is None:
            return
        if self.local is not None and host_id == self.local.host_id:
            getattr(self.local.microvms, action)(microvm_id)
            return
        # Lost? The host's agent sweeps for its work anyway; this only saves it the wait.
        await self.service.persist(
            self.service.transact,
            lambda tx: tx.wakeups.send(
                wakeups.host_channel(host_id), wakeups.message(wakeups.MICROVM, microvm_id)
            ),
        )

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the endpoint's access to sandboxes -------------------------------------------------------------
    async def _remote_host(self, microvm_id: str) -> Host | None:
        """The MicroVM's host when it is not this process's own (None: it is)."""
        if not self.shared:
            return None

        def host_of(tx: Tx) -> Host | None:
            host_id = tx.microvms.host_of(microvm_id)
            return None if host_id is None else tx.hosts.get(host_id)

        host = await self.service.fetch(host_of)
        if host is None:
            raise DriverError("the MicroVM is on no host")
        if self.local is not None and host.id == self.local.host_id:
            return None
        return host

    async def resume(self, microvm_id: str) -> bool:
        if await self._remote_host(microvm_id) is None:
            if self.local is None:
                return False
            return await self.local.microvms.resume(microvm_id)
        # Another host resumes it; this waits, the way the endpoint holds a request meanwhile. A
        # suspend still under way is waited out first, then the resume asked for.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESUME_WAIT_SECONDS
        while loop.time() < deadline:
            state = await self.service.fetch(lambda tx: tx.microvms.state_of(microvm_id))
            if state is MicrovmState.SUSPENDED:
                await self.service.persist(records.begin_resume, self.service, microvm_id)
                self.schedule_resume(microvm_id)
            elif state not in (MicrovmState.RESUMING, MicrovmState.SUSPENDING):
                return state is MicrovmState.RUNNING
            await asyncio.sleep(RESUME_POLL_SECONDS)
        return False

    async def connect(self, microvm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = await self._remote_host(microvm_id)
        if host is None:
            if self.local is None:
                raise DriverError("this server holds no sandboxes")
            return await self.local.microvms.connect(microvm_id, port)
        return await open_relay(
            host.advertise_url, self.secret, {"op": "connect", "microvm": microvm_id, "port": port}
        )

    async def open_shell(self, microvm_id: str, rows: int, cols: int) -> PtySession:
        host = await self._remote_host(microvm_id)
        if host is None:
            if self.local is None:
                raise DriverError("this server holds no sandboxes")
            return await self.local.microvms.open_shell(microvm_id, rows, cols)
        request = {"op": "shell", "microvm": microvm_id, "rows": rows, "cols": cols}
        return RelayedPty(*await open_relay(host.advertise_url, self.secret, request))

    async def read_log(self, stream: str, after: int, limit: int) -> LogChunk:
        """A chunk of a build's or a MicroVM's log, from the host that writes it."""
        kind, _, resource_id = stream.partition("/")

        def host_of(tx: Tx) -> Host | None:
            if kind == "builds":
                build = tx.builds.get(resource_id)
                host_id = build.host_id if build else None
            else:
                host_id = tx.microvms.host_of(resource_id)
            return None if host_id is None else tx.hosts.get(host_id)

        host = await self.service.fetch(host_of) if self.shared else None
        if host is None or (self.local is not None and host.id == self.local.host_id):
            return await asyncio.to_thread(self.logs.read_from, stream, after, limit)
        return await read_remote_log(host.advertise_url, self.secret, stream, after, limit)

    # -- builds ------------------------------------------------------------------------------------
    def sandbox_driver(self) -> str | None:
        """This process's own host's driver (a replica without an agent cannot know the hosts')."""
        return None if self.local is None else self.local.driver.name

    def schedule_build(self, build_id: str) -> None:
        if self.local is not None:
            self.local.claim_builds()
        if self.shared:
            self._spawn(self._broadcast(wakeups.message(wakeups.BUILDS_WAITING)))

    def schedule_version_deletion(self, image_arn: str, version_number: int) -> None:
        self._spawn(self._delete(image_arn, version_number))

    def schedule_image_deletion(self, image_arn: str) -> None:
        self._spawn(self._delete(image_arn, None))

    async def _delete(self, image_arn: str, version_number: int | None) -> None:
        """Every host frees its copy of the outputs; the version (or image) is then gone."""
        if version_number is None:
            builds = await self.service.persist(self.service.read, lambda tx: tx.builds.of_image(image_arn))
        else:
            builds = await self.service.persist(
                self.service.read, lambda tx: tx.builds.of_version(image_arn, version_number)
            )
        ids = [build.build_id for build in builds]
        if self.local is not None:
            # This host's disk is free before the version is gone (and before the wake-up below,
            # which this host's agent hears too, finds nothing left to do here).
            await self.local.builds.forget_builds(ids)
        if self.shared:
            # A NOTIFY payload holds under 8000 bytes: a hundred build ids at a time.
            for start in range(0, len(ids), 100):
                await self._broadcast(wakeups.message(wakeups.FORGET_BUILDS, *ids[start : start + 100]))
        if version_number is None:
            await self.service.persist(version_records.image_deleted, self.service, image_arn)
        else:
            await self.service.persist(
                version_records.version_deleted, self.service, image_arn, version_number
            )

    async def resume_deletions(self) -> None:
        """Finish deletions a stop interrupted (at start-up; any replica may, twice does no harm)."""

        def pending(tx: Tx) -> tuple[list[str], list[tuple[str, int]]]:
            images = tx.images.arns_in_state(ImageState.DELETING)
            versions = [
                (version.image_arn, version.number)
                for version in tx.versions.in_state(VersionState.DELETING)
                if version.image_arn not in images
            ]
            return images, versions

        images, versions = await self.service.persist(self.service.read, pending)
        for arn in images:
            self.schedule_image_deletion(arn)
        for arn, number in versions:
            self.schedule_version_deletion(arn, number)

    async def _broadcast(self, payload: str) -> None:
        await self.service.persist(
            self.service.transact, lambda tx: tx.wakeups.send(wakeups.ALL_HOSTS, payload)
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

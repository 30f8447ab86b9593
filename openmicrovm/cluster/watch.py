"""Work one replica does for the whole cluster, by lease: the MicroVM timers, and ending the work
of hosts that stopped renewing their lease.

Every replica runs this loop; the one holding the `cluster-watch` lease acts, the others wait to
take over when it stops renewing (a replica that dies loses nothing: its successor reads the same
timers from the database). On SQLite there is one server, which holds no lease and always acts.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from openmicrovm.cluster import wakeups
from openmicrovm.lifecycle.timers import Timers
from openmicrovm.service.core import Service
from openmicrovm.states import MicrovmState
from openmicrovm.store import StoreUnavailable, Tx
from openmicrovm.store.records import Host

log = logging.getLogger("openmicrovm.watch")
LEASE_NAME = "cluster-watch"


def host_lost_reason(host: Host) -> str:
    return (
        f"The host running the MicroVM ({host.id}) was lost: its agent stopped renewing its lease "
        f"(last heard from at {host.heartbeat_at:.3f})."
    )


class ClusterWatch:
    def __init__(self, service: Service, timers: Timers, interval: float = 0.25) -> None:
        self.service = service
        self.timers = timers
        self.interval = interval
        self.holder = f"replica-{secrets.token_hex(6)}"
        self.lease_seconds = service.settings.host_lease_seconds

    def _holds_lease(self) -> bool:
        if not self.service.store.shared:
            return True
        return self.service.transact(
            lambda tx: tx.leases.acquire(LEASE_NAME, self.holder, self.lease_seconds)
        )

    def tick(self) -> None:
        """One pass (blocking: it runs on a store thread)."""
        if not self._holds_lease():
            return
        self.timers.tick()
        if self.service.store.shared:
            for host in self.service.read(lambda tx: tx.hosts.expired(self.service.clock())):
                self.end_lost_host(host)

    def end_lost_host(self, host: Host) -> None:
        """The host's MicroVMs are TERMINATED with the reason, its builds go back to be taken by
        another host, and its disk is no longer counted on; all in one transaction."""
        reason = host_lost_reason(host)

        def end(tx: Tx) -> tuple[int, list[str]]:
            if tx.hosts.mark_lost(host, reason) is None:
                return 0, []  # it renewed after all, or another replica got there first
            ended = 0
            for microvm in tx.microvms.live(host.id):
                if tx.microvms.transition(
                    microvm.id, MicrovmState.TERMINATED, reason=reason, terminated_at=self.service.clock()
                ):
                    ended += 1
            builds = tx.builds.release(host.id)
            tx.hosts.forget(host.id)
            if builds:
                tx.wakeups.send(wakeups.ALL_HOSTS, wakeups.message(wakeups.BUILDS_WAITING))
            return ended, builds

        ended, builds = self.service.transact(end)
        if ended or builds:
            log.warning(
                "host %s lost: %d MicroVM(s) terminated, %d build(s) handed to other hosts",
                host.id,
                ended,
                len(builds),
            )

    async def run(self) -> None:
        while True:
            try:
                await self.service.run(self.tick)
            except Exception as error:
                # A database outage is expected now and then: one line, not a traceback each tick.
                log.warning(
                    "cluster watch failed: %s", error, exc_info=not isinstance(error, StoreUnavailable)
                )
            await asyncio.sleep(self.interval)

    def release(self) -> None:
        """On a clean stop: another replica may take over at once."""
        if self.service.store.shared:
            self.service.transact(lambda tx: tx.leases.release(LEASE_NAME, self.holder))

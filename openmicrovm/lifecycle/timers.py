"""The timers of spec §5.5, read from the store on every tick so that they survive restarts:
maximum duration (counting suspended time), idle suspension, and the suspended time-to-live.

Each timer acts through the same compare-and-set transitions as the API, so a timer fires once:
after it moved a MicroVM on, the condition no longer holds for that state.
"""

from __future__ import annotations

from openmicrovm.service import microvms as records
from openmicrovm.service.core import Service


class Timers:
    def __init__(self, service: Service) -> None:
        self.service = service

    def tick(self) -> None:
        """One pass over the timers (blocking: it runs on a store thread)."""
        now = self.service.clock()
        expired, idle, stale = self.service.read(
            lambda tx: (
                tx.microvms.past_deadline(now),
                tx.microvms.idle_past_policy(now),
                tx.microvms.suspended_past_ttl(now),
            )
        )
        for microvm in expired:
            duration = microvm.config.get("maximumDurationInSeconds")
            records.request_terminate(
                self.service, microvm.id, f"The MicroVM reached its maximum duration of {duration} seconds."
            )
        for microvm in idle:
            records.request_suspend(self.service, microvm.id)
        for microvm in stale:
            records.request_terminate(
                self.service,
                microvm.id,
                f"The MicroVM stayed suspended for its suspendedDurationSeconds ({microvm.suspended_ttl_seconds:g} s).",
            )

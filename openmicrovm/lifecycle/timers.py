"""The timers of spec §5.5, read from the store on every tick so that they survive restarts:
maximum duration (counting suspended time), idle suspension, and the suspended time-to-live.

Each timer acts through the same compare-and-set transitions as the API, so a timer fires once:
after it moved a MicroVM on, the condition no longer holds for that state.
"""

from __future__ import annotations

import asyncio
import logging

from openmicrovm.service import microvms as records
from openmicrovm.service.core import Service

log = logging.getLogger("openmicrovm.timers")
LIVE = ("PENDING", "RUNNING", "SUSPENDING", "SUSPENDED")


class Timers:
    def __init__(self, service: Service, interval: float = 0.25) -> None:
        self.service = service
        self.interval = interval

    def tick(self) -> None:
        now = self.service.clock()
        db = self.service.db
        expired = db.all(
            f"SELECT id, json_extract(config, '$.maximumDurationInSeconds') AS duration FROM microvms "
            f"WHERE state IN ({','.join('?' * len(LIVE))}) AND deadline_at <= ?",
            (*LIVE, now),
        )
        for row in expired:
            records.request_terminate(
                self.service,
                row["id"],
                f"The MicroVM reached its maximum duration of {row['duration']} seconds.",
            )
        idle = db.all(
            "SELECT id FROM microvms WHERE state = 'RUNNING' AND max_idle_seconds IS NOT NULL "
            "AND last_activity_at + max_idle_seconds <= ?",
            (now,),
        )
        for row in idle:
            records.request_suspend(self.service, row["id"])
        stale = db.all(
            "SELECT id, suspended_ttl_seconds FROM microvms WHERE state = 'SUSPENDED' "
            "AND suspended_ttl_seconds IS NOT NULL AND suspended_at + suspended_ttl_seconds <= ?",
            (now,),
        )
        for row in stale:
            records.request_terminate(
                self.service,
                row["id"],
                f"The MicroVM stayed suspended for its suspendedDurationSeconds ({row['suspended_ttl_seconds']:g} s).",
            )

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("timer tick failed")
            await asyncio.sleep(self.interval)

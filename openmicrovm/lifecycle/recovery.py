"""Start-up recovery: every MicroVM that was live when the server stopped is re-adopted, finished
or terminated with a reason, and nothing the driver finds without a record survives.

Order matters: sandboxes are adopted first, then everything else the driver finds (a half-made
sandbox of a start the crash interrupted, a warm pool's leftovers) is removed, and only then are
interrupted starts begun again, on a clean slate.
"""

from __future__ import annotations

import logging

from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.service import microvms as records

log = logging.getLogger("openmicrovm.recovery")
LOST = "The MicroVM's sandbox was gone when the server restarted."


async def recover_microvms(engine: MicrovmEngine) -> None:
    service, driver = engine.service, engine.driver
    rows = service.db.all("SELECT * FROM microvms WHERE state != 'TERMINATED'")
    keep: set[str] = set()
    starts: list[str] = []
    for row in rows:
        microvm_id, state = row["id"], row["state"]
        if state == "PENDING" and not records.is_resuming(row):
            starts.append(microvm_id)  # the start never finished: it begins again below
            continue
        sandbox = await driver.adopt(microvm_id)
        if sandbox is None:
            reason = (row["state_reason"] or "Success.") if state == "TERMINATING" else LOST
            records.mark_terminated(service, microvm_id, reason)
            log.warning("%s (%s): %s", microvm_id, state, reason)
            continue
        keep.add(microvm_id)
        engine.adopt(microvm_id, sandbox)
        suspended = driver.is_suspended(sandbox)
        if state == "TERMINATING":
            engine.schedule_terminate(microvm_id)
        elif state == "PENDING":  # an acknowledged resume: finish it
            engine.schedule_resume(microvm_id)
        elif state == "SUSPENDING":
            if suspended:
                records.transition(
                    service, microvm_id, ("SUSPENDING",), "SUSPENDED", suspended_at=service.clock()
                )
            else:
                engine.schedule_suspend(microvm_id)
        elif state == "SUSPENDED" and not suspended:
            await driver.suspend(sandbox)
        elif state == "RUNNING" and suspended:
            await driver.resume(sandbox)
    removed = await driver.cleanup_strays(keep)
    if removed:
        log.info("removed %d stray sandbox(es) left by an earlier run: %s", len(removed), ", ".join(removed))
    for microvm_id in starts:
        engine.schedule_start(microvm_id)

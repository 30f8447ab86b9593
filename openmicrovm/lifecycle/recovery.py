"""Start-up recovery (spec §3.4 states, issue: restart recovery): every MicroVM that was live when the
server stopped is re-adopted or terminated with a reason, and nothing the driver finds without a
record survives."""

from __future__ import annotations

import logging

from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.service import microvms as records

log = logging.getLogger("openmicrovm.recovery")
LOST = "The MicroVM's sandbox was gone when the server restarted."


async def recover_microvms(engine: MicrovmEngine) -> None:
    service, driver = engine.service, engine.driver
    rows = service.db.all("SELECT id, state FROM microvms WHERE state != 'TERMINATED'")
    keep: set[str] = set()
    for row in rows:
        microvm_id, state = row["id"], row["state"]
        sandbox = await driver.adopt(microvm_id)
        if state == "PENDING":
            # The start never finished: throw away what it left and start again.
            if sandbox is not None:
                await driver.destroy(sandbox)
            keep.add(microvm_id)
            engine.schedule_start(microvm_id)
            continue
        if sandbox is None:
            if state == "TERMINATING":
                records.transition(
                    service, microvm_id, ("TERMINATING",), "TERMINATED",
                    state_reason=service.db.scalar("SELECT state_reason FROM microvms WHERE id = ?", (microvm_id,))
                    or "Success.",
                    terminated_at=service.clock(),
                )
            else:
                records.mark_terminated(service, microvm_id, LOST)
            log.warning("%s: %s", microvm_id, LOST if state != "TERMINATING" else "terminated during the restart")
            continue
        keep.add(microvm_id)
        engine.adopt(microvm_id, sandbox)
        suspended = driver.is_suspended(sandbox)
        if state == "TERMINATING":
            engine.schedule_terminate(microvm_id)
        elif state == "SUSPENDING":
            if suspended:
                records.transition(service, microvm_id, ("SUSPENDING",), "SUSPENDED", suspended_at=service.clock())
            else:
                engine.schedule_suspend(microvm_id)
        elif state == "SUSPENDED" and not suspended:
            # The server stopped in the middle of a resume: the MicroVM is still SUSPENDED.
            await driver.suspend(sandbox)
        elif state == "RUNNING" and suspended:
            await driver.resume(sandbox)
    removed = await driver.cleanup_strays(keep)
    if removed:
        log.info("removed %d stray sandbox(es) left by an earlier run: %s", len(removed), ", ".join(removed))

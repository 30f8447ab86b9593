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
from openmicrovm.states import MicrovmState

log = logging.getLogger("openmicrovm.recovery")
LOST = "The MicroVM's sandbox was gone when the server restarted."


async def recover_microvms(engine: MicrovmEngine, host_id: str) -> None:
    """Recover the MicroVMs of this host (`host_id`); the driver's other sandboxes go."""
    service, driver = engine.service, engine.driver
    keep: set[str] = set()
    starts: list[str] = []
    for microvm in await service.fetch(lambda tx: tx.microvms.live(host_id)):
        state = microvm.state
        if state is MicrovmState.PENDING:
            starts.append(microvm.id)  # the start never finished: it begins again below
            continue
        sandbox = await driver.adopt(microvm.id)
        if sandbox is None:
            reason = (microvm.state_reason or records.SUCCESS) if state is MicrovmState.TERMINATING else LOST
            await service.run(records.mark_terminated, service, microvm.id, reason)
            log.warning("%s (%s): %s", microvm.id, state.value, reason)
            continue
        keep.add(microvm.id)
        engine.adopt(microvm, sandbox)
        suspended = driver.is_suspended(sandbox)
        if state is MicrovmState.TERMINATING:
            engine.schedule_terminate(microvm.id)
        elif state is MicrovmState.RESUMING:  # an acknowledged resume: finish it
            engine.schedule_resume(microvm.id)
        elif state is MicrovmState.SUSPENDING:
            if suspended:
                await engine.suspended(microvm.id)
            else:
                engine.schedule_suspend(microvm.id)
        elif state is MicrovmState.SUSPENDED and not suspended:
            await driver.suspend(sandbox)
        elif state is MicrovmState.RUNNING and suspended:
            await driver.resume(sandbox)
    removed = await driver.cleanup_strays(keep)
    if removed:
        log.info("removed %d stray sandbox(es) left by an earlier run: %s", len(removed), ", ".join(removed))
    for microvm_id in starts:
        engine.schedule_start(microvm_id)

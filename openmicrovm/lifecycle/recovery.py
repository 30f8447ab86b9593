"""Start-up recovery: every MicroVM that was live when the server stopped is re-adopted, finished
or terminated with a reason, and nothing the driver finds without a record survives.

Two steps. `recover_microvms` adopts the live MicroVMs (several at once) and notes what the driver
finds besides them, before the server serves: an API call must find every live MicroVM in the
engine's hands. What it returns then runs while the server serves: it removes exactly the strays
noted (a half-made sandbox of a start the crash interrupted, a warm pool's leftovers), which can
take a while when a crash left hundreds, and only then begins the interrupted starts again, on a
clean slate (a sandbox that something else makes under a stray's id meanwhile, a resumed build or
a cluster sweep's start, waits for it in the driver: BaseDriver.unless_stray). Sandboxes made
after the note are not strays and are never touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from openmicrovm.concurrency import gather_at_most
from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.service import microvms as records
from openmicrovm.states import MicrovmState
from openmicrovm.store.records import Microvm

log = logging.getLogger("openmicrovm.recovery")
LOST = "The MicroVM's sandbox was gone when the server restarted."
# What the server's log says once recovery is over (strays removed, interrupted starts begun).
FINISHED = "recovery finished"
# MicroVMs adopted at once: each mostly waits on its sandbox (agent, cgroup files, nft).
ADOPTED_AT_ONCE = 8


async def _adopt(engine: MicrovmEngine, microvm: Microvm) -> bool:
    """Take a live MicroVM back, or terminate it with a reason; True when its sandbox is kept."""
    service, driver = engine.service, engine.driver
    state = microvm.state
    sandbox = await driver.adopt(microvm.id)
    if sandbox is None:
        reason = (microvm.state_reason or records.SUCCESS) if state is MicrovmState.TERMINATING else LOST
        await service.run(records.mark_terminated, service, microvm.id, reason)
        log.warning("%s (%s): %s", microvm.id, state.value, reason)
        return False
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
    return True


async def recover_microvms(engine: MicrovmEngine, host_id: str) -> Callable[[], Awaitable[None]]:
    """Recover the MicroVMs of this host (`host_id`); returns the rest of the recovery, to run
    while the server serves: the driver's other sandboxes go, then interrupted starts begin."""
    started = time.monotonic()
    driver = engine.driver
    live = await engine.service.fetch(lambda tx: tx.microvms.live(host_id))
    # A start that never finished begins again once the strays are gone (its half-made sandbox
    # is one of them).
    starts = [microvm.id for microvm in live if microvm.state is MicrovmState.PENDING]
    adopting = [microvm for microvm in live if microvm.state is not MicrovmState.PENDING]
    kept = await gather_at_most(ADOPTED_AT_ONCE, (_adopt(engine, microvm) for microvm in adopting))
    keep = {microvm.id for microvm, adopted in zip(adopting, kept, strict=True) if adopted}
    strays = await driver.find_strays(keep)
    log.info(
        "adopted %d MicroVM(s) in %.2f s; %d stray sandbox(es) to remove",
        len(keep),
        time.monotonic() - started,
        len(strays.sandboxes),
    )

    async def finish() -> None:
        try:
            removed = await driver.remove_strays(strays)
        except Exception:
            log.exception("removing stray sandboxes failed; the next start tries again")
        else:
            if removed:
                log.info(
                    "removed %d stray sandbox(es) left by an earlier run: %s",
                    len(removed),
                    ", ".join(removed),
                )
        for microvm_id in starts:
            engine.schedule_start(microvm_id)
        log.info("%s in %.2f s", FINISHED, time.monotonic() - started)

    return finish

"""After a crash: which side of a transition each sandbox is on, and what is left of the others.

The record says which side of a transition a sandbox is on (suspend.py), and a checkpoint or
restore that ran to its end left its marker. adopt() waits for such a command still running, then
keeps a complete suspend image (the sandbox is suspended), drops an incomplete one (the sandbox is
running, or suspended in memory, when it still is; gone otherwise), and takes a finished restore
as running, an unfinished one as suspended. remove_orphans() takes away the runsc containers and
uplinks of sandboxes whose state dir is gone.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import TYPE_CHECKING

from .. import agent_client, names
from ..driver import DriverError, Sandbox
from .network import Uplinks
from .suspend import SUSPEND_IMAGE, checkpoint_marker, has_suspend_image, restore_marker

if TYPE_CHECKING:
    from .driver import GVisorDriver

log = logging.getLogger("openmicrovm.runtime")


class Recovery:
    def __init__(self, driver: GVisorDriver) -> None:
        self.driver = driver

    async def _answers(self, sandbox: Sandbox) -> bool:
        try:
            await agent_client.control(self.driver.agent_address(sandbox), "STATUS", timeout=5.0)
        except (OSError, TimeoutError, DriverError):
            return False
        return True

    async def settle_suspend(self, sandbox: Sandbox, *, wait: bool = True) -> None:
        """A record left "suspending": keep a complete suspend image (suspended on disk), drop an
        incomplete one; then the sandbox is suspended in memory if frozen, else running if it
        answers, else stopped (the record says running: the caller finds it dead)."""
        driver, mark = self.driver, self.driver.tiers.mark
        record = driver.record(sandbox)
        marker = checkpoint_marker(sandbox)
        if wait:
            await marker.wait_for_command(driver.commands.is_launcher)
        if record.suspended_in == "disk" and marker.is_set() and has_suspend_image(sandbox):
            await driver.stop_container(sandbox)  # the sandbox exits after a checkpoint; runsc's record goes
            mark(sandbox, "suspended", "disk")
            return
        log.info("sandbox %s: dropping an incomplete suspend", sandbox.sandbox_id)
        await asyncio.to_thread(shutil.rmtree, sandbox.state_dir / SUSPEND_IMAGE, True)
        marker.clear()
        cgroup = driver.cgroup_of(sandbox)
        if cgroup.pids() and cgroup.is_frozen():
            mark(sandbox, "suspended", "memory")
            return
        if cgroup.pids() and not await self._answers(sandbox):
            # Left half-checkpointed: of no use, and a suspend or resume of it would only fail.
            log.warning("sandbox %s does not answer after an interrupted suspend", sandbox.sandbox_id)
            await driver.stop_container(sandbox)
        mark(sandbox, "running", "")  # adopt() finds a stopped one gone

    async def settle_resume(self, sandbox: Sandbox) -> None:
        """A record left "resuming": running if the restore finished (or the thaw happened), else
        suspended, on disk or in memory, as before."""
        driver, mark = self.driver, self.driver.tiers.mark
        record = driver.record(sandbox)
        cgroup = driver.cgroup_of(sandbox)
        if record.suspended_in == "memory":
            frozen = bool(cgroup.pids()) and cgroup.is_frozen()
            mark(sandbox, "suspended" if frozen else "running", "memory" if frozen else "")
            return
        marker = restore_marker(sandbox)
        await marker.wait_for_command(driver.commands.is_launcher)
        if marker.is_set() and cgroup.pids() and not cgroup.is_frozen() and await self._answers(sandbox):
            mark(sandbox, "running", "")
            await driver.tiers.drop_suspend_image(sandbox)
            return
        log.info("sandbox %s: an unfinished resume; it stays suspended", sandbox.sandbox_id)
        await driver.stop_container(sandbox)
        marker.clear()
        mark(sandbox, "suspended", "disk")

    async def adopt(self, sandbox_id: str) -> Sandbox | None:
        driver = self.driver
        sandbox = driver.load(sandbox_id)
        if sandbox is None:
            return None
        async with driver.lock(sandbox_id):
            record = driver.record(sandbox)
            if record.state in ("starting", "warm"):
                await driver.drop_unfinished(sandbox)
                return None
            if record.state == "suspending":
                await self.settle_suspend(sandbox)
            elif record.state == "resuming":
                await self.settle_resume(sandbox)
            cgroup = driver.cgroup_of(sandbox)
            if record.state == "suspended" and record.suspended_in == "disk":
                if not has_suspend_image(sandbox):
                    return None
            elif record.state == "suspended" and cgroup.pids() and cgroup.is_frozen():
                driver.tiers.schedule_disk_tier(sandbox)
            elif record.state == "running" and cgroup.pids() and not cgroup.is_frozen():
                await driver.tiers.drop_suspend_image(sandbox)  # left by a crash right after a resume
            else:
                return None
            await driver.uplinks.bring_up_to_date(sandbox_id, record, lambda: driver.save(sandbox))
            return sandbox

    async def remove_orphans(self, stray_keys: set[str]) -> None:
        """Uplinks and runsc containers of these stray sandboxes (their state dirs are gone)."""
        driver = self.driver

        def stray(peer_netns: str) -> bool:
            return names.key_of_netns(driver.scope, peer_netns) in stray_keys

        await Uplinks.sweep(stray)
        binaries = driver.commands.every_binary()
        for container in sorted(driver.commands.containers()):
            key = names.key_of_container(container)
            if key is not None and key in stray_keys:
                log.info("removing stray runsc container %s", container)
                await driver.cgroup_for(names.host_names(driver.scope, key)).kill_all()
                await driver.commands.delete(container, binaries)

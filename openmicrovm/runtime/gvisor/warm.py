"""Warm sandboxes for the restore pool (pool.py): how one is made, handed out and discarded.

A warm sandbox is restored from its snapshot like any other, with an uplink switched off, frozen,
and recorded as "warm". Handing it out renames its state dir to the caller's id, switches the
uplink on when the MicroVM asks for egress and thaws it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import agent_client
from ..driver import DriverError, Sandbox
from .checkpoint import read_snapshot
from .pool import RestorePool

if TYPE_CHECKING:
    from .driver import GVisorDriver

log = logging.getLogger("openmicrovm.runtime")


class WarmSandboxes:
    def __init__(self, driver: GVisorDriver, size: int) -> None:
        self.driver = driver
        self.pool = RestorePool(size, self._make, self._hand_out, self._discard)

    async def _make(self, pool_id: str, snapshot_dir: Path) -> Sandbox:
        driver = self.driver
        meta = read_snapshot(snapshot_dir, driver.name)
        driver.gate.check("keep a warm sandbox", meta.footprint_bytes, meta.spec.memory_mib)
        # Every warm sandbox gets an uplink, switched off: hand-out only switches it on.
        sandbox = await driver.restore_new(pool_id, snapshot_dir, meta, False, uplink=True)
        async with driver.destroyed_on_failure(sandbox):
            await driver.cgroup_of(sandbox).freeze()
            driver.record(sandbox).state = "warm"
            driver.save(sandbox)
        return sandbox

    async def _hand_out(self, pool_id: str, sandbox_id: str, wants_egress: bool) -> Sandbox | None:
        driver = self.driver
        warm = driver.load(pool_id)
        if warm is None or driver.record(warm).state != "warm" or driver.record(warm).uplink < 0:
            return None
        target = driver.state_dir(sandbox_id)
        try:
            target.mkdir(mode=0o700)  # claims the id; the rename below replaces this empty dir
        except FileExistsError:
            raise DriverError(f"sandbox {sandbox_id} already exists") from None
        os.rename(warm.state_dir, target)
        record = driver.record(warm)
        record.sandbox_id, record.state = sandbox_id, "running"
        record.spec = dataclasses.replace(record.spec, egress=wants_egress)
        sandbox = Sandbox(sandbox_id, driver.name, target, record.spec, {"record": record})
        driver.save(sandbox)
        try:
            if wants_egress:  # before the thaw: the app's first packet may go out at once
                await driver.uplinks.enable(driver.names_of(sandbox), record)
            driver.cgroup_of(sandbox).thaw()
            status = await agent_client.control(driver.agent_address(sandbox), "STATUS")
            driver.raise_if_app_down(sandbox, status)
        except (OSError, TimeoutError, DriverError):
            log.warning("warm sandbox for %s did not answer after thawing; restoring afresh", sandbox_id)
            await driver.destroy_quietly(sandbox)
            return None
        return sandbox

    async def _discard(self, pool_id: str) -> None:
        sandbox = self.driver.load(pool_id)
        if sandbox is not None:
            await self.driver.destroy(sandbox)

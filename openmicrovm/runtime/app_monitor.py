"""Whether a sandbox's app runs, and words for when it does not: asked of the guest agent, and of
the sandbox's cgroup (a dead gVisor sandbox does not even refuse connections)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from . import agent_client, proc
from .driver import AppStatus, DriverError, Sandbox
from .records import record_of

if TYPE_CHECKING:
    from .base import BaseDriver


class AppMonitor:
    def __init__(self, driver: BaseDriver[Any]) -> None:
        self.driver = driver

    async def wait_ready(self, sandbox: Sandbox, *, grace: float = 0.0) -> None:
        """Wait until the agent answers; fail with the app's own words if it could not start."""
        address = self.driver.agent_address(sandbox)
        deadline = time.monotonic() + self.driver.start_timeout
        next_alive_check = time.monotonic() + 0.1
        delay = 0.002
        while True:
            try:
                status = await agent_client.control(address, "STATUS", timeout=5.0)
                break
            except agent_client.AgentError:
                raise
            except (OSError, TimeoutError, DriverError):
                pass
            now = time.monotonic()
            if now > deadline:
                raise DriverError(
                    f"sandbox {sandbox.sandbox_id} did not come up within {self.driver.start_timeout:g} s; "
                    f"log: {proc.tail(self.driver.log_path(sandbox)) or '(empty)'}"
                )
            if now > next_alive_check:
                next_alive_check = now + 0.1
                if not await self.driver.runtime_alive(sandbox):
                    raise DriverError(
                        f"sandbox {sandbox.sandbox_id} stopped while starting: {self.stopped_detail(sandbox)}"
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.raise_if_app_down(sandbox, status)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
            self.raise_if_app_down(sandbox, await agent_client.control(address, "STATUS"))

    def raise_if_app_down(self, sandbox: Sandbox, status: dict[str, str]) -> None:
        state = status.get("app")
        if state == "running":
            return
        raise DriverError(self.describe_app(sandbox, state or "?", int(status.get("status", "-1"))))

    def describe_app(self, sandbox: Sandbox, state: str, status: int, oom: bool | None = None) -> str:
        """Words for an app that is not running. oom: whether the memory limit struck, when the
        caller has already read it."""
        output = proc.tail(self.driver.log_path(sandbox), 1500) or "(no output)"
        if state == "failed":
            return f"the app could not be started ({os.strerror(status)}); log: {output}"
        how = f"status {status}"
        if status > 128:
            how += f" (killed by signal {status - 128})"
        return f"the app exited with {how}{self._memory_limit_words(sandbox, oom)}; last output: {output}"

    def _memory_limit_words(self, sandbox: Sandbox, oom: bool | None) -> str:
        if oom is None:
            oom = self.driver.cgroup_of(sandbox).oom_kills() > 0
        return f" (it was killed at its memory limit of {sandbox.spec.memory_mib} MiB)" if oom else ""

    def stopped_detail(self, sandbox: Sandbox, oom: bool | None = None) -> str:
        words = "the sandbox is not running" + self._memory_limit_words(sandbox, oom)
        output = proc.tail(self.driver.log_path(sandbox), 1500)
        return words + (f"; log: {output}" if output else "")

    def _ended(
        self, sandbox: Sandbox, state: str, code: int | None = None, oom: bool | None = None
    ) -> AppStatus:
        """The final AppStatus of an app that stopped ("exited", "failed") or of a sandbox that did
        ("stopped"), its memory-limit kills read once (unless the caller has: oom)."""
        if oom is None:
            oom = self.driver.cgroup_of(sandbox).oom_kills() > 0
        if state == "stopped":
            return AppStatus(state, None, oom, self.stopped_detail(sandbox, oom))
        assert code is not None
        return AppStatus(state, code, oom, self.describe_app(sandbox, state, code, oom))

    async def app_status(self, sandbox: Sandbox) -> AppStatus:
        record = record_of(sandbox)
        if record.state in ("suspended", "suspending", "resuming"):
            return AppStatus("suspended")
        oom = self.driver.cgroup_of(sandbox).oom_kills() > 0
        # A dead gVisor sandbox does not even refuse connections; ask the host first.
        if not await self.driver.runtime_alive(sandbox):
            return self._ended(sandbox, "stopped", oom=oom)
        try:
            status = await agent_client.control(self.driver.agent_address(sandbox), "STATUS", timeout=5.0)
        except (OSError, TimeoutError, DriverError):
            return self._ended(sandbox, "stopped", oom=oom)
        state = status.get("app", "?")
        code = int(status.get("status", "-1"))
        if state == "running":
            return AppStatus("running", None, oom)
        return self._ended(sandbox, state, code, oom)

    def _watchable(self, sandbox: Sandbox) -> bool:
        """Meant to be running, and nothing (suspend, resume, destroy) under way."""
        return (
            not self.driver.lock(sandbox.sandbox_id).locked()
            and self.driver.refresh(sandbox).state == "running"
        )

    async def wait_exit(self, sandbox: Sandbox, interval: float = 2.0) -> AppStatus:
        """See SandboxDriver.wait_exit. A dead sandbox: its cgroup is empty (read every interval;
        under gVisor the whole sandbox goes when it is killed). An exited app: the agent answers a
        WAIT request kept open; an agent too old for WAIT is asked STATUS every 5 intervals. The
        WAIT connection is dropped (an ABORT resets it) while the sandbox is suspended."""
        watch: agent_client.AppWatch | None = None
        wait_known = True  # False once an old agent has turned WAIT down
        rounds = 0
        try:
            while True:
                if not sandbox.state_dir.exists():
                    return AppStatus("stopped", None, False, "the sandbox was destroyed")
                quiet = self._watchable(sandbox)
                if quiet and not await self.driver.runtime_alive(sandbox) and self._watchable(sandbox):
                    return self._ended(sandbox, "stopped")
                if not quiet and watch is not None:
                    await watch.close()
                    watch = None
                if quiet and watch is None and wait_known:
                    with contextlib.suppress(OSError, TimeoutError, DriverError):
                        watch = await agent_client.watch_app(self.driver.agent_address(sandbox))
                if quiet and not wait_known and rounds % 5 == 0:
                    # Only the app's own end counts here: an agent slow to answer is no dead sandbox.
                    status = await self.app_status(sandbox)
                    if status.state in ("exited", "failed") and self._watchable(sandbox):
                        return status
                rounds += 1
                if watch is None:
                    await asyncio.sleep(interval)
                    continue
                done, _ = await asyncio.wait({watch.answer}, timeout=interval)
                if not done:
                    continue
                fields: dict[str, str] | None = None
                try:
                    fields = watch.answer.result()
                except agent_client.AgentError as error:
                    wait_known = error.code != agent_client.ERR_PROTOCOL
                except (OSError, ValueError, DriverError):
                    pass  # an ABORT (a suspend), a dead sandbox, a garbled answer: look again
                await watch.close()
                watch = None
                if fields is None or fields.get("app", "running") == "running":
                    continue
                if not self._watchable(sandbox):
                    continue  # the exit stays; it is reported once the sandbox runs again
                try:
                    code = int(fields.get("status", "-1"))
                except ValueError:
                    code = -1
                return self._ended(sandbox, fields["app"], code)
        finally:
            if watch is not None:
                await watch.close()

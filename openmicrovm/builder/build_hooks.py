"""Waiting for a freshly started (or restored) app during a build: the ready and validate hooks,
or, without a ready hook, for the app to accept connections at all.

Hook contract (spec §4.5): 200 = done, 503 = not yet (poll again), anything else or no 200 within
the hook's timeout fails the build. Right after start the port may not be open yet; that counts
as "not yet" too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from openmicrovm.builder.errors import (
    APPLICATION_START_FAILED,
    BuildFailed,
    hook_malformed_failure,
    hook_status_failure,
    hook_timeout_failure,
)
from openmicrovm.runtime import hooks as runtime_hooks
from openmicrovm.runtime.driver import DriverError, PortNotListening, Sandbox, SandboxDriver

# "Poll again quickly": a 503 or a refused connection costs one loopback round trip.
POLL_INTERVAL_SECONDS = 0.05
# While nothing listens yet, ask this often whether the app is still alive at all.
LIVENESS_INTERVAL_SECONDS = 0.5
LogSink = Callable[[str], None]


class _Liveness:
    """Ends a wait early when the app has exited: a crash should not cost the whole timeout."""

    def __init__(self, driver: SandboxDriver, sandbox: Sandbox, where: str) -> None:
        self.driver = driver
        self.sandbox = sandbox
        self.where = where
        self.next_check = 0.0

    async def check(self, force: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if not force and now < self.next_check:
            return
        self.next_check = now + LIVENESS_INTERVAL_SECONDS
        try:
            status = await self.driver.app_status(self.sandbox)
        except DriverError:
            return  # cannot tell; the wait's own timeout decides
        if status.state in ("exited", "failed", "stopped"):
            code = "" if status.exit_status is None else f" with status {status.exit_status}"
            what = (status.detail or f"it {status.state}{code}").rstrip(".")
            memory = (
                " It was killed at its memory limit: raise minimumMemoryInMiB." if status.oom_killed else ""
            )
            raise BuildFailed.because(
                APPLICATION_START_FAILED,
                f"The application{self.where} stopped before it was ready: {what}.{memory}",
            )


async def wait_for_hook(
    driver: SandboxDriver,
    sandbox: Sandbox,
    port: int,
    hook: str,
    timeout_seconds: float,
    log: LogSink,
) -> None:
    """Poll `POST /aws/lambda-microvms/runtime/v1/<hook>` until 200; BuildFailed otherwise."""
    liveness = _Liveness(driver, sandbox, " in the validation sandbox" if hook == "validate" else "")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    last_seen = "no answer yet"
    attempts = 0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            log(f"{hook} hook: no HTTP 200 within {timeout_seconds:g} s (last result: {last_seen})")
            raise hook_timeout_failure(hook, timeout_seconds, port, last_seen)
        attempts += 1
        seen = last_seen
        try:
            result = await runtime_hooks.call_hook(driver, sandbox, port, hook, None, remaining)
        except runtime_hooks.HookConnectionRefused:
            seen = "connection refused (nothing listening on the port yet)"
            await liveness.check()
        except runtime_hooks.HookTimeout:
            seen = "the request was held open without an answer"
        except runtime_hooks.HookMalformedReply as error:
            await liveness.check(force=True)  # a reply cut off by a crash is the crash's fault
            log(f"{hook} hook: malformed HTTP response: {error}")
            raise hook_malformed_failure(hook, str(error)) from None
        except DriverError:
            await liveness.check(force=True)
            raise
        else:
            if result.status == 200:
                log(f"{hook} hook: HTTP 200 after {attempts} attempt(s)")
                return
            if result.status != 503:
                log(f"{hook} hook: HTTP {result.status}")
                raise hook_status_failure(hook, result.status)
            seen = "HTTP 503 (not ready yet)"
        if seen != last_seen:
            log(f"{hook} hook: {seen}; polling again")
            last_seen = seen
        await asyncio.sleep(min(POLL_INTERVAL_SECONDS, max(0.0, deadline - loop.time())))


async def wait_for_port(
    driver: SandboxDriver, sandbox: Sandbox, port: int, timeout_seconds: float, log: LogSink
) -> None:
    """Without a ready hook: wait until the app accepts a TCP connection on `port`."""
    liveness = _Liveness(driver, sandbox, "")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while True:
        try:
            _reader, writer = await asyncio.wait_for(
                driver.connect(sandbox, port), max(0.1, deadline - loop.time())
            )
        except (PortNotListening, TimeoutError):
            if loop.time() >= deadline:
                raise BuildFailed.because(
                    APPLICATION_START_FAILED,
                    f"The application did not accept connections on port {port} within {timeout_seconds:g} "
                    "seconds of starting. Listen on 0.0.0.0 on the port given in hooks.port (or the first "
                    "EXPOSEd port, else 8080), or enable the ready hook.",
                ) from None
            await liveness.check()
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        log(f"application accepts connections on port {port}")
        return

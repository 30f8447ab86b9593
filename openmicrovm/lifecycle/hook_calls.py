"""Calling a MicroVM's runtime lifecycle hooks (run, resume, suspend, terminate; spec §5.7) and
turning their failures into the stateReason texts the live service uses."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from openmicrovm.runtime.driver import DriverError, Sandbox, SandboxDriver
from openmicrovm.runtime.hooks import HookConnectionRefused, HookMalformedReply, HookTimeout, call_hook

log = logging.getLogger("openmicrovm.microvms")
DEFAULT_TIMEOUT_SECONDS = {"run": 30, "resume": 30, "suspend": 30, "terminate": 10}
_ADVICE = "Please check your hook endpoint and application logs for more details."


@dataclass(frozen=True)
class HookOutcome:
    ok: bool
    reason: str | None = None  # the MicroVM's stateReason when not ok
    status: int | None = None


def hook_settings(config: dict[str, Any], name: str) -> tuple[bool, int | None, float]:
    """(enabled, port, timeout seconds) of one runtime hook from a version's configuration."""
    hooks = config.get("hooks") or {}
    group = hooks.get("microvmHooks") or {}
    enabled = group.get(name) == "ENABLED"
    timeout = group.get(f"{name}TimeoutInSeconds") or DEFAULT_TIMEOUT_SECONDS[name]
    return enabled, hooks.get("port"), float(timeout)


async def call_lifecycle_hook(
    driver: SandboxDriver,
    sandbox: Sandbox,
    config: dict[str, Any],
    name: str,
    body: dict[str, Any] | None = None,
) -> HookOutcome:
    enabled, port, timeout = hook_settings(config, name)
    if not enabled or port is None:
        return HookOutcome(True)
    title = name.capitalize()
    payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
    try:
        result = await call_hook(driver, sandbox, port, name, payload, timeout)
    except HookConnectionRefused:
        return HookOutcome(False, f"{title} lifecycle hook connection was refused. {_ADVICE}")
    except HookTimeout:
        return HookOutcome(False, f"{title} lifecycle hook timed out")
    except (HookMalformedReply, DriverError, OSError) as error:
        # Anything else that keeps the hook from answering (the sandbox went away) is a failure too.
        # The stateReason is AWS's fixed text; the cause goes to the server log.
        log.warning("%s: the %s hook failed: %s", sandbox.sandbox_id, name, error)
        return HookOutcome(False, f"{title} lifecycle hook failed. {_ADVICE}")
    if result.status != 200:
        return HookOutcome(
            False, f"{title} lifecycle hook returned HTTP status {result.status}. {_ADVICE}", result.status
        )
    return HookOutcome(True, status=200)

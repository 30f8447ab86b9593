"""Waiting for a MicroVM to reach a state, with progress on stderr."""

from __future__ import annotations

import time
from typing import Any

from openmicrovm.cli.connection import CliError
from openmicrovm.cli.progress import Progress

POLL_SECONDS = 0.25


def wait_for_microvm(
    client: Any, microvm_id: str, wanted: tuple[str, ...], doing: str, timeout: float
) -> dict[str, Any]:
    """GetMicrovm until the MicroVM is in one of `wanted`; CliError when it ends up TERMINATED
    instead (with the reason the server recorded) or the time runs out."""
    progress = Progress()
    deadline = time.monotonic() + timeout
    try:
        while True:
            microvm = client.get_microvm(microvmIdentifier=microvm_id)
            state = microvm["state"]
            if state in wanted:
                return microvm
            if state == "TERMINATED":
                reason = microvm.get("stateReason") or "no reason recorded"
                raise CliError(f"{microvm_id} was terminated while {doing}: {reason}")
            progress.update(f"{doing} {microvm_id}: {state}")
            if time.monotonic() > deadline:
                raise CliError(
                    f"{microvm_id} is still {state} after {timeout:.0f} s; "
                    f"`openmicrovm logs {microvm_id}` may say why"
                )
            time.sleep(POLL_SECONDS)
    finally:
        progress.finish()

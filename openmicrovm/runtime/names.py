"""Short, kernel-safe names for what a sandbox owns on the host.

Sandbox ids come from the caller (`microvm-<uuid>`, `build-<uuid>`) and are too long for some
kernel names, so every host object is named after a hash of the id. A prefix derived from the
driver's state root lets cleanup_strays find this server's leftovers without touching another
server's sandboxes on the same machine.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .driver import DriverError

_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_sandbox_id(sandbox_id: str) -> None:
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise DriverError(
            f"invalid sandbox id {sandbox_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class HostNames:
    """Names of one sandbox's host objects."""

    key: str  # 12 hex digits, unique per sandbox id
    container: str  # runsc container id
    netns: str  # the sandbox's network namespace (/run/netns/<name>)
    peer_netns: str  # the small namespace holding the host end of the veth pair (gvisor)
    cgroup: str  # path below each controller's root, e.g. "openmicrovm-<scope>/<key>"


def scope_for(state_root: Path, driver: str) -> str:
    """Eight hex digits naming one driver instance (state root + driver) on this machine."""
    return _digest(f"{state_root.resolve()}|{driver}", 8)


def host_names(scope: str, sandbox_id: str) -> HostNames:
    key = _digest(sandbox_id, 12)
    return HostNames(
        key=key,
        container=f"omv-{key}",
        netns=f"omv-{scope}-{key}",
        peer_netns=f"omv-{scope}-{key}-h",
        cgroup=f"openmicrovm-{scope}/{key}",
    )


def netns_prefix(scope: str) -> str:
    return f"omv-{scope}-"


def cgroup_parent(scope: str) -> str:
    return f"openmicrovm-{scope}"

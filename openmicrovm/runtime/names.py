"""Short, kernel-safe names for what a sandbox owns on the host.

Sandbox ids come from the caller (`microvm-<uuid>`, `build-<uuid>`) and do not fit every kernel
name, so each sandbox gets a random key when it is created, kept in its record, and every host
object is named after it. The key does not depend on the id, so a sandbox restored ahead of time
(gvisor's warm pool) can be handed to whichever id asks first. A prefix derived from the driver's
state root lets cleanup_strays find this server's leftovers without touching another server's
sandboxes on the same machine.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .driver import DriverError

_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY = re.compile(r"[0-9a-f]{12}")


def check_sandbox_id(sandbox_id: str) -> None:
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise DriverError(
            f"invalid sandbox id {sandbox_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )


def new_key() -> str:
    """Twelve hex digits: unique per sandbox."""
    return secrets.token_hex(6)


def is_key(text: str) -> bool:
    return bool(_KEY.fullmatch(text))


@dataclass(frozen=True)
class HostNames:
    """Names of one sandbox's host objects."""

    key: str
    container: str  # runsc container id
    netns: str  # the sandbox's network namespace (/run/netns/<name>)
    peer_netns: str  # the small namespace holding the host end of the veth pair (gvisor)
    cgroup: str  # path below each controller's root, e.g. "openmicrovm-<scope>/<key>"


def scope_for(state_root: Path, driver: str) -> str:
    """Eight hex digits naming one driver instance (state root + driver) on this machine."""
    return hashlib.sha256(f"{state_root.resolve()}|{driver}".encode()).hexdigest()[:8]


def host_names(scope: str, key: str) -> HostNames:
    return HostNames(
        key=key,
        container=f"omv-{key}",
        netns=f"omv-{scope}-{key}",
        peer_netns=f"omv-{scope}-{key}-h",
        cgroup=f"openmicrovm-{scope}/{key}",
    )


def netns_prefix(scope: str) -> str:
    return f"omv-{scope}-"


def key_of_netns(scope: str, name: str) -> str | None:
    rest = name.removeprefix(netns_prefix(scope))
    key = rest.removesuffix("-h")
    return key if name.startswith(netns_prefix(scope)) and is_key(key) else None


def key_of_container(container: str) -> str | None:
    key = container.removeprefix("omv-")
    return key if container.startswith("omv-") and is_key(key) else None


def cgroup_parent(scope: str) -> str:
    return f"openmicrovm-{scope}"

"""Sandbox drivers: the interface (driver.py) and its implementations.

    driver = make_driver("auto", state_root, cache_dir)   # or driver_from_settings(settings)

"auto" picks gvisor when runsc is installed and usable here, else process (registry.py). Drivers
take options (options.DriverOptions; gvisor's own in gvisor/options.py), each a setting.
Call `await driver.close()` when the server stops.

Modules: driver (the interface), registry (which drivers there are, making one), options (what
they take), gvisor/ and process (the drivers; gvisor/driver.py lists the gvisor package's
mechanisms), base (what they share), agent/*.c + agent_client (the guest agent and its
protocol.h), agent/shim.c + agent_build (the host-side keeper, compiling both), egress (a sandbox's
uplink), netns, cgroups, oci, rootfs (image lookups), names, host (tools, memory admission),
host_report (doctor's view of the host), proc (subprocesses), hooks (lifecycle hooks), runsc
(which runsc binary), runsc_install (installs Debian 13's runsc into the cache). The host's side
of networking is openmicrovm/hostnet.
"""

from __future__ import annotations

from typing import Any

from .driver import (
    AppStatus,
    CapacityError,
    DriverCapabilities,
    DriverError,
    PortNotListening,
    ProcessConfig,
    PtySession,
    Sandbox,
    SandboxDriver,
    SandboxSpec,
    SandboxStats,
    SnapshotError,
    SnapshotInfo,
    TooManyConnections,
)

__all__ = [
    "AppStatus",
    "CapacityError",
    "DriverCapabilities",
    "DriverError",
    "PortNotListening",
    "ProcessConfig",
    "PtySession",
    "Sandbox",
    "SandboxDriver",
    "SandboxSpec",
    "SandboxStats",
    "SnapshotError",
    "SnapshotInfo",
    "TooManyConnections",
    "driver_from_settings",
    "driver_names",
    "make_driver",
]

# The registry imports every driver; only what makes a driver needs it, so it loads on first use.
_FROM_REGISTRY = ("driver_from_settings", "driver_names", "make_driver")


def __getattr__(name: str) -> Any:
    if name in _FROM_REGISTRY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

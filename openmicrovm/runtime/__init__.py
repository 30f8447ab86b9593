"""Sandbox drivers: the interface (driver.py) and its implementations.

    driver = make_driver("auto", state_root, cache_dir)

"auto" picks gvisor when runsc is installed and usable here, else process. Drivers accept
keyword options (memory_reserve_mib, start_timeout, exit_grace, suspend_to_disk_after,
restore_pool_size; see base.BaseDriver; gvisor also runsc, runsc_platform and
egress_allow_networks, see gvisor.py).
Call `await driver.close()` when the server stops.

Modules: driver (the interface), gvisor / process (the drivers), base (what they share), pool (warm
restores), agent/*.c + agent_client (the guest agent and its protocol.h), agent/shim.c +
agent_build (the host-side keeper, compiling both), netns, cgroups, oci, rootfs (image lookups),
names, host (tools, memory admission, describe_host), proc (subprocesses), hooks (lifecycle hooks),
runsc (which runsc binary), runsc_install (installs Debian 13's runsc into the cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

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
from .host import HostReport, describe_host, missing_for

log = logging.getLogger("openmicrovm.runtime")

DRIVER_NAMES = ("gvisor", "process")
# egress_allow_networks: the process driver gives sandboxes no outbound network to open.
GVISOR_ONLY_OPTIONS = ("runsc", "runsc_platform", "egress_allow_networks")
# What an operator loses with the process driver: said with the fallback to it (a WARNING).
PROCESS_DRIVER_LIMITS = (
    "isolates less than gVisor: apps run on the host's kernel behind Linux namespaces, a user "
    "namespace, a seccomp filter and a reduced capability set, instead of on gVisor's own kernel, "
    "so a bug in the host kernel's system calls is a way out; has no memory snapshots (every "
    "restore cold-starts the app on its files, losing what it held in memory, and suspend keeps "
    "the memory resident); gives MicroVMs no internet egress; and refuses "
    "additionalOsCapabilities ALL. Install runsc (apt-get install runsc, or `openmicrovm doctor`) "
    "for the gvisor driver"
)

__all__ = [
    "DRIVER_NAMES",
    "AppStatus",
    "CapacityError",
    "DriverCapabilities",
    "DriverError",
    "HostReport",
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
    "describe_host",
    "make_driver",
]


def make_driver(name: str, state_root: Path, cache_dir: Path, **options: object) -> SandboxDriver:
    """A driver keeping its state under state_root (one directory per driver) and its built
    helpers under cache_dir."""
    if name == "auto":
        problems = missing_for("gvisor", cache_dir)
        if not problems:
            name = "gvisor"
        else:
            log.warning(
                "gvisor driver unavailable (%s); falling back to the process driver, which %s",
                "; ".join(problems),
                PROCESS_DRIVER_LIMITS,
            )
            name = "process"
    if name not in DRIVER_NAMES:
        raise DriverError(f"unknown sandbox driver {name!r}; choose auto, {', '.join(DRIVER_NAMES)}")
    problems = missing_for(name, cache_dir)
    if problems:
        raise DriverError(f"the {name} driver cannot run on this host: missing {'; '.join(problems)}")
    if name == "gvisor":
        from .gvisor import GVisorDriver

        driver: SandboxDriver = GVisorDriver(state_root, cache_dir, **options)
    else:
        from .process import ProcessDriver

        # Options that only mean something to gvisor are dropped, so one configuration serves both.
        common = {key: value for key, value in options.items() if key not in GVISOR_ONLY_OPTIONS}
        driver = ProcessDriver(state_root, cache_dir, **common)
    log.info("sandbox driver: %s (state in %s)", name, state_root)
    return driver

"""What this host offers the drivers: tools, privileges, cgroups, memory."""

from __future__ import annotations

import os
import shutil

from . import agent_build, cgroups
from .driver import CapacityError

MIB = 1024 * 1024


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values: dict[str, int] = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


class MemoryGate:
    """Admission control: refuse a sandbox the host could not hold.

    Sandbox memory limits are deliberately overcommitted (an idle 2 GiB MicroVM uses tens of MiB), so
    the rule is about what a new sandbox will really take: it is admitted while
        MemAvailable - reserve >= footprint + tier / 8
    where footprint is what it occupies right away (measured at snapshot time for a restore, a fixed
    estimate for a cold start) and tier / 8 is room to grow before the next admission looks again.
    The reserve is what the host keeps for itself (default: 5 % of RAM, at least 256 MiB).
    """

    def __init__(self, reserve_mib: int | None = None) -> None:
        if reserve_mib is None:
            reserve_mib = max(256, meminfo().get("MemTotal", 0) // MIB // 20)
        self.reserve_bytes = reserve_mib * MIB

    def available_mib(self) -> int:
        """What new sandboxes may still take: MemAvailable less the reserve."""
        return max(0, (meminfo().get("MemAvailable", 0) - self.reserve_bytes) // MIB)

    def check(self, action: str, footprint_bytes: int, tier_mib: int) -> None:
        need = footprint_bytes + tier_mib * MIB // 8
        available = meminfo().get("MemAvailable", 0)
        if available - self.reserve_bytes < need:
            raise CapacityError(
                f"not enough memory on the host to {action}: {available // MIB} MiB available, "
                f"{self.reserve_bytes // MIB} MiB kept in reserve for the host, "
                f"{need // MIB} MiB needed (footprint {footprint_bytes // MIB} MiB + 1/8 of the "
                f"{tier_mib} MiB tier)"
            )


def common_problems() -> list[str]:
    """Why no driver can run on this host (empty when every driver's common needs are met); each
    driver adds its own (BaseDriver.host_problems)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (namespaces, cgroups, mounts)")
    if cgroups.detect() is None:
        problems.append(
            "cgroup controllers memory, cpu, cpuacct, pids and freezer (v1) or memory, cpu, pids (v2)"
        )
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} (apt-get install {package})")
    if agent_build.compiler() is None:
        problems.append("gcc to build the guest agent (apt-get install gcc libc6-dev)")
    return problems

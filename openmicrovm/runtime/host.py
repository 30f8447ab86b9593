"""What this host offers the drivers: tools, privileges, cgroups, memory."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import agent_build, cgroups
from . import runsc as runsc_binaries
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


@dataclass
class ToolReport:
    name: str
    path: str | None
    version: str | None = None
    note: str | None = None


@dataclass
class HostReport:
    kernel: str
    root: bool
    cgroup_version: int | None
    memory_total_mib: int
    memory_available_mib: int
    tools: list[ToolReport] = field(default_factory=list)
    drivers: dict[str, str] = field(default_factory=dict)  # driver -> "available" or why not
    default_driver: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


async def _version(argv: list[str]) -> str | None:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(process.communicate(), 10)
    except (OSError, TimeoutError):
        return None
    text = out.decode(errors="replace").strip().splitlines()
    return text[0] if text else None


def _overlayfs_supported() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


def missing_for(driver: str, cache_dir: Path | None = None) -> list[str]:
    """Why `driver` cannot run on this host (empty when it can). cache_dir: where the driver would
    also look for a runsc that runsc_install.py installed."""
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
    if driver == "gvisor":
        try:
            runsc_binaries.choose(cache_dirs=[cache_dir] if cache_dir else None)
        except runsc_binaries.RunscError as error:
            installed = runsc_binaries.system_binary() or runsc_binaries.installed(
                [cache_dir] if cache_dir else None
            )
            problems.append(f"a usable runsc ({error})" if installed else "runsc (apt-get install runsc)")
    if driver == "process":
        if shutil.which("bwrap") is None:
            problems.append("bwrap (apt-get install bubblewrap)")
        if not _overlayfs_supported():
            problems.append("overlayfs in the kernel")
    return problems


async def describe_host() -> HostReport:
    """For `openmicrovm doctor`: what is installed and which drivers can run."""
    memory = meminfo()
    layout = cgroups.detect()
    report = HostReport(
        kernel=platform.release(),
        root=os.geteuid() == 0,
        cgroup_version=layout.version if layout else None,
        memory_total_mib=memory.get("MemTotal", 0) // MIB,
        memory_available_mib=memory.get("MemAvailable", 0) // MIB,
    )
    try:
        runsc = runsc_binaries.choose()
        others = [r.version for r in runsc_binaries.installed() if r.path != runsc.path]
        platform_used = runsc_binaries.choose_platform(runsc)
        note = f"used with --platform={platform_used} (the kvm platform does not work on PVM hosts)"
        if others:
            note += f"; also installed, for snapshots made with them: {', '.join(others)}"
        report.tools.append(ToolReport("runsc", runsc.path, f"runsc version {runsc.version}", note))
    except runsc_binaries.RunscError as error:
        report.tools.append(ToolReport("runsc", None, None, str(error)))
    for name, argv in (
        ("bwrap", ["bwrap", "--version"]),
        ("ip", ["ip", "-V"]),
        ("gcc", ["gcc", "--version"]),
    ):
        path = shutil.which(name)
        report.tools.append(ToolReport(name, path, await _version(argv) if path else None))
    for driver in ("gvisor", "process"):
        problems = missing_for(driver)
        report.drivers[driver] = "available" if not problems else "missing: " + "; ".join(problems)
    report.default_driver = next((d for d in ("gvisor", "process") if report.drivers[d] == "available"), None)
    return report

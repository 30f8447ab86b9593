"""For `openmicrovm doctor`: what this host has installed, and which drivers can run on it."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field

from openmicrovm.config import Settings

from . import cgroups, proc
from . import runsc as runsc_binaries
from .driver import DriverError
from .host import MIB, meminfo
from .registry import DRIVERS


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
    """The first line a tool prints about its version, or None when it cannot say."""
    try:
        result = await proc.run(argv, check=False, timeout=10)
    except DriverError:  # not runnable, or too slow
        return None
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return lines[0] if lines else None


async def describe_host(settings: Settings | None = None) -> HostReport:
    """What is installed and which drivers can run, with the drivers configured as settings say
    (the defaults when there are none)."""
    settings = settings or Settings()
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
        runsc = runsc_binaries.choose(settings.runsc or None, [settings.cache_dir])
        others = [r.version for r in runsc_binaries.installed([settings.cache_dir]) if r.path != runsc.path]
        platform_used = runsc_binaries.choose_platform(runsc, settings.gvisor_platform or None)
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
    for driver in DRIVERS:
        problems = driver.host_problems(driver.options_type.from_settings(settings), settings.cache_dir)
        report.drivers[driver.name] = "available" if not problems else "missing: " + "; ".join(problems)
    report.default_driver = next((d.name for d in DRIVERS if report.drivers[d.name] == "available"), None)
    return report

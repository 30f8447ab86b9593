"""What every driver is configured with; a driver with more subclasses it (gvisor/options.py).

Each field has its setting (config.Settings) and from_settings() maps one onto the other, so that
the server, `openmicrovm cleanup` and the benches configure a driver the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

from openmicrovm.config import Settings


@dataclass(frozen=True)
class DriverOptions:
    # Memory the host keeps for itself (host.MemoryGate); None: 5 % of RAM, at least 256 MiB.
    # Setting host_memory_reserve_mib (0: None).
    memory_reserve_mib: int | None = None
    # Seconds a sandbox may take to come up before start() or restore() gives up.
    start_timeout: float = 60.0
    # Seconds start() watches a new app, to report one that exits at once.
    exit_grace: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(memory_reserve_mib=settings.host_memory_reserve_mib or None)

    @classmethod
    def extending(cls, common: DriverOptions | None) -> Self:
        """These options with every driver's fields taken from `common` and the rest at their
        defaults."""
        if common is None:
            return cls()
        return cls(**{name: getattr(common, name) for name in DriverOptions.names()})

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(item.name for item in fields(cls))

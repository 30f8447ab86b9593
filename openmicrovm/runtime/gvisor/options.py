"""The gvisor driver's own options, beside every driver's (runtime/options.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Self

from openmicrovm.config import Settings
from openmicrovm.hostnet import policies
from openmicrovm.hostnet.addresses import EgressPolicy

from ..options import DriverOptions


@dataclass(frozen=True)
class GVisorOptions(DriverOptions):
    # The runsc binary for new sandboxes (setting runsc, $OPENMICROVM_RUNSC); None: the newest that
    # works here (runtime/runsc.py).
    runsc: str | None = None
    # Its platform, ptrace or systrap (setting gvisor_platform, or $OPENMICROVM_RUNSC_PLATFORM);
    # None: ptrace.
    runsc_platform: str | None = None
    # What sandboxes with egress may reach, and where their uplinks take addresses (the settings
    # egress_allow_networks, sandbox_subnet, microvm_egress_deny and build_egress_deny; an invalid
    # one stops the server at start).
    egress: EgressPolicy = field(default_factory=lambda: policies.for_microvms(Settings()))
    # Seconds a suspended sandbox stays frozen in RAM before its memory goes to disk, so that a
    # quick resume is instant (setting suspend_to_disk_after_seconds; 0: to disk at once).
    suspend_to_disk_after: float = 20.0
    # Sandboxes kept restored ahead of time per hot snapshot (setting restore_pool_size; 0: none).
    restore_pool_size: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return replace(
            super().from_settings(settings),
            runsc=settings.runsc or None,
            runsc_platform=settings.gvisor_platform or None,
            egress=policies.for_microvms(settings),
            suspend_to_disk_after=settings.suspend_to_disk_after_seconds,
            restore_pool_size=settings.restore_pool_size,
        )

"""The egress policies the settings give builds and MicroVMs."""

from __future__ import annotations

from openmicrovm.config import Settings

from .addresses import EgressPolicy


def for_builds(settings: Settings) -> EgressPolicy:
    return EgressPolicy.parse(
        settings.build_subnet,
        "build_subnet",
        settings.build_egress_deny,
        "build_egress_deny",
        settings.egress_allow_networks,
    )


def for_microvms(settings: Settings) -> EgressPolicy:
    # The operator's denials for builds hold for MicroVMs too: both reach the same networks.
    return EgressPolicy.parse(
        settings.sandbox_subnet,
        "sandbox_subnet",
        (*settings.microvm_egress_deny, *settings.build_egress_deny),
        "microvm_egress_deny",
        settings.egress_allow_networks,
    )

"""Which target architectures this host can build and run (API names vs kernel machine names)."""

from __future__ import annotations

import platform

from openmicrovm.builder.errors import ARCHITECTURE_NOT_SUPPORTED, BuildFailed

# API enum (MODEL `Architecture`) -> `uname -m`.
API_TO_MACHINE = {"X86_64": "x86_64", "ARM_64": "aarch64"}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_machine() -> str:
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def host_architecture() -> str | None:
    """The API name of this host's architecture, or None when the API has no name for it."""
    machine = host_machine()
    return next((api for api, name in API_TO_MACHINE.items() if name == machine), None)


def check_architecture(target: str) -> None:
    """Builds run the app natively; an image for another CPU could not even be started here."""
    machine = host_machine()
    if API_TO_MACHINE.get(target) == machine:
        return
    wanted = API_TO_MACHINE.get(target, "an unknown machine type")
    raise BuildFailed.because(
        ARCHITECTURE_NOT_SUPPORTED,
        f"This server runs on {machine} ({host_architecture() or 'no API name'}) and cannot build or run "
        f"{target} ({wanted}) images. Use cpuConfigurations with architecture "
        f"{host_architecture() or machine}, or run the server on a {wanted} host.",
    )

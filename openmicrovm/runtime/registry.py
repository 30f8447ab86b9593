"""The drivers there are, and how one is chosen and made: the one place the server, the CLI
(serve, cleanup, doctor) and the benches get a driver from.

"auto" takes the first driver in DRIVERS that can run here, and says what the operator loses when
that is not the first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmicrovm.config import Settings

from .base import BaseDriver
from .driver import DriverError, SandboxDriver
from .gvisor import GVisorDriver
from .options import DriverOptions
from .process import ProcessDriver

log = logging.getLogger("openmicrovm.runtime")

# In the order "auto" prefers them.
DRIVERS: tuple[type[BaseDriver[Any]], ...] = (GVisorDriver, ProcessDriver)
AUTO = "auto"


def driver_names() -> tuple[str, ...]:
    return tuple(driver.name for driver in DRIVERS)


def driver_class(name: str) -> type[BaseDriver[Any]]:
    for driver in DRIVERS:
        if driver.name == name:
            return driver
    raise DriverError(f"unknown sandbox driver {name!r}; choose {AUTO}, {', '.join(driver_names())}")


def missing_for(name: str, cache_dir: Path | None = None, options: DriverOptions | None = None) -> list[str]:
    """Why driver `name` cannot run on this host with these options (empty when it can). cache_dir:
    where it would also look for helpers it installed (gvisor: a newer runsc)."""
    driver = driver_class(name)
    return driver.host_problems(options or driver.options_type(), cache_dir)


OptionsFor = Callable[[type[BaseDriver[Any]]], DriverOptions]


def _open(name: str, state_root: Path, cache_dir: Path, options_for: OptionsFor) -> SandboxDriver:
    if name == AUTO:
        passed_over: list[tuple[type[BaseDriver[Any]], list[str]]] = []
        for candidate in DRIVERS:
            options = options_for(candidate)
            problems = candidate.host_problems(options, cache_dir)
            if not problems:
                break
            passed_over.append((candidate, problems))
        else:
            raise DriverError(
                "no sandbox driver can run on this host: "
                + "; ".join(f"{d.name} needs {', '.join(p)}" for d, p in passed_over)
            )
        for skipped, problems in passed_over:
            log.warning(
                "%s driver unavailable (%s); falling back to the %s driver, which %s",
                skipped.name,
                "; ".join(problems),
                candidate.name,
                candidate.fallback_limits,
            )
        chosen = candidate
    else:
        chosen = driver_class(name)
        options = options_for(chosen)
        problems = chosen.host_problems(options, cache_dir)
        if problems:
            raise DriverError(f"the {name} driver cannot run on this host: missing {'; '.join(problems)}")
    # The options the host was checked with are the ones the driver gets (made once: from the
    # settings, that parses the egress policy).
    driver = chosen(state_root, cache_dir, options)
    log.info("sandbox driver: %s (state in %s)", chosen.name, state_root)
    return driver


def make_driver(name: str, state_root: Path, cache_dir: Path, **options: Any) -> SandboxDriver:
    """A driver keeping its state under state_root (one directory per driver) and its built
    helpers under cache_dir. options: fields of the drivers' options (options.py and each
    driver's own); a field the chosen driver does not have is left out, so that one set of
    options serves whichever driver "auto" chooses."""
    known = frozenset().union(*(driver.options_type.names() for driver in DRIVERS))
    unknown = sorted(set(options) - known)
    if unknown:
        raise DriverError(f"unknown sandbox driver option {unknown[0]!r}; known: {', '.join(sorted(known))}")

    def options_for(driver: type[BaseDriver[Any]]) -> DriverOptions:
        own = driver.options_type.names()
        return driver.options_type(**{key: value for key, value in options.items() if key in own})

    return _open(name, state_root, cache_dir, options_for)


def driver_from_settings(settings: Settings) -> SandboxDriver:
    """The driver of a server with these settings, configured from them (the setting `driver`)."""
    return _open(
        settings.driver,
        settings.data_dir / "sandboxes",
        settings.cache_dir,
        lambda driver: driver.options_type.from_settings(settings),
    )

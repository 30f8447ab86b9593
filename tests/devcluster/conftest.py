"""Shared set-up of the devcluster's tests: they make network namespaces and links, so they need
root and iproute2; each test's names carry an id of its own, and whatever a test leaves is swept."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from openmicrovm.devcluster import network


@pytest.fixture(autouse=True)
def _needs_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the devcluster makes network namespaces: run the tests as root")
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("the devcluster needs `ip` (iproute2) and `nsenter` (util-linux)")


@pytest.fixture
def naming() -> Iterator[network.Naming]:
    """Names for one test's bridge, links and namespaces; all removed after the test."""
    names = network.Naming(secrets.token_hex(3))
    yield names
    network.sweep(names)


def agent_command_missing() -> str | None:
    """Why the tests that start agents cannot run yet, or None."""
    done = subprocess.run(
        [sys.executable, "-m", "openmicrovm", "agent", "--help"], capture_output=True, text=True, timeout=120
    )
    if "invalid choice" in done.stderr:
        return "`python -m openmicrovm agent` does not exist yet (the host agent is being written)"
    return None


def run_in_namespace(netns: str, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run Python code inside a namespace, with this interpreter (and so its packages)."""
    return subprocess.run(
        [*network.enter_command(netns), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )

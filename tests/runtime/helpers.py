"""Talking to sandboxes from tests: HTTP over driver.connect, commands on a PTY."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from openmicrovm.runtime import PortNotListening, ProcessConfig, Sandbox, SandboxDriver, SandboxSpec
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.records import record_of
from openmicrovm.runtime.registry import missing_for

APP_PORT = 8080
WAIT_SECONDS = 30.0  # an upper bound for slow machines, never a performance assertion


def app_spec(rootfs: Path, **overrides: Any) -> SandboxSpec:
    env = overrides.pop("env", {})
    user = overrides.pop("user", "0")
    argv = overrides.pop("argv", ["python3", "/app/app.py"])
    fields: dict[str, Any] = {"memory_mib": 512}
    fields.update(overrides)
    return SandboxSpec(
        rootfs=rootfs, process=ProcessConfig(argv=argv, env=env, workdir="/app", user=user), **fields
    )


async def http(
    driver: SandboxDriver, sandbox: Sandbox, path: str = "/", port: int = APP_PORT, wait: float = WAIT_SECONDS
) -> tuple[int, dict[str, Any]]:
    """GET path from the app, waiting (up to `wait`) for it to listen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            reader, writer = await driver.connect(sandbox, port)
            break
        except PortNotListening:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), WAIT_SECONDS)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def run_command(
    driver: SandboxDriver, sandbox: Sandbox, argv: list[str], rows: int = 24, cols: int = 80
) -> tuple[int, str]:
    """Run argv on a PTY in the sandbox; its exit status and everything it printed."""
    session = await driver.exec_pty(sandbox, argv, rows=rows, cols=cols)
    output = bytearray()
    try:
        while chunk := await asyncio.wait_for(session.read(), WAIT_SECONDS):
            output += chunk
        status = await asyncio.wait_for(session.wait(), WAIT_SECONDS)
    finally:
        await session.close()
    return status, output.decode(errors="replace").replace("\r\n", "\n")


async def probe(driver: SandboxDriver, sandbox: Sandbox, targets: list[str]) -> dict[str, str]:
    """From inside the sandbox, try a TCP connection to each host:port."""
    status, output = await run_command(driver, sandbox, ["python3", "/app/probe.py", *targets])
    assert status == 0, output
    line = next(line for line in output.splitlines() if line.startswith("PROBE "))
    return dict(json.loads(line[len("PROBE ") :]))


def only_driver(name: str) -> str:
    """For a driver_name fixture of tests about one driver: its name, or a skip saying why it is
    unavailable here."""
    problems = missing_for(name)
    if problems:
        pytest.skip(f"{name} driver unavailable: {'; '.join(problems)}")
    return name


async def warm_pool_key(driver: BaseDriver) -> str:
    """The key of the first warm sandbox the restore pool makes (it fills in the background)."""
    for _ in range(600):
        warm = [path for path in driver.sandboxes_dir.iterdir() if path.name.startswith("pool-")]
        if warm and (loaded := driver.load(warm[0].name)) and record_of(loaded).state == "warm":
            return record_of(loaded).key
        await asyncio.sleep(0.05)
    raise AssertionError("no warm sandbox appeared")

"""The commands that change the host's network (ip, nft, iptables), with their output in errors."""

from __future__ import annotations

import asyncio

from .errors import HostNetworkError


async def run_command(argv: list[str], stdin: str | None = None, check: bool = True) -> tuple[int, str]:
    """Run a command; returns (returncode, combined output). Raises HostNetworkError if `check`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        package = "nftables" if argv[0] == "nft" else "iproute2"
        raise HostNetworkError(
            f"`{argv[0]}` is not installed on this server (Debian: apt-get install {package})"
        ) from None
    output, _ = await process.communicate(stdin.encode() if stdin is not None else None)
    text = output.decode(errors="replace").strip()
    assert process.returncode is not None
    if check and process.returncode != 0:
        shown = " ".join(argv) + (f" <<< {stdin.strip()!r}" if stdin else "")
        raise HostNetworkError(f"{shown} failed: {text}")
    return process.returncode, text


async def ip_batch(netns: str | None, commands: list[str]) -> None:
    """Several `ip` commands in one process, in netns when given (else in the host's namespace)."""
    await run_command(["ip", *(["-n", netns] if netns else []), "-batch", "-"], "\n".join(commands) + "\n")

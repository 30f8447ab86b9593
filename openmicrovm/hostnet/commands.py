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


class Batched:
    """One command for many callers: lines submitted while a run is under way go together into the
    next run, fed to the command's stdin. Many sandboxes going at once each needed an `nft` and an
    `ip` process of their own, and nft's cost grows with the tables there are: with 200 MicroVMs,
    about 70 ms a call, most of it in the kernel. With `check`, a failed run fails every caller of
    the batch, so a batch's lines should not fail one by one."""

    def __init__(self, argv: list[str], check: bool = True) -> None:
        self.argv = argv
        self.check = check
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, lines: str) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests run several one after another)
            self._loop, self._pending, self._runner = loop, [], None
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((lines, done))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._drain())
        await asyncio.shield(done)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await run_command(self.argv, "".join(lines for lines, _ in batch), self.check)
            except Exception as error:  # HostNetworkError, or a missing binary
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

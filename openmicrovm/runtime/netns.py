"""Network namespaces: creating them, wiring a veth pair, and opening sockets inside them.

A socket belongs to the network namespace of the thread that created it, for its whole life. So
to talk to a sandbox the driver creates the socket in a short-lived thread that first joins the
namespace (setns affects only the calling thread), then hands the socket to the event loop. The
server itself never leaves the host namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import proc

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path_of(name).exists()


def list_names(prefix: str) -> list[str]:
    try:
        return sorted(entry for entry in os.listdir(NETNS_DIR) if entry.startswith(prefix))
    except FileNotFoundError:
        return []


async def create(name: str) -> None:
    """A namespace with only `lo`, up."""
    await proc.run(["ip", "netns", "add", name])
    await _run_batch(name, ["link set lo up"])


async def create_pair(
    sandbox_ns: str, peer_ns: str, sandbox_cidr: str, peer_cidr: str, sandbox_dev: str, peer_dev: str
) -> None:
    """Two namespaces joined by a veth pair and nothing else: the sandbox side sees one link-local
    /30 and no route anywhere, and the peer side holds only the other end."""
    await _run_batch(None, [f"netns add {sandbox_ns}", f"netns add {peer_ns}"])
    await _run_batch(
        peer_ns,
        [
            f"link add {peer_dev} type veth peer name {sandbox_dev} netns {sandbox_ns}",
            f"addr add {peer_cidr} dev {peer_dev}",
            f"link set {peer_dev} up",
            "link set lo up",
        ],
    )
    await _run_batch(
        sandbox_ns,
        [f"addr add {sandbox_cidr} dev {sandbox_dev}", f"link set {sandbox_dev} up", "link set lo up"],
    )


async def ensure_address(name: str, dev: str, cidr: str) -> None:
    """Put cidr back on dev. runsc moves the address into its own netstack when it takes over the
    interface, and a restored sandbox only answers once the address is on the interface again."""
    await proc.run(["ip", "-n", name, "addr", "replace", cidr, "dev", dev])


async def delete(name: str) -> None:
    """Remove a namespace; its interfaces (and the other end of each veth) go with it."""
    if not exists(name):
        return
    result = await proc.run(["ip", "netns", "delete", name], check=False)
    if result.returncode != 0 and exists(name):
        raise proc.DriverError(result.describe())


async def _run_batch(name: str | None, commands: list[str]) -> None:
    argv = ["ip"] + (["-n", name] if name else []) + ["-batch", "-"]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(("\n".join(commands) + "\n").encode())
    if process.returncode != 0:
        raise proc.DriverError(
            f"ip {' '.join(argv[1:])} failed ({'; '.join(commands)}): "
            f"{(err or out).decode(errors='replace').strip()}"
        )


def _in_namespace(name: str, action: Callable[[], T]) -> T:
    """Run action in the calling thread after joining the namespace. Only for throwaway threads."""
    fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into network namespace {name}: {os.strerror(error)}")
    finally:
        os.close(fd)
    return action()


async def call_in_namespace(name: str, action: Callable[[], T]) -> T:
    """Run a short, non-blocking action inside a namespace on a fresh thread that dies afterwards,
    so no pooled thread is ever left in the wrong namespace."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value = _in_namespace(name, action)
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=work, name=f"netns-{name}", daemon=True).start()
    return await future


def _new_tcp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A gVisor sandbox that dies (e.g. at its memory limit) takes its netstack along and answers
    # nothing, not even a reset: without these a connection to it would hang for many minutes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
    return sock


async def connect(name: str, host: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket from inside namespace `name` to host:port. Raises OSError
    (ConnectionRefusedError when nothing listens) or TimeoutError."""
    sock = await call_in_namespace(name, _new_tcp_socket)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock

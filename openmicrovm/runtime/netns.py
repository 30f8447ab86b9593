"""Network namespaces: creating them, wiring a veth pair, and opening sockets inside them.

A socket belongs to the network namespace of the thread that created it, for its whole life. So
to talk to a sandbox the driver creates the socket in a short-lived thread that first joins the
namespace (setns affects only the calling thread), then hands the socket to the event loop. The
server itself never leaves the host namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from openmicrovm.hostnet.commands import ip_batch
from openmicrovm.hostnet.errors import HostNetworkError

from . import proc
from .driver import DriverError

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_MNT_DETACH = 2  # linux/fs.h: unmount now, let users of the mount finish
# rtnetlink, for add_default_route (linux/netlink.h, linux/rtnetlink.h)
_RTM_NEWROUTE = 24
_NLMSG_ERROR = 2
_NLM_F_REQUEST_ACK_CREATE_EXCL = 0x1 | 0x4 | 0x400 | 0x200
_RT_TABLE_MAIN, _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_UNICAST, _RTA_GATEWAY = 254, 4, 0, 1, 5
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


# The metric of the peer namespace's catch-all local route: any real default route comes first.
LOCAL_FALLBACK_METRIC = 4000


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
    await run_batch(name, ["link set lo up"])


async def create_pair(
    sandbox_ns: str, peer_ns: str, sandbox_cidr: str, peer_cidr: str, sandbox_dev: str, peer_dev: str
) -> None:
    """Two namespaces joined by a veth pair: the sandbox side sees one link-local /30 and a default
    route via the peer end (gVisor copies it at `runsc run`, so every snapshot has it), and the peer
    side holds the other end. The peer side takes every address as its own unless a route says
    otherwise (a local default route behind any other), so whatever the sandbox sends out is
    answered at once, by a reset or port unreachable, as if nothing listened there, instead of being
    dropped on the way (an app's DNS lookup would wait for its timeout): only a default route
    through an uplink (egress.py) takes the sandbox further."""
    await run_batch(None, [f"netns add {sandbox_ns}", f"netns add {peer_ns}"])
    await run_batch(
        peer_ns,
        [
            f"link add {peer_dev} type veth peer name {sandbox_dev} netns {sandbox_ns}",
            f"addr add {peer_cidr} dev {peer_dev}",
            f"link set {peer_dev} up",
            "link set lo up",
            f"route add local default dev lo table main metric {LOCAL_FALLBACK_METRIC}",
        ],
    )
    await run_batch(
        sandbox_ns,
        [
            f"addr add {sandbox_cidr} dev {sandbox_dev}",
            f"link set {sandbox_dev} up",
            "link set lo up",
            f"route add default via {peer_cidr.split('/')[0]}",
        ],
    )


def _netlink_default_route(gateway: str) -> None:
    """Add `default via gateway` to the main table of the calling thread's namespace: the request
    `ip route add` would send, without starting a process (this is on a restore's critical path)."""
    rtmsg = struct.pack(
        "=BBBBBBBBI",
        socket.AF_INET,
        0,
        0,
        0,
        _RT_TABLE_MAIN,
        _RTPROT_STATIC,
        _RT_SCOPE_UNIVERSE,
        _RTN_UNICAST,
        0,
    )
    body = rtmsg + struct.pack("=HH", 8, _RTA_GATEWAY) + socket.inet_aton(gateway)
    header = struct.pack("=IHHII", 16 + len(body), _RTM_NEWROUTE, _NLM_F_REQUEST_ACK_CREATE_EXCL, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(header + body)
        reply = sock.recv(4096)
    kind = struct.unpack_from("=H", reply, 4)[0]
    error = -struct.unpack_from("=i", reply, 16)[0] if kind == _NLMSG_ERROR else 0
    if error:
        raise OSError(error, f"adding the default route via {gateway}: {os.strerror(error)}")


async def add_default_route(name: str, gateway: str) -> None:
    await call_in_namespace(name, lambda: _netlink_default_route(gateway))


async def ensure_address(name: str, dev: str, cidr: str, gateway: str) -> None:
    """Put cidr back on dev, and the default route via gateway that went with it. runsc moves the
    address into its own netstack when it takes over the interface, and a restored sandbox only
    answers once the address is on the interface again."""
    await run_batch(name, [f"addr replace {cidr} dev {dev}", f"route replace default via {gateway}"])


async def delete(name: str) -> None:
    """Remove a namespace; its interfaces (and the other end of each veth) go with it. What `ip
    netns delete` does, without starting a process for it (two per sandbox, hundreds at a time
    when many sandboxes go at once)."""
    if exists(name):
        await asyncio.to_thread(_unmount_and_unlink, path_of(name))


def _unmount_and_unlink(path: Path) -> None:
    if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
        error = ctypes.get_errno()
        # EINVAL: not a mount point (left by a crash between creating the file and mounting it).
        if error not in (errno.EINVAL, errno.ENOENT):
            raise DriverError(f"cannot unmount the network namespace {path}: {os.strerror(error)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def run_batch(name: str | None, commands: list[str]) -> None:
    """Several `ip` commands in one process, in namespace `name` (None: the host's)."""
    try:
        await ip_batch(name, commands)
    except HostNetworkError as error:
        raise DriverError(str(error)) from None


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

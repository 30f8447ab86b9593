"""Internet egress for a sandbox: an uplink from its peer namespace to the host.

    [sandbox netns]                 [peer netns]                                       [host]
    eth0 169.254.77.2 <--veth--> veth0 169.254.77.1    up0 10.214.a.b+2/30 <--veth--> omvsXXXXh .b+1/30
    default route via .1           forwards veth0 -> up0 only,                     table inet omvs_XXXX
    (always: it is in the snapshot) masquerades behind up0                         (see build_network)

Every sandbox restored from one snapshot has the same inner address, so the peer namespace
masquerades the sandbox's traffic behind the uplink's own address, unique per sandbox; from there
the host treats it exactly as a build's (builder/build_network.egress_ruleset): nothing addressed to
the host itself (loopback services, any host address) is accepted, link-local 169.254.0.0/16
(cloud metadata), loopback, multicast and reserved space, other sandboxes' uplinks, builds and
the networks of $OPENMICROVM_MICROVM_EGRESS_DENY and $OPENMICROVM_BUILD_EGRESS_DENY are refused,
so is private and shared address space (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) except
the networks the driver is told to allow (the setting egress_allow_networks) and port 53 of the
resolvers the sandbox is given (the host's, read when the uplink is made, as the sandbox's
resolv.conf is), and the rest is masqueraded behind the host's address. Sandboxes have no IPv6:
no address on either veth, and the peer namespace forwards IPv4 only.

Sandboxes outlive the server, and their tables with them: refresh() rewrites an adopted sandbox's
table, so that a restarted server's allowed networks (and these rules) hold for it too.

The switch is the peer namespace's default route through the uplink: an uplink is made without it
(a warm pool sandbox gets its uplink while it waits, before anyone knows whether its MicroVM wants
egress), so the sandbox's traffic meets the peer namespace's catch-all local route and is refused
at once (netns.create_pair); enable() adds the route, one netlink request that costs well under a
millisecond on hand-out.

Addresses: one /30 per uplink from $OPENMICROVM_SANDBOX_SUBNET (default 10.214.0.0/16). Sandboxes
outlive the server, so a /30 is leased by a file, /run/openmicrovm/sandbox-net/XXXX.lease, created
exclusively and naming the peer namespace it serves; the sandbox's record keeps the slot. Leases
are taken and swept under one host-wide flock, so servers sharing the machine never collide. sweep()
removes the uplinks whose peer namespace is gone, and those of one driver scope's sandboxes that
are not kept (cleanup_strays).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from openmicrovm.builder import build_network as shared
from openmicrovm.builder.build_network import BuildNetworkError, IPNetwork

from . import netns
from .driver import DriverError

log = logging.getLogger("openmicrovm.runtime")

DEFAULT_SUBNET = "10.214.0.0/16"
SUBNET_ENV = "OPENMICROVM_SANDBOX_SUBNET"
EGRESS_DENY_ENV = "OPENMICROVM_MICROVM_EGRESS_DENY"
STATE_DIR = Path("/run/openmicrovm/sandbox-net")
LINK_PREFIX = "omvs"
TABLE_PREFIX = "omvs_"
UPLINK_DEV = "up0"  # the uplink's end inside the peer namespace
_LOCK_FILE = ".lock"
_LINK_NAME = re.compile(rf"^{LINK_PREFIX}([0-9a-f]{{4}})h$")
_TABLE_NAME = re.compile(rf"^{TABLE_PREFIX}([0-9a-f]{{4}})$")
_LEASE_NAME = re.compile(r"^([0-9a-f]{4})\.lease$")
_LOCK_POLL_SECONDS = 0.005


def _tag(index: int) -> str:
    return f"{index:04x}"


def host_link(index: int) -> str:
    return f"{LINK_PREFIX}{_tag(index)}h"


def table_name(index: int) -> str:
    return f"{TABLE_PREFIX}{_tag(index)}"


def lease_path(index: int) -> Path:
    return STATE_DIR / f"{_tag(index)}.lease"


def _subnet() -> ipaddress.IPv4Network:
    return shared.configured_subnet(SUBNET_ENV, DEFAULT_SUBNET)


def uplink_subnet(index: int) -> ipaddress.IPv4Network:
    """The /30 of uplink slot `index`: .1 on the host, .2 in the peer namespace."""
    return ipaddress.IPv4Network((int(_subnet().network_address) + 4 * index, 30))


def _denials() -> list[ipaddress.IPv4Network]:
    # The operator's denials for builds hold for MicroVMs too: both reach the same networks.
    networks = shared.configured_denials(EGRESS_DENY_ENV) + shared.configured_denials()
    return list(dict.fromkeys(networks))


async def _command(argv: list[str], stdin: str | None = None, check: bool = True) -> int:
    try:
        code, _ = await shared.run_command(argv, stdin, check)
    except BuildNetworkError as error:
        raise DriverError(f"sandbox egress: {error}") from None
    return code


# ----------------------------------------------------------------------------- leases


@contextlib.asynccontextmanager
async def _host_lock() -> AsyncIterator[None]:
    """The host-wide lock around taking and sweeping leases. Polled without blocking, in the loop's
    thread, so that a cancelled caller can never leave the lock held by a stray thread."""
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(STATE_DIR / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _take_lease(peer_netns: str) -> int:
    """The lowest free slot, leased to peer_netns. Called under _host_lock."""
    subnet = _subnet()
    for index in range(min(subnet.num_addresses // 4, 0x10000)):
        try:
            fd = os.open(lease_path(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(peer_netns + "\n")
        return index
    raise DriverError(f"all sandbox uplink subnets of {subnet} are in use (${SUBNET_ENV})")


def _lease_holder(index: int) -> str | None:
    try:
        return lease_path(index).read_text().strip()
    except OSError:
        return None


# ----------------------------------------------------------------------------- uplinks


def _peer_ruleset() -> str:
    """Inside the peer namespace: only the sandbox's own traffic goes out, and it leaves behind the
    uplink's address; from the uplink only replies come back in."""
    return f"""\
table ip omv_uplink {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        oifname "{UPLINK_DEV}" accept
        iifname "{UPLINK_DEV}" ct state established,related accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{UPLINK_DEV}" masquerade
    }}
}}
"""


def _enable_forwarding() -> None:
    # /proc/sys/net belongs to the network namespace of the thread that opens it.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


async def enable(peer_netns: str, index: int) -> None:
    """Switch a sandbox's egress on: route its traffic through its uplink (slot `index`)."""
    try:
        await netns.add_default_route(peer_netns, str(uplink_subnet(index).network_address + 1))
    except OSError as error:
        raise DriverError(f"cannot switch the egress of {peer_netns} on: {error}") from None


async def _install_table(index: int, allowed: Sequence[IPNetwork]) -> None:
    """Write (or atomically replace: one nft transaction adds, deletes and remakes it) the host's
    table of uplink `index`."""
    table = table_name(index)
    _, resolvers = shared.build_resolv_conf("a MicroVM")
    ruleset = shared.egress_ruleset(
        table, host_link(index), uplink_subnet(index), _denials(), allowed, resolvers
    )
    await _command(["nft", "-f", "-"], f"table inet {table}\ndelete table inet {table}\n{ruleset}")


async def refresh(index: int, allowed: Sequence[IPNetwork]) -> None:
    """Apply the current rules and `allowed` networks to the uplink of an adopted sandbox, whose
    table an earlier server made."""
    if Path("/sys/class/net", host_link(index)).exists():
        await _install_table(index, allowed)


async def _wire(index: int, peer_netns: str, allowed: Sequence[IPNetwork]) -> None:
    slot = uplink_subnet(index)
    host_cidr, peer_cidr = f"{slot.network_address + 1}/30", f"{slot.network_address + 2}/30"
    link = host_link(index)
    await _command(
        ["ip", "-batch", "-"],
        f"link add {link} type veth peer name {UPLINK_DEV} netns {peer_netns}\n"
        f"link set {link} addrgenmode none\naddr add {host_cidr} dev {link}\nlink set {link} up\n",
    )
    await _command(
        ["ip", "-n", peer_netns, "-batch", "-"],
        f"link set {UPLINK_DEV} addrgenmode none\naddr add {peer_cidr} dev {UPLINK_DEV}\n"
        f"link set {UPLINK_DEV} up\n",
    )
    try:  # a new namespace inherits the host's setting, which may be off
        await netns.call_in_namespace(peer_netns, _enable_forwarding)
    except OSError as error:
        raise DriverError(f"cannot enable forwarding in {peer_netns}: {error}") from None
    await _command(["ip", "netns", "exec", peer_netns, "nft", "-f", "-"], _peer_ruleset())
    await _install_table(index, allowed)


_host_prepared = False


async def _prepare_host() -> None:
    """Once per process (the checks start processes, and a cold restore runs beside them): the
    subnet is free, forwarding is on, and a warning if iptables would drop what we forward."""
    global _host_prepared
    if _host_prepared:
        return
    try:
        await shared.check_no_overlap(_subnet(), SUBNET_ENV, _LINK_NAME)
        await shared.warn_if_forwarding_is_filtered(LINK_PREFIX, "MicroVMs")
        await asyncio.to_thread(shared.ensure_forwarding, "MicroVMs")
    except BuildNetworkError as error:
        raise DriverError(f"sandbox egress: {error}") from None
    _host_prepared = True


async def attach(peer_netns: str, on_lease: Callable[[int], None], allowed: Sequence[IPNetwork] = ()) -> int:
    """Give peer_netns (which must exist) an uplink, switched off (see enable()); returns its slot.
    on_lease(slot) runs once the slot is leased, before anything is made, so that the caller can
    record it and remove() finds everything even after a failure half way. allowed: the private
    networks the sandbox may reach (build_network.allowed_networks); none by default."""
    await _prepare_host()
    async with _host_lock():
        index = _take_lease(peer_netns)
    on_lease(index)
    try:
        await _wire(index, peer_netns, allowed)
    except BaseException:
        await remove(index)
        raise
    return index


async def remove(index: int, tables: list[str] | None = None) -> None:
    """Remove an uplink's host end (its peer end goes with it), its table and its lease."""
    if Path("/sys/class/net", host_link(index)).exists():
        await _command(["ip", "link", "delete", host_link(index)], check=False)
    if table_name(index) in (tables if tables is not None else await shared.table_names()):
        await _command(["nft", "delete", "table", "inet", table_name(index)], check=False)
    lease_path(index).unlink(missing_ok=True)


def _found_indexes(tables: list[str]) -> set[int]:
    found: set[int] = set()
    listings: list[tuple[re.Pattern[str], list[str]]] = [(_TABLE_NAME, tables)]
    for pattern, directory in ((_LINK_NAME, "/sys/class/net"), (_LEASE_NAME, str(STATE_DIR))):
        with contextlib.suppress(OSError):
            listings.append((pattern, os.listdir(directory)))
    for pattern, entries in listings:
        found.update(int(m.group(1), 16) for entry in entries if (m := pattern.match(entry)))
    return found


async def sweep(stray: Callable[[str], bool]) -> list[int]:
    """Remove the uplinks nobody holds: without a lease, leased to a peer namespace that is gone,
    or to one for which stray(name) says so. Returns the slots removed."""
    if os.geteuid() != 0:
        return []
    tables = await shared.table_names()
    removed: list[int] = []
    async with _host_lock():
        for index in sorted(_found_indexes(tables)):
            holder = _lease_holder(index)
            if holder and netns.exists(holder) and not stray(holder):
                continue
            await remove(index, tables)
            removed.append(index)
    if removed:
        log.info("removed %d sandbox uplink(s) left behind", len(removed))
    return removed

"""Internet egress for a sandbox: an uplink from its peer namespace to the host.

    [sandbox netns]                 [peer netns]                                       [host]
    eth0 169.254.77.2 <--veth--> veth0 169.254.77.1    up0 10.214.a.b+2/30 <--veth--> omvsXXXXh .b+1/30
    default route via .1           forwards veth0 -> up0 only,                     table inet omvs_XXXX
    (always: it is in the snapshot) masquerades behind up0                         (hostnet/firewall)

Every sandbox restored from one snapshot has the same inner address, so the peer namespace
masquerades the sandbox's traffic behind the uplink's own address, unique per sandbox; from there
the host treats it exactly as a build's (hostnet/firewall.egress_ruleset): nothing addressed to
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

Addresses: one /30 per uplink from the policy's subnet (the setting sandbox_subnet, default
10.214.0.0/16), leased in /run/openmicrovm/sandbox-net by the protocol builds share
(hostnet/slots.py): the lease names the peer namespace it serves, and the sandbox's record keeps
the slot. sweep() removes the uplinks whose peer namespace is gone, and those of one driver scope's
sandboxes that are not kept (cleanup_strays).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path

from openmicrovm.hostnet import host_checks
from openmicrovm.hostnet.addresses import EgressPolicy, slot, slot_count
from openmicrovm.hostnet.commands import Batched, run_command
from openmicrovm.hostnet.dns import resolv_conf
from openmicrovm.hostnet.errors import HostNetworkError
from openmicrovm.hostnet.firewall import egress_ruleset, table_names
from openmicrovm.hostnet.slots import LeaseTable, SlotNames

from . import netns
from .driver import DriverError

log = logging.getLogger("openmicrovm.runtime")

STATE_DIR = Path("/run/openmicrovm/sandbox-net")
NAMES = SlotNames(link_prefix="omvs", table_prefix="omvs_")
LINK_PREFIX = NAMES.link_prefix
UPLINK_DEV = "up0"  # the uplink's end inside the peer namespace
LEASES = LeaseTable(STATE_DIR)


def host_link(index: int) -> str:
    return NAMES.link(index)


def table_name(index: int) -> str:
    return NAMES.table(index)


def lease_path(index: int) -> Path:
    return LEASES.path(index)


def uplink_subnet(index: int, policy: EgressPolicy) -> ipaddress.IPv4Network:
    """The /30 of uplink slot `index`: .1 on the host, .2 in the peer namespace."""
    return slot(policy.subnet, index)


async def _command(argv: list[str], stdin: str | None = None, check: bool = True) -> int:
    try:
        code, _ = await run_command(argv, stdin, check)
    except HostNetworkError as error:
        raise DriverError(f"sandbox egress: {error}") from None
    return code


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


async def enable(peer_netns: str, index: int, policy: EgressPolicy) -> None:
    """Switch a sandbox's egress on: route its traffic through its uplink (slot `index`)."""
    try:
        await netns.add_default_route(peer_netns, str(uplink_subnet(index, policy).network_address + 1))
    except OSError as error:
        raise DriverError(f"cannot switch the egress of {peer_netns} on: {error}") from None


async def _install_table(index: int, policy: EgressPolicy) -> None:
    """Write (or atomically replace: one nft transaction adds, deletes and remakes it) the host's
    table of uplink `index`."""
    table = table_name(index)
    _, resolvers = resolv_conf("a MicroVM")
    ruleset = egress_ruleset(
        table, host_link(index), uplink_subnet(index, policy), policy.denied, policy.allowed, resolvers
    )
    await _command(["nft", "-f", "-"], f"table inet {table}\ndelete table inet {table}\n{ruleset}")


async def refresh(index: int, policy: EgressPolicy) -> None:
    """Apply the current rules and the policy's networks to the uplink of an adopted sandbox, whose
    table an earlier server made."""
    if Path("/sys/class/net", host_link(index)).exists():
        await _install_table(index, policy)


async def _wire(index: int, peer_netns: str, policy: EgressPolicy) -> None:
    slot = uplink_subnet(index, policy)
    host_cidr, peer_cidr = f"{slot.network_address + 1}/30", f"{slot.network_address + 2}/30"
    link = host_link(index)
    await netns.run_batch(
        None,
        [
            f"link add {link} type veth peer name {UPLINK_DEV} netns {peer_netns}",
            f"link set {link} addrgenmode none",
            f"addr add {host_cidr} dev {link}",
            f"link set {link} up",
        ],
    )
    await netns.run_batch(
        peer_netns,
        [
            f"link set {UPLINK_DEV} addrgenmode none",
            f"addr add {peer_cidr} dev {UPLINK_DEV}",
            f"link set {UPLINK_DEV} up",
        ],
    )
    try:  # a new namespace inherits the host's setting, which may be off
        await netns.call_in_namespace(peer_netns, _enable_forwarding)
    except OSError as error:
        raise DriverError(f"cannot enable forwarding in {peer_netns}: {error}") from None
    await _command(["ip", "netns", "exec", peer_netns, "nft", "-f", "-"], _peer_ruleset())
    await _install_table(index, policy)


_host_prepared: set[ipaddress.IPv4Network] = set()  # subnets checked


async def _prepare_host(subnet: ipaddress.IPv4Network) -> None:
    """Once per process and subnet (the checks start processes, and a cold restore runs beside
    them): the subnet is free, forwarding is on, and a warning if iptables would drop what we
    forward."""
    if subnet in _host_prepared:
        return
    try:
        await host_checks.check_no_overlap(subnet, "sandbox_subnet", NAMES.link_pattern)
        await host_checks.warn_if_forwarding_is_filtered(LINK_PREFIX, "MicroVMs")
        await asyncio.to_thread(host_checks.ensure_forwarding, "MicroVMs")
    except HostNetworkError as error:
        raise DriverError(f"sandbox egress: {error}") from None
    _host_prepared.add(subnet)


async def attach(peer_netns: str, on_lease: Callable[[int], None], policy: EgressPolicy) -> int:
    """Give peer_netns (which must exist) an uplink, switched off (see enable()); returns its slot.
    on_lease(slot) runs once the slot is leased, before anything is made, so that the caller can
    record it and remove() finds everything even after a failure half way. policy: its addresses,
    and what it may reach."""
    await _prepare_host(policy.subnet)
    async with LEASES.locked():
        index = LEASES.take(peer_netns, slot_count(policy.subnet))
    if index is None:
        raise DriverError(
            f"all sandbox uplink subnets of {policy.subnet} are in use (the setting sandbox_subnet)"
        )
    on_lease(index)
    try:
        await _wire(index, peer_netns, policy)
    except BaseException:
        await remove(index)
        raise
    return index


# Uplinks removed by many sandboxes at once go in one process per tool. As before batching, what
# fails here is not an error (a link or table already gone); the sweep finds anything left.
# `ip -force` goes on past a failed line; adding a table first makes deleting it succeed whether
# it was there or not (nft 1.0.6 has no `destroy`), so one missing table fails no batch.
_LINK_DELETES = Batched(["ip", "-force", "-batch", "-"], check=False)
_TABLE_DELETES = Batched(["nft", "-f", "-"], check=False)


async def remove(index: int, tables: list[str] | None = None) -> None:
    """Remove an uplink's host end (its peer end goes with it), its table and its lease."""
    try:
        if Path("/sys/class/net", host_link(index)).exists():
            await _LINK_DELETES.submit(f"link delete {host_link(index)}\n")
        if tables is None or table_name(index) in tables:
            table = table_name(index)
            await _TABLE_DELETES.submit(f"add table inet {table}\ndelete table inet {table}\n")
    except HostNetworkError as error:
        raise DriverError(f"sandbox egress: {error}") from None
    LEASES.release(index)


async def sweep(stray: Callable[[str], bool]) -> list[int]:
    """Remove the uplinks nobody holds: without a lease, leased to a peer namespace that is gone,
    or to one for which stray(name) says so. Returns the slots removed."""
    if os.geteuid() != 0:
        return []
    tables = await table_names()

    def alive(holder: str) -> bool:
        return netns.exists(holder) and not stray(holder)

    async def remove_objects(index: int) -> None:
        await remove(index, tables)

    removed = await LEASES.sweep(NAMES.present(tables), alive, remove_objects)
    if removed:
        log.info("removed %d sandbox uplink(s) left behind", len(removed))
    return removed

"""The network a build runs in: its own namespace with egress to the outside world only.

Every `buildah bud` runs in a network namespace of its own (see isolation.py for the rest of its
containment), wired to the host like this:

    [build netns omvb-XXXX]  eth0 10.213.a.b+2/30  <--veth-->  omvbXXXXh 10.213.a.b+1/30  [host]
    default route via the host end                             NAT (masquerade) to the world

and an nftables table `inet omvb_XXXX` of its own (hostnet/firewall.py: nothing of the host, of
link-local or private space, of other builds or sandboxes; the rest of the world, masqueraded),
with the host's resolvers in its resolv.conf (hostnet/dns.py). Inside, 127.0.0.1 is the
namespace's own loopback: `ADD http://127.0.0.1:<port>/` and a RUN step's `curl localhost` never
reach the host.

Addresses: one /30 per build from the setting build_subnet (default 10.213.0.0/16, 16384 builds
at once; the lowest free one is taken; a subnet overlapping a route of the host is refused),
leased in /run/openmicrovm/build-net by the protocol MicroVM uplinks share (hostnet/slots.py),
in the name of the server process running the build, and released after it. So several servers
on one machine never collide, and a lease tells a live build from one a crashed server left
behind: cleanup_build_networks() removes every omvb-* namespace, omvb*h veth, omvb_* table and
resolver file whose lease is gone or names a process that is, and is safe to call at any time
(it also runs before each build).

Needs root, iproute2 and nftables (the `nft` command), and IPv4 forwarding: it is switched on when
off (as Docker and Podman do), since builds may need egress.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openmicrovm.builder.cleanup import run_to_completion
from openmicrovm.config import Settings
from openmicrovm.hostnet import policies, slots
from openmicrovm.hostnet.addresses import EgressPolicy, slot, slot_count
from openmicrovm.hostnet.commands import ip_batch, run_command
from openmicrovm.hostnet.dns import resolv_conf
from openmicrovm.hostnet.errors import HostNetworkError
from openmicrovm.hostnet.firewall import egress_ruleset, table_names
from openmicrovm.hostnet.host_checks import (
    check_no_overlap,
    ensure_forwarding,
    warn_if_forwarding_is_filtered,
)
from openmicrovm.hostnet.slots import LeaseTable, SlotNames, process_alive, tag, this_process

logger = logging.getLogger(__name__)

STATE_DIR = Path("/run/openmicrovm/build-net")
# The runtime's sandboxes use omv-<scope>-... and uplinks omvs...: no overlap.
NAMES = SlotNames(link_prefix="omvb", table_prefix="omvb_", netns_prefix="omvb-")
NETNS_PREFIX = NAMES.netns_prefix
LEASES = LeaseTable(STATE_DIR)
_STATE_FILE = re.compile(r"^([0-9a-f]{4})\.(?:resolv\.conf|lock)$")


@dataclass(frozen=True)
class _Names:
    """The host objects of one build slot."""

    index: int

    @property
    def netns(self) -> str:
        return NAMES.netns(self.index)

    @property
    def host_link(self) -> str:
        return NAMES.link(self.index)

    @property
    def table(self) -> str:
        return NAMES.table(self.index)

    @property
    def lease_path(self) -> Path:
        return LEASES.path(self.index)

    @property
    def resolv_conf(self) -> Path:
        return STATE_DIR / f"{tag(self.index)}.resolv.conf"


@dataclass(frozen=True)
class BuildNetwork:
    """A build's network namespace, alive until close()."""

    names: _Names
    subnet: ipaddress.IPv4Network  # the build's /30
    nameservers: tuple[str, ...]

    @property
    def netns_path(self) -> Path:
        return slots.NETNS_DIR / self.names.netns

    @property
    def resolv_conf(self) -> Path:
        return self.names.resolv_conf

    @property
    def build_address(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    async def close(self) -> None:
        """Remove the namespace, veth, nftables table and resolver file, then free the /30."""
        try:
            await _remove_objects(self.names)
        finally:
            LEASES.release(self.names.index)


# ----------------------------------------------------------------------------- cleanup


async def _remove_objects(names: _Names, tables: list[str] | None = None) -> None:
    """Remove what exists of a slot's objects; quiet about what does not."""
    # Deleting the host end removes the pair; the namespace goes when its last process does.
    if Path("/sys/class/net", names.host_link).exists():
        await run_command(["ip", "link", "delete", names.host_link], check=False)
    if (slots.NETNS_DIR / names.netns).exists():
        await run_command(["ip", "netns", "delete", names.netns], check=False)
    if names.table in (tables if tables is not None else await table_names()):
        await run_command(["nft", "delete", "table", "inet", names.table], check=False)
    names.resolv_conf.unlink(missing_ok=True)
    (STATE_DIR / f"{tag(names.index)}.lock").unlink(missing_ok=True)  # a flock file of older releases


async def cleanup_build_networks() -> list[str]:
    """Remove the build networks (namespace, veth, nftables table, resolver file, lease) that no
    running build holds: what a crashed or killed server left behind. Safe at any time, also while
    builds of this or another server run (their leases name live processes). Returns the
    namespaces removed. Failures are logged, not raised: call it at server start."""
    if os.geteuid() != 0:
        return []  # nothing of ours can exist: creating it needs root
    tables = await table_names()

    async def remove(index: int) -> None:
        try:
            await _remove_objects(_Names(index), tables)
        except (HostNetworkError, OSError):
            logger.exception("could not remove the leftover build network %s", NAMES.netns(index))

    present = NAMES.present(tables) | _state_files()
    removed = [NAMES.netns(index) for index in await LEASES.sweep(present, process_alive, remove)]
    if removed:
        logger.info("removed %d build network(s) left behind: %s", len(removed), ", ".join(removed))
    return removed


def _state_files() -> set[int]:
    """Slots with a resolver file (or a flock file of releases before leases) in the state dir."""
    try:
        entries = os.listdir(STATE_DIR)
    except OSError:
        return set()
    return {int(m.group(1), 16) for entry in entries if (m := _STATE_FILE.match(entry))}


# ----------------------------------------------------------------------------- setup


async def _create(
    names: _Names,
    subnet: ipaddress.IPv4Network,
    policy: EgressPolicy,
    resolvers: Sequence[str],
) -> None:
    host = f"{subnet.network_address + 1}/30"
    build = f"{subnet.network_address + 2}/30"
    await ip_batch(
        None,
        [
            f"netns add {names.netns}",
            f"link add {names.host_link} type veth peer name eth0 netns {names.netns}",
            # No IPv6 link-local addresses: the build has IPv4 only (and resolvers skip AAAA).
            f"link set {names.host_link} addrgenmode none",
            f"addr add {host} dev {names.host_link}",
            f"link set {names.host_link} up",
        ],
    )
    await ip_batch(
        names.netns,
        [
            "link set lo up",
            "link set eth0 addrgenmode none",
            f"addr add {build} dev eth0",
            "link set eth0 up",
            f"route add default via {subnet.network_address + 1}",
        ],
    )
    ruleset = egress_ruleset(names.table, names.host_link, subnet, policy.denied, policy.allowed, resolvers)
    await run_command(["nft", "-f", "-"], ruleset)


async def open_build_network(policy: EgressPolicy | None = None) -> BuildNetwork:
    """A fresh build network; close() it when the build is over (also on failure/cancellation).
    policy: where its /30 comes from and what it may reach (hostnet/policies.for_builds; None: the
    settings' defaults, no private network opened)."""
    policy = policy or policies.for_builds(Settings())
    if os.geteuid() != 0:
        raise HostNetworkError("image builds run in a network namespace of their own, which needs root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise HostNetworkError(
                f"`{tool}` is not installed on this server (Debian: apt-get install {package})"
            )
    subnet = policy.subnet
    await check_no_overlap(subnet, policy.subnet_setting, NAMES.link_pattern)
    await warn_if_forwarding_is_filtered(NAMES.link_prefix, "image builds")
    await asyncio.to_thread(ensure_forwarding, "image builds")
    await cleanup_build_networks()
    async with LEASES.locked():
        index = LEASES.take(this_process(), slot_count(subnet))  # the lowest free: few addresses
    if index is None:
        raise HostNetworkError(f"all {slot_count(subnet)} build subnets of {subnet} are in use")
    names = _Names(index)
    try:
        await _remove_objects(names)  # a crash between a sweep and a lease may have left some
        text, servers = resolv_conf("an image build")
        names.resolv_conf.write_text(text)
        await _create(names, slot(subnet, index), policy, servers)
    except BaseException:
        try:
            await run_to_completion(_remove_objects(names))
        finally:
            LEASES.release(index)
        raise
    return BuildNetwork(names, slot(subnet, index), servers)

"""A sandbox's network: its own namespace, a peer namespace, and an uplink when it has egress.

    [sandbox netns]  eth0 169.254.77.2/30  <--veth-->  veth0 169.254.77.1/30  [peer netns]
    gVisor's netstack takes eth0 over            the driver opens its sockets here

runsc needs all of this to checkpoint a networked sandbox. Every sandbox restored from one image
has the same inner address (the snapshot carries gVisor's network configuration), so each sandbox
gets its own small peer namespace holding the other end of its veth pair, and the driver reaches a
sandbox by creating its socket inside that peer namespace. The sandbox's default route leads to the
peer namespace, and no further unless the sandbox has internet egress (SandboxSpec.egress): then
the peer namespace has an uplink to the host that forwards and masquerades the sandbox's traffic,
and the host lets it out to the world, never to itself (loopback or otherwise), link-local
addresses, other sandboxes or denied networks (runtime/egress.py). A sandbox restored ahead of
time for the warm pool gets its uplink switched off while it waits; hand-out switches it on when
the MicroVM asks for egress.

The app's 127.0.0.1 is gVisor's own loopback, out of reach of any host socket, so connections to
app ports are relayed by the guest agent (agent/agent.c), which runs as the sandbox's init and
listens on SANDBOX_IP:AGENT_PORT.

runsc (2022 and 2024) takes the address off eth0 when netstack takes the interface over, and a
restore answers only when the address is on eth0 before it starts (ensure_address).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from openmicrovm.hostnet.addresses import EgressPolicy

from .. import egress, names, netns
from ..agent_client import AGENT_PORT, AgentAddress
from ..driver import DriverError
from .records import GVisorRecord

log = logging.getLogger("openmicrovm.runtime")

SANDBOX_IP = "169.254.77.2"
SANDBOX_CIDR = f"{SANDBOX_IP}/30"
PEER_IP = "169.254.77.1"
PEER_CIDR = f"{PEER_IP}/30"
SANDBOX_DEV = "eth0"
PEER_DEV = "veth0"


def namespaces(host: names.HostNames) -> list[str]:
    return [host.netns, host.peer_netns]


async def create(host: names.HostNames) -> None:
    """The sandbox's namespace and its peer, joined by a veth pair."""
    await netns.create_pair(host.netns, host.peer_netns, SANDBOX_CIDR, PEER_CIDR, SANDBOX_DEV, PEER_DEV)


async def ensure_address(host: names.HostNames) -> None:
    """Before a restore from disk: eth0 has its address again (see the module docstring)."""
    await netns.ensure_address(host.netns, SANDBOX_DEV, SANDBOX_CIDR, PEER_IP)


def agent_address(host: names.HostNames, token: str) -> AgentAddress:
    """The guest agent, reached from the sandbox's peer namespace."""

    async def open_socket() -> socket.socket:
        return await netns.connect(host.peer_netns, SANDBOX_IP, AGENT_PORT, timeout=5.0)

    return AgentAddress(open_socket, token)


class Uplinks:
    """The egress uplinks of the driver's sandboxes, under one policy."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    async def attach(
        self, host: names.HostNames, record: GVisorRecord, save: Callable[[], None], *, enabled: bool
    ) -> None:
        """An uplink for the sandbox's peer namespace, its slot saved in the record as soon as it is
        leased (so that a crash leaves nothing unaccounted), switched on when enabled."""

        def leased(index: int) -> None:
            record.uplink = index
            save()

        index = await egress.attach(host.peer_netns, leased, self.policy)
        if enabled:
            await egress.enable(host.peer_netns, index, self.policy)

    async def enable(self, host: names.HostNames, record: GVisorRecord) -> None:
        await egress.enable(host.peer_netns, record.uplink, self.policy)

    async def remove(self, record: GVisorRecord) -> None:
        if record.uplink >= 0:
            await egress.remove(record.uplink)

    async def bring_up_to_date(self, sandbox_id: str, record: GVisorRecord, save: Callable[[], None]) -> None:
        """An adopted sandbox's uplink keeps the table an earlier server wrote: rewrite it, so that
        this server's allowed networks (and firewall rules) hold for it as for new sandboxes."""
        if record.uplink < 0:
            return
        try:
            await egress.refresh(record.uplink, self.policy)
        except DriverError as error:
            # Fail closed: a sandbox whose rules cannot be brought up to date keeps no egress.
            log.error("sandbox %s: %s; its egress is cut", sandbox_id, error)
            await egress.remove(record.uplink)
            record.uplink = -1
            save()

    @staticmethod
    async def sweep(stray: Callable[[str], bool]) -> None:
        """Remove the uplinks of peer namespaces that stray() names (sandboxes that are gone)."""
        await egress.sweep(stray)

"""The devcluster's network: a bridge on the host holding the cluster's first address, and per
agent a network namespace joined to the bridge by a veth pair.

Agents then reach PostgreSQL and S3 at the bridge address, replicas (on the host) reach agents at
their namespace addresses, and a test cuts an agent off by taking its veth's host end down. Every
name carries the cluster's id, so that `down` finds what a killed `up` left even where cluster.json
missed it, and two clusters never touch each other's links.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openmicrovm.devcluster.progress import DevclusterError

# The /24s a cluster picks from when not given one; 10.213/16 and 10.214/16 are openmicrovm's own
# build and sandbox networks, so keep well apart from them.
SUBNET_POOL = ipaddress.IPv4Network("10.251.0.0/16")
NETNS_DIR = Path("/run/netns")
# Held while a subnet is chosen and claimed, so that two `up`s at once never pick the same one.
_CLAIM_LOCK = Path("/run/lock/openmicrovm-devcluster.lock")
# Agents' addresses are .11, .12, ...: .1 is the bridge's.
_FIRST_AGENT_HOST = 11


@dataclass(frozen=True)
class Naming:
    """The names of one cluster's bridge, links and namespaces (link names fit Linux's 15 bytes)."""

    cluster_id: str  # 6 hex digits

    @property
    def link_prefix(self) -> str:
        return f"omvdc{self.cluster_id}"

    @property
    def netns_prefix(self) -> str:
        return f"omvdc-{self.cluster_id}-"

    @property
    def bridge(self) -> str:
        return self.link_prefix

    @property
    def bridge_mac(self) -> str:
        """A fixed, locally administered address. Left to itself, a bridge takes the lowest of its
        ports' addresses, so removing one agent's veth would change it under the other agents'
        ARP caches and cut them off from the bridge address for half a minute."""
        octets = [self.cluster_id[i : i + 2] for i in range(0, 6, 2)]
        return ":".join(["02", "6f", "6d", *octets])

    def host_link(self, index: int) -> str:
        return f"{self.link_prefix}a{index}"

    def netns(self, index: int) -> str:
        return f"{self.netns_prefix}agent{index}"


@dataclass(frozen=True)
class AgentNetwork:
    netns: str
    link: str  # the veth's host end, on the bridge: down cuts the agent off
    peer_link: str  # its end inside the namespace
    address: str


def run_ip(*arguments: str, namespace: str | None = None) -> str:
    command = ["ip", *(["-n", namespace] if namespace else []), *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise DevclusterError("`ip` is not installed", "install it: apt-get install iproute2") from None
    if done.returncode != 0:
        raise DevclusterError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def check_tools() -> None:
    if os.geteuid() != 0:
        raise DevclusterError(
            "the devcluster makes network namespaces and links, and runs PostgreSQL as its own account",
            "run it as root",
        )
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux")):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise DevclusterError(f"`{tool}` is not installed", f"install it: apt-get install {package}")


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this host has an address in or a route to (all routing tables)."""
    networks = []
    for entry in json.loads(run_ip("-j", "-4", "addr", "show") or "[]"):
        for info in entry.get("addr_info", []):
            networks.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(run_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        destination = route.get("dst", "default")
        if destination != "default":
            networks.append(ipaddress.IPv4Network(destination, strict=False))
    return networks


def _free_subnets(requested: ipaddress.IPv4Network | None) -> Iterator[ipaddress.IPv4Network]:
    in_use = _networks_in_use()
    if requested is not None:
        clash = next((network for network in in_use if network.overlaps(requested)), None)
        if clash is not None:
            raise DevclusterError(
                f"subnet {requested} overlaps {clash}, already on this host", "choose another --subnet"
            )
        yield requested
        return
    # A random order: tools that do not take the lock (tests of other parts) are then unlikely to
    # race us for the same /24.
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    random.shuffle(candidates)
    for candidate in candidates:
        if not any(network.overlaps(candidate) for network in in_use):
            yield candidate


def bridge_address(subnet: ipaddress.IPv4Network) -> str:
    return str(subnet.network_address + 1)


def agent_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    host = _FIRST_AGENT_HOST + index - 1
    if host >= subnet.num_addresses - 1:
        raise DevclusterError(f"subnet {subnet} has no room for agent {index}", "give fewer --hosts")
    return str(subnet.network_address + host)


def create_bridge(naming: Naming, requested: ipaddress.IPv4Network | None = None) -> ipaddress.IPv4Network:
    """Create the cluster's bridge holding the first address of a /24 nothing else on this host
    uses; returns that subnet."""
    _CLAIM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(_CLAIM_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subnet = next(_free_subnets(requested), None)
        if subnet is None:
            raise DevclusterError(f"every /24 of {SUBNET_POOL} is in use on this host", "give a --subnet")
        run_ip("link", "add", naming.bridge, "address", naming.bridge_mac, "type", "bridge")
        try:
            run_ip("addr", "add", f"{bridge_address(subnet)}/{subnet.prefixlen}", "dev", naming.bridge)
            run_ip("link", "set", naming.bridge, "up")
        except DevclusterError:
            delete_link(naming.bridge)
            raise
    return subnet


def add_agent_namespace(naming: Naming, index: int, subnet: ipaddress.IPv4Network) -> AgentNetwork:
    """A namespace for agent `index`, on the bridge at its own address, its loopback up."""
    network = AgentNetwork(naming.netns(index), naming.host_link(index), "eth0", agent_address(subnet, index))
    run_ip("netns", "add", network.netns)
    try:
        run_ip(
            "link",
            "add",
            network.link,
            "type",
            "veth",
            "peer",
            "name",
            network.peer_link,
            "netns",
            network.netns,
        )
        run_ip("link", "set", network.link, "master", naming.bridge, "up")
        run_ip(
            "addr",
            "add",
            f"{network.address}/{subnet.prefixlen}",
            "dev",
            network.peer_link,
            namespace=network.netns,
        )
        run_ip("link", "set", network.peer_link, "up", namespace=network.netns)
        run_ip("link", "set", "lo", "up", namespace=network.netns)
    except DevclusterError:
        remove_agent_namespace(network)
        raise
    return network


def enter_command(netns: str) -> list[str]:
    """The prefix that runs a command in the namespace. nsenter changes the network namespace only:
    `ip netns exec` would also remount /sys, and the agent would lose /sys/fs/cgroup with it."""
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--"]


def processes_in(netns: str) -> list[int]:
    """The pids of the processes whose network namespace is `netns`."""
    try:
        target = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = os.stat(entry / "ns" / "net")
            if (status.st_dev, status.st_ino) == (target.st_dev, target.st_ino):
                pids.append(int(entry.name))
    return pids


def remove_agent_namespace(network: AgentNetwork) -> None:
    remove_namespace(network.netns)
    delete_link(network.link)


def remove_namespace(netns: str) -> None:
    """Kill what still runs in the namespace (else it outlives its name), then delete it."""
    for pid in processes_in(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if (NETNS_DIR / netns).exists():
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)


def delete_link(name: str) -> None:
    """Delete a link if it exists (a veth's peer goes with it)."""
    subprocess.run(["ip", "link", "delete", name], capture_output=True, timeout=30)


def leftovers(naming: Naming) -> tuple[list[str], list[str]]:
    """The cluster's namespaces and links that still exist."""
    namespaces = sorted(path.name for path in NETNS_DIR.glob(f"{naming.netns_prefix}*"))
    links = [
        entry["ifname"]
        for entry in json.loads(run_ip("-j", "link", "show") or "[]")
        if entry["ifname"].startswith(naming.link_prefix)
    ]
    return namespaces, sorted(links)


def sweep(naming: Naming) -> None:
    """Remove every namespace and link of the cluster, whatever recorded them; host ends first,
    then the bridge."""
    namespaces, links = leftovers(naming)
    for netns in namespaces:
        remove_namespace(netns)
    for link in sorted(links, key=lambda name: name == naming.bridge):
        delete_link(link)

"""The devcluster's network: a bridge, a namespace per agent on it, and nothing left after."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from openmicrovm.devcluster import network
from openmicrovm.devcluster.progress import DevclusterError
from tests.devcluster.conftest import run_in_namespace


def namespace_names() -> set[str]:
    return {
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.splitlines()
    }


def link_names() -> set[str]:
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout)
    return {link["ifname"] for link in links}


@pytest.fixture
def listener_factory() -> Iterator[Callable[[str], int]]:
    """TCP listeners on given addresses that answer each connection with `hello` and close it."""
    sockets: list[socket.socket] = []

    def listen(address: str) -> int:
        server = socket.create_server((address, 0))
        sockets.append(server)

        def serve() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    connection.sendall(b"hello")

        threading.Thread(target=serve, daemon=True).start()
        return server.getsockname()[1]

    yield listen
    for server in sockets:
        server.close()


CONNECT = """
import socket
with socket.create_connection(({host!r}, {port}), timeout=3) as connection:
    print(connection.recv(5).decode())
"""


def test_namespaces_reach_the_bridge_address_and_leave_nothing_behind(
    naming: network.Naming, listener_factory: Callable[[str], int]
) -> None:
    subnet = network.create_bridge(naming)
    gateway = network.bridge_address(subnet)
    agents = [network.add_agent_namespace(naming, index, subnet) for index in (1, 2)]

    assert {agent.netns for agent in agents} <= namespace_names()
    assert {naming.bridge, *(agent.link for agent in agents)} <= link_names()
    assert [agent.address for agent in agents] == [
        network.agent_address(subnet, 1),
        network.agent_address(subnet, 2),
    ]
    port = listener_factory(gateway)
    for agent in agents:
        # The agent's side: its address, and the host's services at the bridge address.
        addresses = json.loads(network.run_ip("-j", "addr", "show", "eth0", namespace=agent.netns))
        assert addresses[0]["addr_info"][0]["local"] == agent.address
        reached = run_in_namespace(agent.netns, CONNECT.format(host=gateway, port=port))
        assert reached.stdout.strip() == "hello", reached.stderr

    # A process still running inside a namespace would keep it alive past its name: removal kills it.
    sleeper = subprocess.Popen([*network.enter_command(agents[0].netns), "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while sleeper.pid not in network.processes_in(agents[0].netns):
            assert time.monotonic() < deadline, "the sleeper never entered the namespace"
            time.sleep(0.02)
        for agent in agents:
            network.remove_agent_namespace(agent)
        assert sleeper.wait(10) is not None
    finally:
        sleeper.kill()
    network.delete_link(naming.bridge)

    assert network.leftovers(naming) == ([], [])
    assert not {agent.netns for agent in agents} & namespace_names()
    assert not {link for link in link_names() if link.startswith(naming.link_prefix)}


def test_removing_one_agent_leaves_the_others_connected(
    naming: network.Naming, listener_factory: Callable[[str], int]
) -> None:
    """As a teardown goes: one agent's namespace and veth go first, the other still reaches the host
    at once (the bridge keeps its MAC address, so the other's ARP cache stays right)."""
    subnet = network.create_bridge(naming)
    gateway = network.bridge_address(subnet)
    agents = [network.add_agent_namespace(naming, index, subnet) for index in (1, 2)]
    port = listener_factory(gateway)
    for agent in agents:
        reached = run_in_namespace(agent.netns, CONNECT.format(host=gateway, port=port))
        assert reached.stdout.strip() == "hello", reached.stderr

    # The one whose veth has the lowest address: a bridge left to choose its own would have taken it.
    def host_end_address(agent: network.AgentNetwork) -> str:
        return json.loads(network.run_ip("-j", "link", "show", agent.link))[0]["address"]

    leaving = min(agents, key=host_end_address)
    staying = next(agent for agent in agents if agent != leaving)

    network.remove_agent_namespace(leaving)

    reached = run_in_namespace(staying.netns, CONNECT.format(host=gateway, port=port))
    assert reached.stdout.strip() == "hello", reached.stderr


def test_taking_the_host_end_down_cuts_an_agent_off(
    naming: network.Naming, listener_factory: Callable[[str], int]
) -> None:
    """What a test of a lost host does: `ip link set <agents[i].link> down` (cluster.json)."""
    subnet = network.create_bridge(naming)
    gateway = network.bridge_address(subnet)
    agent = network.add_agent_namespace(naming, 1, subnet)
    port = listener_factory(gateway)

    network.run_ip("link", "set", agent.link, "down")
    cut = run_in_namespace(agent.netns, CONNECT.format(host=gateway, port=port))
    assert cut.returncode != 0 and "hello" not in cut.stdout

    network.run_ip("link", "set", agent.link, "up")
    # Back within seconds: an address resolution that failed while the link was down may answer
    # "no route to host" to the first attempts after.
    deadline = time.monotonic() + 15
    while (back := run_in_namespace(agent.netns, CONNECT.format(host=gateway, port=port))).returncode != 0:
        assert time.monotonic() < deadline, back.stderr
        time.sleep(0.5)
    assert back.stdout.strip() == "hello"


def test_sweep_removes_whatever_a_killed_cluster_left(naming: network.Naming) -> None:
    subnet = network.create_bridge(naming)
    for index in (1, 2, 3):
        network.add_agent_namespace(naming, index, subnet)
    namespaces, links = network.leftovers(naming)
    assert len(namespaces) == 3 and len(links) == 4

    network.sweep(naming)

    assert network.leftovers(naming) == ([], [])


def test_two_clusters_get_different_subnets(naming: network.Naming) -> None:
    other = network.Naming(f"{int(naming.cluster_id, 16) ^ 1:06x}")
    try:
        first = network.create_bridge(naming)
        second = network.create_bridge(other)
        assert not first.overlaps(second)
        with pytest.raises(DevclusterError, match="overlaps"):
            network.create_bridge(network.Naming("000000"), requested=first)
    finally:
        network.sweep(other)

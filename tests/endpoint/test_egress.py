"""Internet egress through the real server: RunMicrovm's egressNetworkConnectors decide whether the
app can connect out (to a stand-in internet, tests/builder/fake_internet.py), and egress never
reaches the server, a host address or cloud metadata. Probes run in the MicroVM's shell."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from typing import Any

import aiohttp

from tests.builder.fake_internet import fake_internet
from tests.endpoint.conftest import HTTP, SHELL, run_microvm
from tests.reliability.invariants import HostView
from tests.support.images import wait_microvm
from tests.support.server import ServerProcess

EGRESS = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"


def shell_probe(server: ServerProcess, vm: dict[str, Any], targets: list[str]) -> dict[str, str]:
    """From inside the MicroVM (its shell), try a TCP connection to each host:port."""
    client = server.client()
    token = client.create_microvm_shell_auth_token(microvmIdentifier=vm["microvmId"], expirationInMinutes=5)
    secret = token["authToken"]["X-aws-proxy-auth"]
    script = (
        "import json, socket, sys\n"
        "results = {}\n"
        f"for target in {targets!r}:\n"
        "    host, port = target.rsplit(':', 1)\n"
        "    try:\n"
        "        socket.create_connection((host, int(port)), timeout=3).close(); results[target] = 'connected'\n"
        "    except OSError as error:\n"
        "        results[target] = type(error).__name__\n"
        "print('PROBE', json.dumps(results))\n"
    )
    encoded = base64.b64encode(script.encode()).decode()

    async def session() -> str:
        output = b""
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"{server.url}/shell",
                headers={"Host": vm["endpoint"]},
                protocols=("lambda-microvms", f"lambda-microvms.authentication.{secret}"),
            ) as ws,
        ):
            await ws.receive()  # session_init
            await ws.send_bytes(f'python3 -c "$(echo {encoded} | base64 -d)"; exit\n'.encode())
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    output += message.data
        return output.decode(errors="replace")

    output = asyncio.run(asyncio.wait_for(session(), 60))
    lines = [line.split("PROBE ", 1)[1] for line in output.splitlines() if "PROBE {" in line]
    assert lines, output
    return dict(json.loads(lines[-1]))


def test_internet_egress_follows_the_connectors(endpoint_server: ServerProcess, echo_image: str) -> None:
    client = endpoint_server.client()
    with fake_internet() as internet:
        outside = f"{internet.address}:{internet.silent_port()}"
        opened = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=[HTTP, SHELL])
        closed = run_microvm(
            endpoint_server, echo_image, ingressNetworkConnectors=[HTTP, SHELL], egressNetworkConnectors=[]
        )
        explicit = run_microvm(
            endpoint_server,
            echo_image,
            ingressNetworkConnectors=[HTTP, SHELL],
            egressNetworkConnectors=[EGRESS],
        )
        vms = [opened, closed, explicit]
        try:
            for vm in vms:
                assert wait_microvm(client, vm["microvmId"], {"RUNNING", "TERMINATED"})["state"] == "RUNNING"
            keys = {sandbox_key(endpoint_server, vm["microvmId"]) for vm in vms}
            host_address = socket.gethostbyname(socket.gethostname())
            forbidden = [
                f"127.0.0.1:{endpoint_server.port}",
                f"{host_address}:{endpoint_server.port}",
                f"{internet.host_address}:{endpoint_server.port}",
                "169.254.169.254:80",
            ]
            for vm in (opened, explicit):  # the default (AWS's too) is INTERNET_EGRESS
                results = shell_probe(endpoint_server, vm, [outside, *forbidden])
                assert results.pop(outside) == "connected", results
                assert "connected" not in results.values(), results
            assert shell_probe(endpoint_server, closed, [outside]) == {outside: "ConnectionRefusedError"}
        finally:
            for vm in vms:
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    for vm in vms:
        wait_microvm(client, vm["microvmId"], {"TERMINATED"})
    # Their uplinks (lease, veth, nftables table) went with them.
    view = HostView(endpoint_server.data_dir)
    deadline = time.monotonic() + 30
    while any(holder.split("-")[2] in keys for holder in view.uplink_leases().values()):
        assert time.monotonic() < deadline, view.uplink_leases()
        time.sleep(0.1)
    assert not view.unleased_uplink_objects()


def sandbox_key(server: ServerProcess, microvm_id: str) -> str:
    """The key naming a MicroVM's host objects (runtime/names.py), from its sandbox record."""
    record = server.data_dir / "sandboxes" / "sandboxes" / microvm_id / "record.json"
    return str(json.loads(record.read_text())["key"])

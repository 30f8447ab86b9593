"""Internet egress through the real server: RunMicrovm's egressNetworkConnectors decide whether the
app can connect out (to a stand-in internet, tests/builder/fake_internet.py), and egress never
reaches the server, a host address, cloud metadata or private networks (stand-in LANs: namespaces
of the test's own on private /30s no route of the host uses), but for the networks the setting
egress_allow_networks names. Probes run in the MicroVM's shell."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.builder.fake_internet import fake_internet
from tests.endpoint.conftest import ECHO_APP, HTTP, SHELL, run_microvm
from tests.reliability.invariants import HostView
from tests.support.images import image_request, upload, wait_image_settled, wait_microvm, zip_files
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

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
    with fake_internet() as internet, fake_internet("172.16.0.0/12") as lan:
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
                f"{lan.address}:{lan.silent_port()}",  # private: refused by default
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


# A build's RUN step: fails the build unless it reaches `allowed` and not `other`.
BUILD_CHECK = """\
import socket

def reaches(address):
    try:
        socket.create_connection(address, timeout=5).close()
        return True
    except OSError:
        return False

assert reaches({allowed!r}), "the allowed network is out of the build's reach"
assert not reaches({other!r}), "the build reached a private network that is not allowed"
"""


def test_egress_allow_networks_opens_exactly_the_named_networks(
    tmp_path: Path, moto: MotoServer, database_backend: DatabaseBackend
) -> None:
    """The setting, from the environment, reaches the firewalls of the server's builds (a RUN step
    that fails the build unless it reaches exactly the allowed network) and of its MicroVMs."""
    with contextlib.ExitStack() as stack:
        internet = stack.enter_context(fake_internet())
        allowed = stack.enter_context(fake_internet("192.168.0.0/16"))
        other = stack.enter_context(fake_internet("172.16.0.0/12"))
        server = stack.enter_context(
            database_backend.server(
                tmp_path / "server",
                env={**moto.environment(), "OPENMICROVM_EGRESS_ALLOW_NETWORKS": f" {allowed.network} ,"},
            )
        )
        server.start()
        client = server.client()
        check = BUILD_CHECK.format(
            allowed=(allowed.address, allowed.silent_port()), other=(other.address, other.silent_port())
        )
        dockerfile = (
            (ECHO_APP / "Dockerfile")
            .read_text()
            .replace(
                "COPY app.py /srv/app.py\n",
                "COPY app.py /srv/app.py\nCOPY check.py /check.py\nRUN python3 /check.py\n",
            )
        )
        assert "RUN python3 /check.py" in dockerfile, dockerfile
        artifact = zip_files(
            {"Dockerfile": dockerfile, "app.py": (ECHO_APP / "app.py").read_bytes(), "check.py": check}
        )
        arn = client.create_microvm_image(
            **image_request("echo", upload(moto, artifact), resources=[{"minimumMemoryInMiB": 512}])
        )["imageArn"]
        image = wait_image_settled(client, arn)
        assert image["state"] == "CREATED", image
        vm = run_microvm(server, arn, ingressNetworkConnectors=[HTTP, SHELL])
        stack.callback(client.terminate_microvm, microvmIdentifier=vm["microvmId"])
        targets = {
            "internet": f"{internet.address}:{internet.silent_port()}",
            "allowed": f"{allowed.address}:{allowed.silent_port()}",
            "other": f"{other.address}:{other.silent_port()}",
            # The host's own end of the allowed /30: allowing a network never opens the host.
            "host": f"{allowed.host_address}:{server.port}",
        }
        results = shell_probe(server, vm, list(targets.values()))
        reached = {name for name, target in targets.items() if results[target] == "connected"}
        assert reached == {"internet", "allowed"}, results
        assert other.accepted == 0


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "192.168.1.1/24", "printer.lan", "169.254.169.254"])
def test_an_invalid_egress_allow_network_stops_the_server_at_start(
    tmp_path: Path, entry: str, database_backend: DatabaseBackend
) -> None:
    with (
        database_backend.server(
            tmp_path / "server", {"egress_allow_networks": f"10.1.0.0/16, {entry}"}
        ) as server,
        pytest.raises(RuntimeError, match="server exited with 2"),
    ):
        server.start()
    log = server.log()
    refusals = [
        line for line in log.splitlines() if line.startswith("openmicrovm: setting egress_allow_networks: ")
    ]
    assert len(refusals) == 1 and entry in refusals[0] and "Traceback" not in log, log

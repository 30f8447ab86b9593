"""Two accounts on one server (SigV4 required) never reach each other's images, versions, builds,
MicroVMs, tokens, tags, pages or clientTokens, whatever identifier they pass: another account's
image ARN is a 403 (as on AWS), another account's MicroVM id is simply not found, and an endpoint
token opens only the MicroVM it was minted for."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import image_request
from tests.reliability.conftest import ALICE, BOB, client_for, tenant_request, unique
from tests.reliability.microvms import Fleet
from tests.reliability.sigv4 import Signer
from tests.support.endpoint import auth_token, call
from tests.support.images import wait_image_settled
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

SHELL = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"
HTTP = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"


@dataclass(frozen=True)
class Tenant:
    client: Any
    image: str
    build_id: str
    vm: dict[str, Any]
    token: str
    signer: Signer


@pytest.fixture(scope="module")
def tenants(
    keyed_server: ServerProcess, alice: Any, bob: Any, moto: MotoServer
) -> Iterator[tuple[Tenant, Tenant]]:
    """Alice and Bob, each with a built image and a RUNNING MicroVM of it (shell ingress too)."""
    # Both builds run side by side; each account builds with its own client.
    alice_arn = alice.create_microvm_image(**tenant_request(moto, unique("alice")))["imageArn"]
    bob_arn = bob.create_microvm_image(**tenant_request(moto, unique("bob")))["imageArn"]
    for client, arn in ((alice, alice_arn), (bob, bob_arn)):
        assert wait_image_settled(client, arn)["state"] == "CREATED"
    fleets = (Fleet(alice), Fleet(bob))
    made: list[Tenant] = []
    try:
        for who, client, fleet, arn in ((ALICE, alice, fleets[0], alice_arn), (BOB, bob, fleets[1], bob_arn)):
            vm = fleet.run(arn, ingressNetworkConnectors=[HTTP, SHELL])
            build = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"][0]
            made.append(
                Tenant(
                    client,
                    arn,
                    build["buildId"],
                    vm,
                    auth_token(client, vm["microvmId"]),
                    Signer(keyed_server.port, who["access_key_id"], who["secret_access_key"]),
                )
            )
        yield made[0], made[1]
    finally:
        for fleet in fleets:
            fleet.terminate_all()


def _error(call: Any, **kwargs: Any) -> tuple[str, int, str]:
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    response = caught.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


def test_another_accounts_microvm_id_is_not_found(tenants: tuple[Tenant, Tenant]) -> None:
    alice, bob = tenants
    victim = alice.vm["microvmId"]
    for call_, kwargs in [
        (bob.client.get_microvm, {}),
        (bob.client.suspend_microvm, {}),
        (bob.client.resume_microvm, {}),
        (bob.client.terminate_microvm, {}),
        (
            bob.client.create_microvm_auth_token,
            {"expirationInMinutes": 5, "allowedPorts": [{"allPorts": {}}]},
        ),
        (bob.client.create_microvm_shell_auth_token, {"expirationInMinutes": 5}),
    ]:
        code, status, message = _error(call_, microvmIdentifier=victim, **kwargs)
        assert (code, status, message) == (
            "ResourceNotFoundException",
            404,
            f"MicroVM not found: {victim}",
        ), call_
    listed = bob.client.list_microvms(maxResults=50)["items"]
    assert victim not in {item["microvmId"] for item in listed}
    # Nothing Bob tried moved Alice's MicroVM.
    assert alice.client.get_microvm(microvmIdentifier=victim)["state"] == "RUNNING"


def test_the_same_account_in_another_region_does_not_see_its_microvm(
    keyed_server: ServerProcess, tenants: tuple[Tenant, Tenant]
) -> None:
    alice, _ = tenants
    west = client_for(keyed_server, ALICE, region="us-west-2")
    code, status, _ = _error(west.get_microvm, microvmIdentifier=alice.vm["microvmId"])
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert west.list_microvms()["items"] == []


def _arn_spellings(arn: str) -> list[str]:
    return [arn, urllib.parse.quote(arn, safe=""), arn.replace(":", "%3A")]


def test_another_accounts_image_arn_is_access_denied_however_it_is_spelled(
    keyed_server: ServerProcess, tenants: tuple[Tenant, Tenant]
) -> None:
    alice, bob = tenants
    arn = alice.image
    for call_, kwargs in [
        (bob.client.get_microvm_image, {"imageIdentifier": arn}),
        (bob.client.list_microvm_image_versions, {"imageIdentifier": arn}),
        (bob.client.get_microvm_image_version, {"imageIdentifier": arn, "imageVersion": "1.0"}),
        (bob.client.list_microvm_image_builds, {"imageIdentifier": arn, "imageVersion": "1.0"}),
        (
            bob.client.get_microvm_image_build,
            {"imageIdentifier": arn, "imageVersion": "1.0", "buildId": alice.build_id},
        ),
        (
            bob.client.update_microvm_image_version,
            {"imageIdentifier": arn, "imageVersion": "1.0", "status": "INACTIVE"},
        ),
        (bob.client.delete_microvm_image_version, {"imageIdentifier": arn, "imageVersion": "1.0"}),
        (bob.client.delete_microvm_image, {"imageIdentifier": arn}),
        (bob.client.run_microvm, {"imageIdentifier": arn}),
        (bob.client.list_microvms, {"imageIdentifier": arn}),
        (bob.client.list_tags, {"Resource": arn}),
        (bob.client.tag_resource, {"Resource": arn, "Tags": {"owner": "bob"}}),
        (bob.client.untag_resource, {"Resource": arn, "TagKeys": ["owner"]}),
    ]:
        code, status, _ = _error(call_, **kwargs)
        assert (code, status) == ("AccessDeniedException", 403), (call_, code)
    # Percent-encoded spellings of the ARN in the path, straight to the wire.
    for spelled in _arn_spellings(alice.image)[1:]:
        for path in (
            f"/2025-09-09/microvm-images/{spelled}",
            f"/2025-09-09/microvm-images/{spelled}/versions/1.0/builds/{alice.build_id}",
            f"/2017-03-31/tags/{spelled}",
        ):
            response = bob.signer.send("GET", path)
            assert (response.status, response.error_type) == (403, "AccessDeniedException"), (
                path,
                response.body,
            )
    assert alice.client.list_tags(Resource=alice.image)["Tags"] == {}
    assert (
        alice.client.get_microvm_image_version(imageIdentifier=alice.image, imageVersion="1.0")["status"]
        == "ACTIVE"
    )


def test_a_build_id_of_another_account_is_not_found_under_ones_own_image(
    tenants: tuple[Tenant, Tenant],
) -> None:
    alice, bob = tenants
    code, status, _ = _error(
        bob.client.get_microvm_image_build,
        imageIdentifier=bob.image,
        imageVersion="1.0",
        buildId=alice.build_id,
    )
    assert (code, status) == ("ResourceNotFoundException", 404)


def test_an_endpoint_token_opens_only_its_own_microvm(
    keyed_server: ServerProcess, tenants: tuple[Tenant, Tenant]
) -> None:
    alice, bob = tenants
    assert call(keyed_server, alice.vm["endpoint"], alice.token, "/count").status == 200
    assert call(keyed_server, bob.vm["endpoint"], bob.token, "/count").status == 200
    crossed = call(keyed_server, alice.vm["endpoint"], bob.token, "/count")
    assert (crossed.status, crossed.body) == (403, b"Token authentication failed")
    crossed = call(keyed_server, bob.vm["endpoint"], alice.token, "/count")
    assert (crossed.status, crossed.body) == (403, b"Token authentication failed")
    bob_shell = bob.client.create_microvm_shell_auth_token(
        microvmIdentifier=bob.vm["microvmId"], expirationInMinutes=5
    )["authToken"]["X-aws-proxy-auth"]
    # Bob's shell token at Alice's endpoint: neither the app nor Alice's shell opens.
    for path, headers in (
        ("/count", {}),
        (
            "/shell",
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        ),
    ):
        response = call(keyed_server, alice.vm["endpoint"], bob_shell, path, headers=headers)
        assert response.status == 403, (path, response.status, response.body)


def test_pagination_tokens_do_not_cross_accounts(tenants: tuple[Tenant, Tenant]) -> None:
    alice, bob = tenants
    for _ in range(2):  # artifacts in a bucket that does not exist: the builds fail at once
        alice.client.create_microvm_image(**image_request(unique("page")))
    token = alice.client.list_microvm_images(maxResults=1)["nextToken"]
    assert token
    code, status, _ = _error(bob.client.list_microvm_images, maxResults=1, nextToken=token)
    assert (code, status) == ("ValidationException", 400)


def test_a_client_token_replays_only_for_the_account_that_used_it(
    tenants: tuple[Tenant, Tenant], keyed_server: ServerProcess
) -> None:
    alice, bob = tenants
    token = unique("shared-token")
    fleet_alice, fleet_bob = Fleet(alice.client), Fleet(bob.client)
    try:
        first = fleet_alice.run(alice.image, wait=False, clientToken=token)
        # Bob sends the very same request: he must not get Alice's MicroVM back.
        code, status, _ = _error(bob.client.run_microvm, imageIdentifier=alice.image, clientToken=token)
        assert (code, status) == ("AccessDeniedException", 403)
        mine = fleet_bob.run(bob.image, wait=False, clientToken=token)
        assert mine["microvmId"] != first["microvmId"]
        assert (
            alice.client.run_microvm(imageIdentifier=alice.image, clientToken=token)["microvmId"]
            == first["microvmId"]
        )
    finally:
        fleet_alice.terminate_all()
        fleet_bob.terminate_all()


def test_images_lists_are_per_account(tenants: tuple[Tenant, Tenant]) -> None:
    alice, bob = tenants
    alice_arns = {item["imageArn"] for item in alice.client.list_microvm_images(maxResults=50)["items"]}
    bob_arns = {item["imageArn"] for item in bob.client.list_microvm_images(maxResults=50)["items"]}
    assert alice.image in alice_arns and bob.image in bob_arns
    assert all(":111111111111:" in arn for arn in alice_arns)
    assert all(":222222222222:" in arn for arn in bob_arns)
    listed = json.dumps(bob.client.list_microvms(maxResults=50)["items"], default=str)
    assert alice.vm["microvmId"] not in listed

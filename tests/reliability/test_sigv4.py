"""SigV4 under attack, on a server with access keys: stale and future clocks, tampered payload
hashes, scopes naming another region or service, presigned URLs expired or edited, and requests
missing pieces of their signature. Every refusal is a 403 with the AWS error of the front door."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import image_request
from tests.reliability.conftest import ALICE, BOB, client_for, unique
from tests.reliability.sigv4 import Signer, amz_date, presigned_path, signed_headers
from tests.support.http import RawResponse, raw_request
from tests.support.images import BUILD_ROLE, MANAGED_BASE
from tests.support.server import ServerProcess

IMAGES = "/2025-09-09/microvm-images"
MANAGED = "/2025-09-09/managed-microvm-images"


def _create_body(name: str) -> bytes:
    return json.dumps(
        {
            "name": name,
            "baseImageArn": MANAGED_BASE,
            "buildRoleArn": BUILD_ROLE,
            "codeArtifact": {"uri": "s3://no-such-bucket-openmicrovm/app.zip"},
        }
    ).encode()


def _refused(response: RawResponse, code: str, fragment: str = "") -> None:
    assert response.status == 403, (response.status, response.body)
    assert response.error_type == code, (response.error_type, response.body)
    assert fragment in response.json()["message"], response.body


@pytest.fixture
def signer(keyed_server: ServerProcess) -> Signer:
    return Signer(keyed_server.port, ALICE["access_key_id"], ALICE["secret_access_key"])


def _names(alice: Any) -> set[str]:
    return {item["name"] for item in alice.list_microvm_images(maxResults=50)["items"]}


def test_a_correctly_signed_raw_request_is_accepted(signer: Signer) -> None:
    """The control for every refusal below: the same helpers, nothing tampered."""
    response = signer.send("GET", MANAGED)
    assert response.status == 200, response.body
    name = unique("signed")
    created = signer.send("POST", IMAGES, _create_body(name), headers={"Content-Type": "application/json"})
    assert created.status == 201, created.body
    assert created.json()["imageArn"].endswith(f":111111111111:microvm-image:{name}")


@pytest.mark.parametrize("offset", [-6 * 60, 6 * 60, -3600, 24 * 3600])
def test_a_clock_skewed_beyond_five_minutes_is_refused(signer: Signer, offset: int) -> None:
    response = signer.send("GET", MANAGED, timestamp=amz_date(offset))
    _refused(response, "InvalidSignatureException", "Signature expired")


@pytest.mark.parametrize("offset", [-4 * 60, 4 * 60])
def test_a_clock_skewed_within_five_minutes_is_accepted(signer: Signer, offset: int) -> None:
    assert signer.send("GET", MANAGED, timestamp=amz_date(offset)).status == 200


def test_a_body_changed_after_signing_is_refused_whatever_hash_header_it_carries(
    signer: Signer, keyed_server: ServerProcess, alice: Any
) -> None:
    name = unique("honest")
    body = _create_body(name)
    headers = signer.headers("POST", IMAGES, body, headers={"Content-Type": "application/json"})
    evil = body.replace(name.encode(), b"evil-" + name.encode())
    # Unsigned hash headers: the real body is hashed, so neither the stale nor a matching hash helps.
    for extra in (
        {},
        {"X-Amz-Content-SHA256": hashlib.sha256(evil).hexdigest()},
        {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    ):
        response = raw_request(keyed_server.port, "POST", IMAGES, evil, {**headers, **extra})
        _refused(response, "InvalidSignatureException", "signature we calculated does not match")
    assert f"evil-{name}" not in _names(alice)


def test_a_signed_payload_hash_header_must_match_the_body(
    signer: Signer, keyed_server: ServerProcess, alice: Any
) -> None:
    name = unique("hashed")
    body = _create_body(name)
    signed = signer.headers(
        "POST",
        IMAGES,
        body,
        headers={
            "Content-Type": "application/json",
            "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest(),
        },
    )
    evil = body.replace(name.encode(), b"evil-" + name.encode())
    swapped = raw_request(keyed_server.port, "POST", IMAGES, evil, signed)
    unsigned = signer.headers(
        "POST",
        IMAGES,
        body,
        headers={"Content-Type": "application/json", "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    )
    unsigned_body = body.replace(name.encode(), b"unsigned-" + name.encode())
    free = raw_request(keyed_server.port, "POST", IMAGES, unsigned_body, unsigned)
    assert (swapped.status, free.status) == (403, 403), (swapped.body, free.body)
    assert not {f"evil-{name}", f"unsigned-{name}"} & _names(alice)


@pytest.mark.parametrize("service", ["s3", "lambda-microvms", "execute-api", "sts"])
def test_a_scope_naming_another_service_is_refused(signer: Signer, service: str) -> None:
    _refused(signer.send("GET", MANAGED, service=service), "InvalidSignatureException")


def test_a_scope_whose_region_was_edited_after_signing_is_refused(
    signer: Signer, keyed_server: ServerProcess
) -> None:
    headers = signer.headers("GET", MANAGED)
    for region in ("us-west-2", "eu-west-1"):
        edited = {**headers, "Authorization": headers["Authorization"].replace("/us-east-1/", f"/{region}/")}
        _refused(raw_request(keyed_server.port, "GET", MANAGED, None, edited), "InvalidSignatureException")


def test_a_scope_signed_for_another_region_acts_in_that_region_only(
    keyed_server: ServerProcess, alice: Any
) -> None:
    west = client_for(keyed_server, ALICE, region="us-west-2")
    name = unique("west")
    base = MANAGED_BASE.replace("us-east-1", "us-west-2")
    arn = west.create_microvm_image(**image_request(name, baseImageArn=base))["imageArn"]
    assert arn.startswith("arn:aws:lambda:us-west-2:111111111111:")
    assert name not in _names(alice)
    code = _code(alice.get_microvm_image, imageIdentifier=arn)
    assert code == "ResourceNotFoundException"


def test_a_non_ascii_scope_region_is_a_signature_error_not_a_500(keyed_server: ServerProcess) -> None:
    headers = signed_headers(
        f"http://127.0.0.1:{keyed_server.port}{MANAGED}",
        "GET",
        b"",
        ALICE["access_key_id"],
        ALICE["secret_access_key"],
    )
    scope = headers["Authorization"].replace("/us-east-1/", "/us-east-1\u00e9/")
    response = raw_request(keyed_server.port, "GET", MANAGED, None, {**headers, "Authorization": scope})
    assert response.status == 403, (response.status, response.body)


def test_a_scope_region_must_look_like_a_region(signer: Signer) -> None:
    injected = signer.send("GET", MANAGED, region="us-east-1:999999999999")
    assert injected.status == 403, (injected.status, injected.body)


def test_missing_or_malformed_signature_pieces_are_refused(
    signer: Signer, keyed_server: ServerProcess
) -> None:
    good = signer.headers("GET", MANAGED)
    authorization = good["Authorization"]
    credential = authorization.split("Credential=")[1].split(",")[0]
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "MissingAuthenticationTokenException"),
        ({"Authorization": authorization}, "IncompleteSignatureException"),  # no X-Amz-Date
        ({**good, "Authorization": ""}, "IncompleteSignatureException"),
        ({**good, "Authorization": authorization.split(", Signature=")[0]}, "IncompleteSignatureException"),
        (
            {**good, "Authorization": authorization.replace("SignedHeaders=host;x-amz-date, ", "")},
            "IncompleteSignatureException",
        ),
        (
            {**good, "Authorization": authorization.replace(credential, credential.rsplit("/", 1)[0])},
            "IncompleteSignatureException",
        ),
        (
            {**good, "Authorization": authorization.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1")},
            "IncompleteSignatureException",
        ),
        ({**good, "X-Amz-Date": "yesterday"}, "IncompleteSignatureException"),
        ({**good, "X-Amz-Date": amz_date(1)}, "InvalidSignatureException"),  # not the date that was signed
        (
            {**good, "Authorization": authorization.replace("AKIDALICE", "AKIDMALLORY")},
            "UnrecognizedClientException",
        ),
        (
            {**good, "Authorization": authorization.replace("AKIDALICE", BOB["access_key_id"])},
            "InvalidSignatureException",
        ),
        (
            {
                **good,
                "Authorization": authorization[:-4]
                + ("0000" if not authorization.endswith("0000") else "1111"),
            },
            "InvalidSignatureException",
        ),
    ]
    for headers, code in cases:
        response = raw_request(keyed_server.port, "GET", MANAGED, None, headers)
        assert (response.status, response.error_type) == (403, code), (headers, response.body)


def test_signed_headers_and_query_cannot_be_changed_after_signing(
    signer: Signer, keyed_server: ServerProcess
) -> None:
    path = f"{IMAGES}?maxResults=5"
    headers = signer.headers("GET", path, headers={"X-Custom": "signed"})
    assert raw_request(keyed_server.port, "GET", path, None, headers).status == 200
    edits = [
        (f"{IMAGES}?maxResults=6", headers),
        (f"{IMAGES}?maxResults=5&nameFilter=x", headers),
        (MANAGED, headers),
        (path, {**headers, "X-Custom": "changed"}),
    ]
    for edited_path, edited_headers in edits:
        response = raw_request(keyed_server.port, "GET", edited_path, None, edited_headers)
        _refused(response, "InvalidSignatureException")


def _presigned(server: ServerProcess, path: str, **options: Any) -> str:
    return presigned_path(
        f"http://127.0.0.1:{server.port}{path}", ALICE["access_key_id"], ALICE["secret_access_key"], **options
    )


def test_a_presigned_url_that_was_edited_is_refused(keyed_server: ServerProcess) -> None:
    good = _presigned(keyed_server, MANAGED)
    assert raw_request(keyed_server.port, "GET", good).status == 200
    expires = next(part for part in good.split("&") if part.startswith("X-Amz-Expires="))
    date = next(part for part in good.split("&") if part.startswith("X-Amz-Date="))
    edits = [
        good.replace(MANAGED, IMAGES),
        good + "&maxResults=1",
        good.replace(expires, "X-Amz-Expires=604800"),
        good.replace(date, f"X-Amz-Date={amz_date(-30)}"),
        good.replace("us-east-1", "us-west-2"),
        good.replace("%2Flambda%2F", "%2Fs3%2F"),
    ]
    for edited in edits:
        assert edited != good
        response = raw_request(keyed_server.port, "GET", edited)
        assert response.status == 403, (edited, response.body)
    assert raw_request(keyed_server.port, "POST", good).status in (403, 404)


def test_a_presigned_url_lives_exactly_as_long_as_x_amz_expires(keyed_server: ServerProcess) -> None:
    expired = _presigned(keyed_server, MANAGED, expires=30, timestamp=amz_date(-120))
    still_valid = _presigned(keyed_server, MANAGED, expires=3600, timestamp=amz_date(-600))
    statuses = (
        raw_request(keyed_server.port, "GET", expired).status,
        raw_request(keyed_server.port, "GET", still_valid).status,
    )
    assert statuses == (403, 200)


def _code(call: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    return str(caught.value.response["Error"]["Code"])

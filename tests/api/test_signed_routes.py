"""SigV4 beyond the operations: /metrics is signed like the API whenever access keys are
configured, and a presigned URL that names a query key twice is refused (which of the two values
counts would otherwise be up to each reader: a URL signed over one value could act with another).
Signed with botocore's own signers, sent to the real server."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import pytest
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.logs import server_http
from tests.support.http import RawResponse, raw_request
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

KEY = {"access_key_id": "AKIDSIGNED", "secret_access_key": "signed-secret", "account_id": "333333333333"}
MANAGED = "/2025-09-09/managed-microvm-images"


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    with database_backend.server(
        tmp_path_factory.mktemp("signed"), {"access_keys": [KEY]}, env=moto.environment()
    ) as server:
        server.start()
        yield server


def _presigned(server: ServerProcess, path: str, key: str = KEY["access_key_id"]) -> str:
    """Path and query of a URL presigned by botocore (what boto3's generate_presigned_url does)."""
    request = AWSRequest(method="GET", url=f"{server.url}{path}")
    SigV4QueryAuth(Credentials(key, KEY["secret_access_key"]), "lambda", "us-east-1").add_auth(request)
    parts = urlsplit(request.url)
    return f"{parts.path}?{parts.query}"


def _refused(response: RawResponse, code: str, fragment: str = "") -> None:
    assert response.status == 403, (response.status, response.body)
    assert response.error_type == code, (response.error_type, response.body)
    assert fragment in response.json()["message"], response.body


# ------------------------------------------------------------------------------------- /metrics


def test_metrics_need_a_valid_signature_when_keys_are_configured(keyed: ServerProcess) -> None:
    url = f"{keyed.url}/metrics"
    status, headers, _ = server_http.get(url)
    assert (status, headers.get("X-Amzn-Errortype")) == (403, "MissingAuthenticationTokenException")
    status, headers, _ = server_http.get(url, KEY["access_key_id"], "not-the-secret")
    assert (status, headers.get("X-Amzn-Errortype")) == (403, "InvalidSignatureException")
    status, headers, _ = server_http.get(url, "AKIDNOBODY", KEY["secret_access_key"])
    assert (status, headers.get("X-Amzn-Errortype")) == (403, "UnrecognizedClientException")

    status, headers, body = server_http.get(url, KEY["access_key_id"], KEY["secret_access_key"])
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    assert b"openmicrovm_microvms" in body
    presigned = raw_request(keyed.port, "GET", _presigned(keyed, "/metrics"))
    assert presigned.status == 200 and b"openmicrovm_microvms" in presigned.body


def test_metrics_stay_unsigned_without_keys(server: ServerProcess) -> None:
    status, _, body = server_http.get(f"{server.url}/metrics")
    assert status == 200 and b"openmicrovm_microvms" in body


# -------------------------------------------------------------------------- repeated query keys


def test_a_presigned_url_naming_any_key_twice_is_refused(keyed: ServerProcess) -> None:
    good = _presigned(keyed, MANAGED)
    assert raw_request(keyed.port, "GET", good).status == 200
    pairs = parse_qsl(urlsplit(good).query, keep_blank_values=True)
    assert {key for key, _ in pairs} >= {"X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date", "X-Amz-Expires"}
    for key, value in pairs:
        repeated = raw_request(keyed.port, "GET", f"{good}&{key}={value}")
        _refused(repeated, "IncompleteSignatureException", f"repeats the query parameter {key!r}")


def test_a_forged_signature_in_front_of_the_real_one_is_refused(keyed: ServerProcess) -> None:
    """Each reader taking one of two values is how a URL gets checked on one and used with the
    other: here the last (real) signature would match and the first is someone else's."""
    good = _presigned(keyed, MANAGED)
    path, _, query = good.partition("?")
    forged = f"{path}?X-Amz-Signature={'0' * 64}&{query}"
    _refused(raw_request(keyed.port, "GET", forged), "IncompleteSignatureException", "'X-Amz-Signature'")
    credential = dict(parse_qsl(query))["X-Amz-Credential"].replace(KEY["access_key_id"], "AKIDOTHER")
    two_keys = f"{path}?X-Amz-Credential={credential}&{query}"
    _refused(raw_request(keyed.port, "GET", two_keys), "IncompleteSignatureException", "'X-Amz-Credential'")


def test_an_operation_key_put_in_front_of_a_signed_one_is_refused(keyed: ServerProcess) -> None:
    """The signature check read the last maxResults (the signed one), the operation the first."""
    path, _, query = _presigned(keyed, "/2025-09-09/microvm-images?maxResults=1").partition("?")
    assert raw_request(keyed.port, "GET", f"{path}?{query}").status == 200
    smuggled = raw_request(keyed.port, "GET", f"{path}?maxResults=2&{query}")
    _refused(smuggled, "IncompleteSignatureException", "'maxResults'")


def test_repeated_keys_are_refused_without_access_keys_too(server: ServerProcess) -> None:
    """No keys configured: signatures are not checked, but a malformed one is still refused."""
    good = _presigned(server, MANAGED, key="AKIDANY")
    assert raw_request(server.port, "GET", good).status == 200
    credential = dict(parse_qsl(urlsplit(good).query))["X-Amz-Credential"]
    _refused(
        raw_request(server.port, "GET", f"{good}&X-Amz-Credential={credential}"),
        "IncompleteSignatureException",
        "'X-Amz-Credential'",
    )

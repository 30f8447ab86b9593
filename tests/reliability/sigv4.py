"""SigV4 signing with a clock and a scope of the caller's choosing, for attacks: requests signed
minutes ago, presigned URLs past their expiry, scopes naming another region or service.

botocore's signers read the wall clock; these helpers run the same signer steps with a given
timestamp instead, so what the server checks is exactly what botocore would have produced then.
"""

from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.http import RawResponse, raw_request

SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"


def amz_date(offset_seconds: float = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset_seconds)
    return moment.strftime(SIGV4_TIMESTAMP)


def _sign(request: AWSRequest, signer: SigV4Auth, timestamp: str) -> None:
    request.context["timestamp"] = timestamp
    signer._modify_request_before_signing(request)
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signer._inject_signature_to_request(request, signature)


def signed_headers(
    url: str,
    method: str,
    body: bytes,
    key: str,
    secret: str,
    *,
    region: str = "us-east-1",
    service: str = "lambda",
    timestamp: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers (Authorization, X-Amz-Date and the given ones) of a header-signed request."""
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    _sign(request, SigV4Auth(Credentials(key, secret), service, region), timestamp or amz_date())
    return dict(request.headers.items())


def presigned_path(
    url: str,
    key: str,
    secret: str,
    *,
    method: str = "GET",
    region: str = "us-east-1",
    service: str = "lambda",
    expires: int = 300,
    timestamp: str | None = None,
) -> str:
    """Path and query of a presigned URL (X-Amz-* in the query string)."""
    request = AWSRequest(method=method, url=url)
    _sign(
        request,
        SigV4QueryAuth(Credentials(key, secret), service, region, expires=expires),
        timestamp or amz_date(),
    )
    parts = urlsplit(request.url)
    return f"{parts.path}?{parts.query}"


class Signer:
    """Signed raw requests to one server as one access key."""

    def __init__(self, port: int, key: str, secret: str, region: str = "us-east-1") -> None:
        self.port = port
        self.key = key
        self.secret = secret
        self.region = region

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, method: str, path: str, body: bytes = b"", **options: Any) -> dict[str, str]:
        options.setdefault("region", self.region)
        return signed_headers(f"{self.base}{path}", method, body, self.key, self.secret, **options)

    def send(self, method: str, path: str, body: bytes = b"", **options: Any) -> RawResponse:
        extra = options.pop("headers", None) or {}
        headers = self.headers(method, path, body, headers=extra, **options)
        return raw_request(self.port, method, path, body or None, headers)

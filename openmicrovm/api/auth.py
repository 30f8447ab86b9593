"""Who sent a request: the region from the SigV4 credential scope, the account from the access key.

With no access keys configured (the default) any key is accepted and maps to the default account.
With keys configured, every request must carry a valid AWS Signature Version 4, in the
Authorization header or as a presigned query, checked with botocore's own signer.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from openmicrovm.config import AccessKey, Settings

SIGNING_NAME = "lambda"
MAX_CLOCK_SKEW = datetime.timedelta(minutes=5)
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # as SigV4 allows
_REGION = re.compile(r"[a-z]{2,4}(-[a-z0-9]+)*-[0-9]{1,2}")
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*SignedHeaders=(?P<signed>[^,\s]+)\s*,"
    r"\s*Signature=(?P<signature>[0-9a-f]+)"
)


class AuthError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    account: str
    region: str
    access_key_id: str | None


@dataclass(frozen=True)
class SignedRequest:
    method: str
    url: str  # scheme://host/raw-path?raw-query exactly as received
    headers: Mapping[str, str]
    body: bytes


def _scope(credential: str) -> tuple[str, str, str]:
    """(access key id, date, region) of a credential scope, which must name a region and lambda:
    the region goes into ARNs, so it may only be what a region looks like."""
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AuthError(
            "IncompleteSignatureException", f"Credential should be scoped correctly: {credential}"
        )
    if not _REGION.fullmatch(parts[2]):
        raise AuthError(
            "InvalidSignatureException", f"Credential should be scoped to a valid region, not {parts[2]!r}."
        )
    if parts[3] != SIGNING_NAME:
        raise AuthError(
            "InvalidSignatureException", f"Credential should be scoped to correct service: '{SIGNING_NAME}'."
        )
    return parts[0], parts[1], parts[2]


def _signed_at(amz_date: str) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        raise AuthError(
            "IncompleteSignatureException", f"X-Amz-Date {amz_date!r} is not a SigV4 date"
        ) from None


def _check_presigned_time(amz_date: str, expires: str) -> None:
    """A presigned URL is valid from its X-Amz-Date (give or take the clock skew) for X-Amz-Expires."""
    signed_at = _signed_at(amz_date)
    if not expires.isascii() or not expires.isdigit() or not 1 <= int(expires) <= MAX_PRESIGN_SECONDS:
        raise AuthError(
            "IncompleteSignatureException",
            f"X-Amz-Expires must be a number of seconds from 1 to {MAX_PRESIGN_SECONDS}, not {expires!r}",
        )
    now = datetime.datetime.now(datetime.UTC)
    if signed_at - now > MAX_CLOCK_SKEW:
        raise AuthError(
            "InvalidSignatureException", f"Signature not yet current: {amz_date} is in the future"
        )
    if now > signed_at + datetime.timedelta(seconds=int(expires)):
        raise AuthError(
            "InvalidSignatureException", "Signature expired: the presigned URL is no longer valid"
        )


def _check_body_hash(headers: Mapping[str, str], body: bytes) -> None:
    """A payload hash header, when sent, must be the body's: otherwise a captured request could be
    replayed with any body, and UNSIGNED-PAYLOAD would leave the body unsigned."""
    claimed = headers.get("x-amz-content-sha256")
    if claimed is not None and claimed.strip().lower() != hashlib.sha256(body).hexdigest():
        raise AuthError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided: the "
            "X-Amz-Content-SHA256 header is not the SHA-256 of the request body.",
        )


def _check_time(amz_date: str) -> None:
    signed_at = _signed_at(amz_date)
    now = datetime.datetime.now(datetime.UTC)
    if abs(now - signed_at) > MAX_CLOCK_SKEW:
        raise AuthError(
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier than "
            f"{(now - MAX_CLOCK_SKEW).strftime('%Y%m%dT%H%M%SZ')} or later than "
            f"{(now + MAX_CLOCK_SKEW).strftime('%Y%m%dT%H%M%SZ')}",
        )


def _expected_signature(
    request: SignedRequest, key: AccessKey, region: str, signed: list[str], amz_date: str, presigned: bool
) -> str:
    credentials = Credentials(key.access_key_id, key.secret_access_key)
    lower = {name.lower(): value for name, value in request.headers.items()}
    headers = {name: lower.get(name, "") for name in signed}
    if presigned:
        # Recompute over the query without the signature, the way the signer built it.
        base, _, query = request.url.partition("?")
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "X-Amz-Signature"]
        aws_request = AWSRequest(method=request.method, url=base, headers=headers, data=request.body)
        aws_request.params = dict(kept)
        signer: SigV4Auth = SigV4QueryAuth(credentials, SIGNING_NAME, region)
    else:
        aws_request = AWSRequest(method=request.method, url=request.url, headers=headers, data=request.body)
        signer = SigV4Auth(credentials, SIGNING_NAME, region)
    aws_request.context["timestamp"] = amz_date
    canonical = signer.canonical_request(aws_request)
    return signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)


def _check_keys_unique(pairs: list[tuple[str, str]]) -> None:
    """A presigned URL names each query key once. With a key twice, which value counts would be
    up to each reader (the signature check, the expiry check, the operation's input), so a URL
    could be signed over one value and acted on with another."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise AuthError(
                "IncompleteSignatureException",
                f"The presigned URL repeats the query parameter {key!r}; each may appear only once.",
            )
        seen.add(key)


def identify(settings: Settings, request: SignedRequest) -> Caller:
    headers = {name.lower(): value for name, value in request.headers.items()}
    authorization = headers.get("authorization")
    pairs = parse_qsl(request.url.partition("?")[2], keep_blank_values=True)
    query = dict(pairs)
    presigned = authorization is None and "X-Amz-Credential" in query
    if presigned:
        _check_keys_unique(pairs)
    if authorization is not None:
        found = _AUTHORIZATION.match(authorization.strip())
        if found is None:
            raise AuthError(
                "IncompleteSignatureException", "Authorization header is not a well-formed SigV4 header"
            )
        credential, signed, signature = found["credential"], found["signed"].split(";"), found["signature"]
        amz_date = headers.get("x-amz-date", "")
    elif presigned:
        credential = query["X-Amz-Credential"]
        signed = query.get("X-Amz-SignedHeaders", "host").split(";")
        signature = query.get("X-Amz-Signature", "")
        amz_date = query.get("X-Amz-Date", "")
    else:
        if settings.signature_required:
            raise AuthError("MissingAuthenticationTokenException", "Missing Authentication Token")
        return Caller(settings.default_account, settings.default_region, None)
    key_id, _date, region = _scope(credential)
    if not settings.signature_required:
        return Caller(settings.default_account, region, key_id)
    key = next((k for k in settings.access_keys if k.access_key_id == key_id), None)
    if key is None:
        raise AuthError(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    if presigned:
        _check_presigned_time(amz_date, query.get("X-Amz-Expires", ""))
    else:
        _check_time(amz_date)
        _check_body_hash(headers, request.body)
    expected = _expected_signature(request, key, region, signed, amz_date, presigned)
    if not hmac.compare_digest(expected, signature):
        raise AuthError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
    return Caller(key.account_id, region, key_id)

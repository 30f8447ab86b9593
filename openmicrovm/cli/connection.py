"""How the CLI reaches the server: endpoint, region, credentials, boto3 clients, signed requests.

Every verb is a thin client of the public API, so it goes through boto3 exactly as a user's code
would. Credentials come from the usual AWS chain; when none are configured the CLI signs with
placeholder keys, which a server without [[access_keys]] accepts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

DEFAULT_ENDPOINT = "http://127.0.0.1:4599"
DEFAULT_REGION = "us-east-1"
PLACEHOLDER_KEY = "openmicrovm"
SIGNING_NAME = "lambda"


class CliError(Exception):
    """A failure to report in one line and exit with `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--endpoint-url",
        default=os.environ.get("OPENMICROVM_ENDPOINT") or DEFAULT_ENDPOINT,
        help=f"the server's API (default $OPENMICROVM_ENDPOINT or {DEFAULT_ENDPOINT})",
    )
    group.add_argument(
        "--region",
        default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        help=f"region (default $AWS_REGION, $AWS_DEFAULT_REGION or {DEFAULT_REGION})",
    )
    group.add_argument("--profile", help="AWS profile for credentials (default: the usual chain)")
    parser.add_argument("--output", choices=["table", "json"], default="table", help="output format")


@dataclass
class Connection:
    endpoint_url: str
    region: str
    session: boto3.session.Session
    credentials: Credentials
    profile: str | None = None

    def client(self, service: str = "lambda-microvms") -> Any:
        """A boto3 client: the server's own for lambda-microvms (with the CLI's credentials,
        placeholders included); for any other service (S3), the usual chain and endpoints."""
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
        if service != "lambda-microvms":
            # A session of its own: the first one resolved credentials without instance metadata.
            fresh = boto3.session.Session(profile_name=self.profile, region_name=self.region)
            return fresh.client(service, config=config)
        return self.session.client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.credentials.access_key,
            aws_secret_access_key=self.credentials.secret_key,
            aws_session_token=self.credentials.token,
            config=config,
        )

    def get_json(self, path: str, query: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """A SigV4-signed GET of one of the server's own routes (not part of the AWS API)."""
        url = self.endpoint_url.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = AWSRequest(method="GET", url=url)
        SigV4Auth(self.credentials, SIGNING_NAME, self.region).add_auth(request)
        prepared = urllib.request.Request(url, headers=dict(request.headers.items()), method="GET")
        try:
            with urllib.request.urlopen(prepared, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ServerError.from_http(error) from None


class ServerError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_http(cls, error: urllib.error.HTTPError) -> ServerError:
        code = (error.headers.get("X-Amzn-Errortype") or "").split(":")[0] or f"HTTP {error.code}"
        try:
            message = json.loads(error.read()).get("message") or error.reason
        except (ValueError, AttributeError):
            message = str(error.reason)
        return cls(error.code, code, str(message))


def connect(args: argparse.Namespace) -> Connection:
    # `openmicrovm` logs at INFO for the server; for a client command botocore's INFO lines
    # ("Found credentials in environment variables.") are noise on every call.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("boto3").setLevel(logging.WARNING)
    try:
        session = boto3.session.Session(profile_name=args.profile, region_name=args.region)
    except Exception as error:  # botocore's ProfileNotFound and friends
        raise CliError(str(error), 2) from None
    found = _credentials_without_instance_metadata(session)
    credentials = (
        found.get_frozen_credentials() if found is not None else Credentials(PLACEHOLDER_KEY, PLACEHOLDER_KEY)
    )
    frozen = Credentials(credentials.access_key, credentials.secret_key, credentials.token)
    return Connection(args.endpoint_url, args.region, session, frozen, args.profile)


def _credentials_without_instance_metadata(session: boto3.session.Session) -> Any:
    """The chain's credentials, skipping the EC2 instance metadata service: on a machine with no
    credentials at all the chain would wait seconds for it before the placeholders are used, and
    the server never needs instance credentials. (S3 clients get the whole chain.)"""
    previous = os.environ.get("AWS_EC2_METADATA_DISABLED")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        return session.get_credentials()
    finally:
        if previous is None:
            del os.environ["AWS_EC2_METADATA_DISABLED"]
        else:
            os.environ["AWS_EC2_METADATA_DISABLED"] = previous

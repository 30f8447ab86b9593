"""Plain HTTP to the server's own routes (/_openmicrovm/logs, /metrics), signed with botocore's
SigV4 signer when keys are given, so tests see exactly what any HTTP client would."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def get(
    url: str, key: str | None = None, secret: str | None = None, region: str = "us-east-1"
) -> tuple[int, dict[str, str], bytes]:
    headers: dict[str, str] = {}
    if key is not None and secret is not None:
        request = AWSRequest(method="GET", url=url)
        SigV4Auth(Credentials(key, secret), "lambda", region).add_auth(request)
        headers = dict(request.headers.items())
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def logs(
    base_url: str,
    kind: str,
    resource_id: str,
    after: int = 0,
    key: str | None = "AKIDTEST",
    secret: str = "secret",
) -> tuple[int, dict[str, Any]]:
    query = urllib.parse.urlencode({"after": after})
    status, headers, body = get(f"{base_url}/_openmicrovm/logs/{kind}/{resource_id}?{query}", key, secret)
    document = json.loads(body) if body else {}
    if status >= 300:
        document["code"] = headers.get("X-Amzn-Errortype", "")
    return status, document


def all_log_lines(base_url: str, kind: str, resource_id: str) -> list[str]:
    lines: list[str] = []
    offset = 0
    while True:
        status, page = logs(base_url, kind, resource_id, offset)
        assert status == 200, page
        lines += page["lines"]
        if not page["lines"]:
            return lines
        offset = page["nextOffset"]


def messages(lines: list[str]) -> list[str]:
    return [line.split(" ", 1)[1] if " " in line else "" for line in lines]

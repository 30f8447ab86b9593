"""Client-side helpers shared by the tests: the AWS CLI against the server, and AWS errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.server import ServerProcess


def aws_error(call: Callable[..., Any], **kwargs: Any) -> tuple[str, str, int]:
    """Call a boto3 operation that must fail: (error code, message, HTTP status)."""
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    error = caught.value.response
    return error["Error"]["Code"], error["Error"]["Message"], error["ResponseMetadata"]["HTTPStatusCode"]


class AwsCli:
    """`aws lambda-microvms ...` (the AWS CLI v1 installed with the tests) against the server,
    with throw-away credentials and no user configuration."""

    def __init__(self, server: ServerProcess, scratch: Path) -> None:
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "AKIDCLI",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(scratch / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "none"),
        }
        aws = os.path.join(os.path.dirname(sys.executable), "aws")
        self.prefix = [aws, "--endpoint-url", server.url, "--output", "json", "lambda-microvms"]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def __call__(self, *args: str) -> dict[str, Any]:
        """A command that must succeed; its JSON output ({} when it prints nothing)."""
        done = self.run(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout.strip() else {}

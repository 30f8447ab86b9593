"""The cluster's S3: moto's server on 127.0.0.1, holding the artifacts users put and the image
version outputs the snapshot store shares between hosts. It keeps everything in memory and forgets
it when the cluster stops."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
from pathlib import Path

import boto3

from openmicrovm.devcluster import processes
from openmicrovm.devcluster.processes import ManagedProcess
from openmicrovm.devcluster.progress import DevclusterError

ARTIFACT_BUCKET = "devcluster-artifacts"
SNAPSHOT_BUCKET = "devcluster-snapshots"
SNAPSHOT_STORE_URL = f"s3://{SNAPSHOT_BUCKET}/versions"
# Any non-empty pair works with moto; the roles and users need the same to sign alike.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def check_installed() -> None:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise DevclusterError(
            "moto's S3 server is not installed",
            "run ./install.sh --dev (or: .venv/bin/pip install 'moto[server]')",
        )


def start(port: int, log_path: Path) -> ManagedProcess:
    return processes.start(
        "S3 (moto)",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        log_path=log_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
    )


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def wait_ready(process: ManagedProcess, port: int, timeout: float = 60.0) -> None:
    await processes.wait_until(
        process,
        lambda: _accepts_connections(port),
        what="listening",
        timeout=timeout,
        hint="run ./install.sh --dev to (re)install moto[server]",
    )


async def create_buckets(url: str, names: list[str]) -> None:
    def create() -> None:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        for name in names:
            client.create_bucket(Bucket=name)

    await asyncio.to_thread(create)


async def stop(process: ManagedProcess) -> None:
    await processes.stop(process, grace=10.0)

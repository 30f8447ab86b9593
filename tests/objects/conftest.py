"""An object store per test: a fresh bucket on the session's moto S3 server (tests/conftest.py),
reached through boto3's ordinary credential chain (the environment)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from openmicrovm.objects import ObjectStore
from tests.support.moto import MotoServer

_buckets = itertools.count()


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, moto: MotoServer) -> dict[str, str]:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


@pytest.fixture
def store(moto: MotoServer, aws_environment: dict[str, str]) -> Iterator[ObjectStore]:
    bucket = f"versions-{os.getpid()}-{next(_buckets)}"
    moto.client("s3").create_bucket(Bucket=bucket)
    yield ObjectStore(f"s3://{bucket}/fleet/a", moto.url, workers=4)


class CallCounter:
    """How many requests of one kind a boto3 client sent (a hook on the real client)."""

    def __init__(self, store: ObjectStore, operation: str) -> None:
        self.keys: list[str] = []
        store.client.meta.events.register(f"before-call.s3.{operation}", self._count)

    def _count(self, params: dict[str, object], **_: object) -> None:
        self.keys.append(str(params.get("url_path", "")))

    @property
    def count(self) -> int:
        return len(self.keys)


def stored_objects(store: ObjectStore) -> dict[str, int]:
    """Key -> size of everything in the store's bucket."""
    found = {}
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.location.bucket):
        for item in page.get("Contents", ()):
            found[item["Key"]] = item["Size"]
    return found

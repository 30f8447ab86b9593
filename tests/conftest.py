"""Shared fixtures: a local S3 (moto), the real server as a subprocess, boto3 clients for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import images
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


def _launch(data_dir: Path, moto: MotoServer, settings: dict[str, Any] | None) -> ServerProcess:
    server = ServerProcess(data_dir, settings, env=moto.environment())
    server.start()
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer) -> Iterator[ServerProcess]:
    """One server for the tests that only need an API; tests must not depend on what others made."""
    process = _launch(tmp_path_factory.mktemp("server"), moto, None)
    yield process
    process.stop()


@pytest.fixture
def make_server(tmp_path: Path, moto: MotoServer) -> Iterator[Callable[..., ServerProcess]]:
    """A server of the test's own, with settings of its own (quotas, access keys, ...)."""
    started: list[ServerProcess] = []

    def make(settings: dict[str, Any] | None = None) -> ServerProcess:
        process = _launch(tmp_path / f"server{len(started)}", moto, settings)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Any:
    return server.client()


def image_request(name: str, **overrides: Any) -> dict[str, Any]:
    """A CreateMicrovmImage request whose artifact is in a bucket that does not exist."""
    return images.image_request(name, "s3://no-such-bucket-openmicrovm/app.zip", **overrides)

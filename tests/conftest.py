"""Shared fixtures: a local S3 (moto), the real server as a subprocess, boto3 clients for it.

Every test that starts a server runs once per database backend, SQLite and PostgreSQL (a private
cluster this session starts on first use): a server fixture or test asks for `database_backend` and
makes its servers with `database_backend.server(...)`. OPENMICROVM_TEST_DATABASES=sqlite (or
postgresql, or cluster; a comma-separated list, all by default) runs the servers' tests on those
backends only."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import images
from tests.support.moto import MotoServer
from tests.support.postgres import PostgresCluster, temporary_cluster
from tests.support.server import DatabaseBackend, ServerProcess

DATABASE_BACKENDS = ("sqlite", "postgresql", "cluster")
# Modules that set CLUSTER_TESTED = True run on a cluster too ("cluster": API replicas and host
# agents on PostgreSQL, tests/support/cluster.py); the others on SQLite and PostgreSQL.
ONE_SERVER_BACKENDS = ("sqlite", "postgresql")


def selected_database_backends() -> list[str]:
    listed = os.environ.get("OPENMICROVM_TEST_DATABASES", "")
    names = [name.strip() for name in listed.split(",") if name.strip()] or list(DATABASE_BACKENDS)
    unknown = sorted(set(names) - set(DATABASE_BACKENDS))
    if unknown:
        raise pytest.UsageError(
            f"OPENMICROVM_TEST_DATABASES: unknown {', '.join(unknown)}; choose among {', '.join(DATABASE_BACKENDS)}"
        )
    return list(dict.fromkeys(names))


def pytest_configure(config: pytest.Config) -> None:
    selected_database_backends()  # a misspelt backend stops the run at once, not every module's collection
    # Each server's database is its backend's choice, written in its settings file: a database URL
    # from the caller's shell must not send the servers (and `openmicrovm cleanup`) anywhere else.
    os.environ.pop("OPENMICROVM_DATABASE_URL", None)
    # Nor may a host's system-wide settings file (/etc/openmicrovm/openmicrovm.toml) reach them.
    os.environ["OPENMICROVM_SYSTEM_CONFIG"] = "/nonexistent/openmicrovm.toml"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Only tests that reach database_backend (through the server fixtures) run per backend; session
    # scope makes pytest run all of one backend's tests before the other's, so that each backend's
    # servers and the PostgreSQL cluster are set up once, not once per alternation.
    if "database_backend" in metafunc.fixturenames:
        names = selected_database_backends()
        if not getattr(metafunc.module, "CLUSTER_TESTED", False):
            names = [name for name in names if name in ONE_SERVER_BACKENDS]
        metafunc.parametrize("database_backend", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """The session's PostgreSQL server, started when a PostgreSQL test first needs it and stopped
    after the session, however it ends (its log is then kept in the session's temp dir, postgres*/).
    Fault tests may stop() or kill() it and start() it again: port, password and data stay."""
    with temporary_cluster(keep_log_in=tmp_path_factory.mktemp("postgres")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def database_backend(request: pytest.FixtureRequest) -> DatabaseBackend:
    """The backend this run of the test is on (its id in the test's name: [sqlite], [postgresql])."""
    name: str = request.param
    if name in ("postgresql", "cluster"):
        # Asked for here rather than as an argument, so that a run without PostgreSQL tests never
        # starts the cluster (nor needs it installed).
        return DatabaseBackend(name, request.getfixturevalue("postgres_cluster"))
    return DatabaseBackend(name)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """One server for the tests that only need an API; tests must not depend on what others made."""
    with database_backend.server(tmp_path_factory.mktemp("server"), env=moto.environment()) as process:
        process.start()
        yield process


@pytest.fixture
def make_server(
    tmp_path: Path, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[Callable[..., ServerProcess]]:
    """A server of the test's own, with settings of its own (quotas, access keys, ...)."""
    numbers = itertools.count()
    with contextlib.ExitStack() as servers:

        def make(settings: dict[str, Any] | None = None) -> ServerProcess:
            process = servers.enter_context(
                database_backend.server(tmp_path / f"server{next(numbers)}", settings, env=moto.environment())
            )
            process.start()
            return process

        yield make


@pytest.fixture
def client(server: ServerProcess) -> Any:
    return server.client()


def image_request(name: str, **overrides: Any) -> dict[str, Any]:
    """A CreateMicrovmImage request whose artifact is in a bucket that does not exist."""
    return images.image_request(name, "s3://no-such-bucket-openmicrovm/app.zip", **overrides)

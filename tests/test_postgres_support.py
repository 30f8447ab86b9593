"""The tests' PostgreSQL cluster (tests/support/postgres.py): fresh databases are separate, a stop
leaves no process behind, and a start after it brings back the same port and data. A cluster of its
own, so that stopping it disturbs no server of the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.support.postgres import PostgresCluster, process_is_running, temporary_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    with temporary_cluster(keep_log_in=tmp_path_factory.mktemp("postgres-support")) as cluster:
        yield cluster


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


def test_fresh_databases_are_separate_and_dropped(cluster: PostgresCluster) -> None:
    first, second = cluster.create_database(), cluster.create_database()
    assert first != second
    with psycopg.connect(first) as connection:
        connection.execute("CREATE TABLE only_in_first (id integer)")
    assert _tables(first) == {"only_in_first"}
    assert _tables(second) == set()

    # A session a server left open does not keep its database from being dropped: it is cut.
    lingering = psycopg.connect(second, autocommit=True)
    try:
        cluster.drop_database(first)
        cluster.drop_database(second)
        with pytest.raises(psycopg.OperationalError):
            lingering.execute("SELECT 1")
    finally:
        lingering.close()
    names = {conninfo_to_dict(url)["dbname"] for url in (first, second)}
    assert not names & cluster.database_names()


def test_stop_leaves_no_process_and_start_brings_back_port_and_data(cluster: PostgresCluster) -> None:
    url = cluster.create_database()
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE kept (value text)")
        connection.execute("INSERT INTO kept VALUES ('before the stop')")
    port, processes = cluster.port, cluster.server_pids()
    assert len(processes) > 1, processes  # the main process and its helpers

    cluster.stop()
    assert not cluster.running
    assert [pid for pid in processes if process_is_running(pid)] == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()

    cluster.start()
    assert cluster.running and cluster.port == port
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT value FROM kept").fetchall() == [("before the stop",)]
    cluster.drop_database(url)


def test_a_killed_cluster_starts_again_with_what_it_acknowledged(cluster: PostgresCluster) -> None:
    url = cluster.create_database()
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE kept (value text)")
        connection.execute("INSERT INTO kept VALUES ('acknowledged')")
    cluster.kill()
    assert not cluster.running
    cluster.start()
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT value FROM kept").fetchall() == [("acknowledged",)]
    cluster.drop_database(url)


def test_the_cluster_directory_is_removed_and_its_log_kept(tmp_path: Path) -> None:
    with temporary_cluster(keep_log_in=tmp_path) as cluster:
        pids = cluster.server_pids()
    assert not cluster.directory.exists()
    assert [pid for pid in pids if process_is_running(pid)] == []
    assert "database system is shut down" in (tmp_path / "postgresql.log").read_text()

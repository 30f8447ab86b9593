"""`openmicrovm serve` refuses a database it cannot use: it says why on stderr, exits non-zero and
never listens, so that a supervisor (systemd, Kubernetes) shows the reason instead of a server that
answers every request with an error."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import selected_database_backends
from tests.support.postgres import PostgresCluster
from tests.support.server import REPO, ServerProcess, free_port, write_settings

# Refusing is quick (one connection attempt, connect timeout 5 s); a hang past this is a bug.
REFUSAL_TIMEOUT = 60.0
# Seen in URLs below: a refusal message must never print it.
PASSWORD = "pw-that-must-not-leak"


@dataclass(frozen=True)
class Refusal:
    returncode: int
    stderr: str
    listened: bool

    def message(self) -> str:
        """The server's own `openmicrovm: ...` line (logging may print other lines before it)."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("openmicrovm: ")]
        assert lines, f"no 'openmicrovm: ' line on stderr:\n{self.stderr}"
        return lines[-1]


def serve_until_exit(data_dir: Path, settings: dict[str, Any]) -> Refusal:
    """Run `openmicrovm serve` on a settings file and wait for it to exit, watching its port all the
    while: a server that listens even for a moment before giving up fails the check."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_settings(data_dir / "settings.toml", settings)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "openmicrovm", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    listened = False
    deadline = time.monotonic() + REFUSAL_TIMEOUT
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the server was still running {REFUSAL_TIMEOUT:g} s after it started")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    listened = True
            except OSError:
                pass
            time.sleep(0.05)
        assert process.stderr is not None
        stderr = process.stderr.read().decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    return Refusal(process.returncode, stderr, listened)


def assert_refused_cleanly(refusal: Refusal) -> str:
    """Exit non-zero without listening and without a traceback; the message line, for more checks."""
    assert refusal.returncode != 0, f"the server exited with 0:\n{refusal.stderr}"
    assert not refusal.listened, "the server listened before refusing its database"
    assert "Traceback" not in refusal.stderr, refusal.stderr
    assert PASSWORD not in refusal.stderr, refusal.stderr
    return refusal.message()


def test_refuses_a_postgresql_server_that_does_not_answer(tmp_path: Path) -> None:
    port = free_port()  # bound a moment ago, then released: nothing listens there
    refusal = serve_until_exit(
        tmp_path / "data", {"database_url": f"postgresql://openmicrovm:{PASSWORD}@127.0.0.1:{port}/state"}
    )
    message = assert_refused_cleanly(refusal)
    assert refusal.returncode == 2
    # Where it tried, and why it failed: what an operator needs to fix it.
    assert f"127.0.0.1:{port}" in message, message
    assert "refused" in message.lower(), message


@pytest.mark.parametrize(
    ("url", "what_is_wrong"),
    [
        (f"postgresql://openmicrovm:{PASSWORD}@127.0.0.1:notaport/state", "notaport"),
        (f"postgresql://openmicrovm:{PASSWORD}@[127.0.0.1/state", "malformed"),
        (f"mysql://openmicrovm:{PASSWORD}@127.0.0.1:3306/state", "mysql"),
        ("redis://127.0.0.1:6379/0", "redis"),
    ],
    ids=["port-not-a-number", "unclosed-bracket", "mysql-scheme", "redis-scheme"],
)
def test_refuses_a_database_url_it_cannot_use(tmp_path: Path, url: str, what_is_wrong: str) -> None:
    refusal = serve_until_exit(tmp_path / "data", {"database_url": url})
    message = assert_refused_cleanly(refusal)
    assert refusal.returncode == 2
    # The message must point at the part of the URL that is wrong, and show the form that works.
    assert what_is_wrong in message, message
    if what_is_wrong in ("mysql", "redis"):
        assert "unsupported" in message and "postgresql://" in message, message
    # Nothing was made in the data dir's place of a database it could not open.
    assert not (tmp_path / "data" / "openmicrovm.db").exists()


@pytest.fixture
def postgres_database(request: pytest.FixtureRequest) -> Iterator[str]:
    if "postgresql" not in selected_database_backends():
        pytest.skip("PostgreSQL is not among OPENMICROVM_TEST_DATABASES")
    # Asked for only now, so that a run on SQLite alone never starts the cluster.
    postgres_cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)


def migrate_once(data_dir: Path, database_url: str | None) -> None:
    """Start a server on the database and stop it, so that its schema is this openmicrovm's."""
    server = ServerProcess(data_dir, database_url=database_url)
    try:
        server.start()
    finally:
        server.stop()


def test_refuses_a_postgresql_database_of_a_newer_schema(tmp_path: Path, postgres_database: str) -> None:
    migrate_once(tmp_path / "first", postgres_database)
    # As if a newer openmicrovm had migrated the shared database since.
    with psycopg.connect(postgres_database, autocommit=True) as connection:
        changed = connection.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'").rowcount
    assert changed == 1

    refusal = serve_until_exit(tmp_path / "second", {"database_url": postgres_database})
    message = assert_refused_cleanly(refusal)
    assert refusal.returncode == 2
    assert "newer" in message and "999" in message, message
    # An older server must leave a newer schema alone, not "migrate" it back.
    with psycopg.connect(postgres_database, autocommit=True) as connection:
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == ("999",)


def test_refuses_a_sqlite_database_of_a_newer_schema(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    migrate_once(data_dir, None)
    database = data_dir / "openmicrovm.db"
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        changed = connection.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'").rowcount
    assert changed == 1

    # The same data dir, with the settings migrate_once's server had: that server, started again.
    refusal = serve_until_exit(data_dir, {"artifact_file_roots": [str(tmp_path)]})
    message = assert_refused_cleanly(refusal)
    assert refusal.returncode == 2
    assert "newer" in message and "999" in message, message
    with contextlib.closing(sqlite3.connect(database)) as connection:
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == ("999",)

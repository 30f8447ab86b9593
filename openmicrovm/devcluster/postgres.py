"""The cluster's PostgreSQL: Debian's server programs, run as the `postgres` account (they refuse
root) on a data directory of the cluster's own, listening on 127.0.0.1 for the replicas and on the
bridge address for the agents, with password (SCRAM) authentication: anyone on the host could
reach those addresses."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from openmicrovm.devcluster import processes
from openmicrovm.devcluster.processes import ManagedProcess
from openmicrovm.devcluster.progress import DevclusterError

ACCOUNT = "postgres"
SUPERUSER = "postgres"
DATABASE = "openmicrovm"
INSTALL_HINT = "PostgreSQL is not installed: run ./install.sh --dev (it installs Debian's postgresql package)"
_DEBIAN_VERSIONS = Path("/usr/lib/postgresql")


def server_programs() -> Path:
    """The directory of initdb and postgres: Debian's newest major version."""
    found = [
        initdb.parent
        for initdb in _DEBIAN_VERSIONS.glob("*/bin/initdb")
        if (initdb.parent / "postgres").exists()
    ]
    if not found:
        raise DevclusterError("the PostgreSQL server programs (initdb, postgres) are missing", INSTALL_HINT)
    return max(found, key=lambda bin_dir: [int(part) for part in re.findall(r"\d+", bin_dir.parent.name)])


def account_can_reach(path: Path) -> bool:
    """Whether the postgres account may pass through every directory down to `path`."""
    try:
        return (
            subprocess.run(["test", "-x", str(path)], user=ACCOUNT, group=ACCOUNT, timeout=10).returncode == 0
        )
    except KeyError:
        raise DevclusterError(f"there is no `{ACCOUNT}` account", INSTALL_HINT) from None


def choose_directory(cluster_dir: Path, cluster_id: str) -> tuple[Path, bool]:
    """Where the server keeps its data: <cluster dir>/postgres when the postgres account can reach
    it, else a new directory in the system's temp dir (pytest's temp dirs are closed to other
    accounts), which stopping the cluster removes. Returns (directory, is_temporary)."""
    if account_can_reach(cluster_dir):
        return cluster_dir / "postgres", False
    directory = Path(tempfile.mkdtemp(prefix=f"openmicrovm-devcluster-{cluster_id}-postgres-"))
    shutil.chown(directory, ACCOUNT, ACCOUNT)
    if not account_can_reach(directory):
        shutil.rmtree(directory, ignore_errors=True)
        raise DevclusterError(
            f"the {ACCOUNT} account can reach neither {cluster_dir} nor {directory.parent}",
            "give a --dir every account may pass through (e.g. under /tmp or /var/tmp)",
        )
    return directory, True


@dataclass
class PostgresServer:
    directory: Path  # owned by the postgres account; the data in directory/data
    port: int
    password: str
    process: ManagedProcess | None = None

    def url(self, host: str = "127.0.0.1", database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{host}:{self.port}/{database}"


def initialize(directory: Path, port: int, client_network: str) -> PostgresServer:
    """initdb a new data directory in `directory` (created), letting in password logins from
    127.0.0.1 and from client_network (the agents' subnet)."""
    bin_dir = server_programs()
    server = PostgresServer(directory, port, secrets.token_hex(16))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise DevclusterError(f"{directory} is not empty: it cannot hold a new PostgreSQL cluster")
    shutil.chown(directory, ACCOUNT, ACCOUNT)
    directory.chmod(0o700)
    # initdb reads the password from a file; this one is in a directory only its account can enter.
    password_file = directory / "initial-password"
    password_file.write_text(server.password + "\n")
    shutil.chown(password_file, ACCOUNT, ACCOUNT)
    try:
        created = subprocess.run(
            [
                str(bin_dir / "initdb"),
                *("--pgdata", str(directory / "data"), "--username", SUPERUSER),
                *("--pwfile", str(password_file), "--auth", "scram-sha-256"),
                # Byte-order text comparison and UTF-8, whatever the host's locale; and no flushes:
                # a devcluster's data does not outlive a crash of the machine.
                *("--no-locale", "--encoding", "UTF8", "--no-sync"),
            ],
            user=ACCOUNT,
            group=ACCOUNT,
            extra_groups=[],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        password_file.unlink(missing_ok=True)
    if created.returncode != 0:
        raise DevclusterError(f"initdb failed in {directory / 'data'}:\n{created.stdout}{created.stderr}")
    with open(directory / "data" / "pg_hba.conf", "a") as hba:
        hba.write(
            f"\n# openmicrovm devcluster: the agents' network\nhost all all {client_network} scram-sha-256\n"
        )
    return server


def start(server: PostgresServer, addresses: list[str], log_path: Path) -> ManagedProcess:
    settings = {
        "listen_addresses": ",".join(addresses),
        "port": str(server.port),
        # TCP only: the system's own cluster keeps its socket in /var/run/postgresql.
        "unix_socket_directories": "",
        # Every replica and agent keeps a pool of connections.
        "max_connections": "300",
        # A devcluster's data does not need to survive a crash of the machine; commits stay
        # synchronous (written to the OS), so a killed server keeps what it acknowledged.
        "fsync": "off",
        "full_page_writes": "off",
    }
    options = [option for key, value in settings.items() for option in ("-c", f"{key}={value}")]
    server.process = processes.start(
        "PostgreSQL",
        [str(server_programs() / "postgres"), "-D", str(server.directory / "data"), *options],
        log_path=log_path,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        cwd=server.directory,
        user=ACCOUNT,
    )
    return server.process


def _accepts_connections(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


async def wait_ready(server: PostgresServer, timeout: float = 120.0) -> None:
    assert server.process is not None
    admin_url = server.url(database="postgres")
    deadline = time.monotonic() + timeout
    last_try = 0.0

    def ready() -> bool:
        # Each try is a blocking connect: at most a few a second.
        nonlocal last_try
        if time.monotonic() - last_try < 0.2:
            return False
        last_try = time.monotonic()
        return _accepts_connections(admin_url)

    await processes.wait_until(
        server.process,
        ready,
        what="ready for connections",
        timeout=max(1.0, deadline - time.monotonic()),
        hint="see the log above; `./install.sh --dev` installs a working PostgreSQL",
    )


async def create_database(server: PostgresServer) -> None:
    def create() -> None:
        # CREATE DATABASE cannot run in a transaction block.
        with psycopg.connect(
            server.url(database="postgres"), autocommit=True, connect_timeout=10
        ) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")

    await asyncio.to_thread(create)


async def stop(process: ManagedProcess) -> None:
    """A fast shutdown (SIGINT: sessions are cut, nothing committed is lost)."""
    await processes.stop(process, signum=signal.SIGINT, grace=30.0)

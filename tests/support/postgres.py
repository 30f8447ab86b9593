"""A private PostgreSQL server for the tests: Debian's postgresql package, run from a directory of
its own on a free 127.0.0.1 port, never the system's cluster. Each server under test gets a fresh
database of it; fault tests may stop (or kill) the cluster and start it again on the same port and
data."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tests.support.server import free_port

# initdb and postgres refuse to run as root: as root, they run as the account Debian's package made.
POSTGRES_ACCOUNT = "postgres"
SUPERUSER = "postgres"
DEBIAN_VERSIONS_ROOT = Path("/usr/lib/postgresql")
INSTALL_HINT = "run `./install.sh --dev` (it installs Debian's postgresql package), or set OPENMICROVM_TEST_DATABASES=sqlite"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server programs are not installed."""


def find_postgres_bin_dir() -> Path:
    """The directory of initdb, pg_ctl and postgres: Debian's newest major version, else the PATH's."""

    def major_version(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))

    debian = [path.parent for path in DEBIAN_VERSIONS_ROOT.glob("*/bin/initdb")]
    if debian:
        return max(debian, key=major_version)
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent
    raise PostgresUnavailable(
        f"the PostgreSQL server (initdb, pg_ctl, postgres) is not installed: {INSTALL_HINT}"
    )


@contextlib.contextmanager
def temporary_cluster(keep_log_in: Path) -> Iterator[PostgresCluster]:
    """A started cluster in a new directory of the system's temp dir; on leaving, it is stopped, its
    log copied into keep_log_in and its directory removed.

    Not under pytest's temp dir: that is private to root, and pytest makes it private again when any
    session starts, so the postgres account could lose its way to its own files mid-run."""
    directory = Path(tempfile.mkdtemp(prefix="openmicrovm-tests-postgres-"))
    try:
        cluster = PostgresCluster(directory)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
            if cluster.log_path.exists():
                shutil.copy(cluster.log_path, keep_log_in / cluster.log_path.name)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class PostgresCluster:
    """One PostgreSQL server: `directory` holds its data, its log and its socket; its port and
    password are chosen once, so stop() and start() bring back the same server with the same data.
    The postgres account must be able to reach `directory` when running as root."""

    def __init__(self, directory: Path, start_timeout: float = 60.0) -> None:
        self.bin_dir = find_postgres_bin_dir()
        self.directory = directory
        self.data_dir = directory / "data"
        self.socket_dir = directory / "socket"
        self.log_path = directory / "postgresql.log"
        self.port = free_port()
        # Password authentication rather than trust: any local user can reach 127.0.0.1, and a
        # superuser can run programs as the postgres account.
        self.password = secrets.token_hex(16)
        self.start_timeout = start_timeout
        self._database_numbers = iter(range(1, 1 << 31))
        self._exit_hook_registered = False
        # As root, the server runs as the postgres account; as anyone else, as that user.
        self._account = pwd.getpwnam(POSTGRES_ACCOUNT) if os.geteuid() == 0 else None

    # ------------------------------------------------------------------ the server

    def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts connections.
        Does nothing if it is running already."""
        if self.running:
            return
        self._prepare_directory()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initialize()
        if not self._exit_hook_registered:
            # The session's fixture stops the cluster even when tests fail or are interrupted; this
            # covers a session that ends without tearing its fixtures down.
            atexit.register(self.stop)
            self._exit_hook_registered = True
        started = self._pg_ctl("start", "-l", str(self.log_path), "-t", str(int(self.start_timeout)))
        if started.returncode != 0:
            self.kill()  # pg_ctl gave up waiting, but the server may still be coming up
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port} (pg_ctl: {started.stdout.strip()}):\n"
                f"{self.log_tail()}"
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown: sessions are cut, committed data is kept); kill it if it
        lingers. Returns once no process of the server is left. Does nothing if it is not running."""
        if not self.running:
            return
        stopped = self._pg_ctl("stop", "-m", "fast", "-t", str(int(timeout)))
        if stopped.returncode != 0 or self.running:
            self.kill()

    def kill(self) -> None:
        """End every process of the server at once (SIGKILL), as a crash would; start() recovers
        (commits it acknowledged are kept)."""
        pids = self.server_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(process_is_running(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL processes {sorted(pids)} survived SIGKILL")
            time.sleep(0.05)
        # A killed server leaves its lock files, naming its pid; a new server refuses to start while
        # that pid exists, and a zombie's does until its parent (here, init) reaps it, which can take
        # a while in a container. Every process of the server has ended, so the locks are stale.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        """The pid of the running server's main process, from the pid file it keeps while it runs."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return None
        if not first_line.isdigit():
            return None
        pid = int(first_line)
        return pid if _is_postgres(pid) else None

    def server_pids(self) -> set[int]:
        """The main process and its children (checkpointer, backends, ...), while it runs."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            return set()
        return {postmaster, *_children_of(postmaster)}

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ databases

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database of a name never used before on this cluster; returns its URL."""
        name = f"openmicrovm_{next(self._database_numbers)}_{secrets.token_hex(3)}"
        self._administer(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database a URL of create_database() names, cutting any session still on it."""
        name = conninfo_to_dict(url)["dbname"]
        self._administer(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def database_names(self) -> set[str]:
        with psycopg.connect(self.url(), connect_timeout=10) as connection:
            rows = connection.execute("SELECT datname FROM pg_database WHERE NOT datistemplate").fetchall()
        return {row[0] for row in rows}

    def _administer(self, statement: sql.Composed) -> None:
        # CREATE and DROP DATABASE cannot run inside a transaction block.
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as connection:
            connection.execute(statement)

    # ------------------------------------------------------------------ set-up

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._account is None:
            return
        for path in (self.directory, self.socket_dir):
            os.chown(path, self._account.pw_uid, self._account.pw_gid)
        self.directory.chmod(0o700)
        closed = [path for path in self.directory.parents if not _may_traverse(path.stat(), self._account)]
        if closed:
            raise RuntimeError(
                f"the {POSTGRES_ACCOUNT} account cannot reach {self.directory} ({closed[0]} is closed to "
                "it): put the cluster in a directory it can pass through, such as one under /tmp"
            )

    def _initialize(self) -> None:
        password_file = self.directory / "initial-password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        if self._account is not None:
            os.chown(password_file, self._account.pw_uid, self._account.pw_gid)
        try:
            created = self._run(
                "initdb",
                "--pgdata",
                str(self.data_dir),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(password_file),
                "--auth",
                "scram-sha-256",
                # Byte-order text comparison, as SQLite's default; UTF-8 for every character.
                "--no-locale",
                "--encoding",
                "UTF8",
                "--no-sync",
            )
        finally:
            password_file.unlink()
        if created.returncode != 0:
            raise RuntimeError(f"initdb failed in {self.data_dir}:\n{created.stdout}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            # Never /var/run/postgresql: the system's cluster keeps its socket there.
            "unix_socket_directories": f"'{self.socket_dir}'",
            # Several servers under test at once, each with a pool of connections.
            "max_connections": "300",
            # Only a crash of the machine needs these, and it loses the test data anyway. Commits stay
            # synchronous (a write to the OS, no flush): a killed server keeps what it acknowledged,
            # as fault tests expect of a real one.
            "fsync": "off",
            "full_page_writes": "off",
        }
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/support/postgres.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _pg_ctl(self, action: str, *options: str) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", action, "--pgdata", str(self.data_dir), "--wait", *options)

    def _run(self, program: str, *arguments: str) -> subprocess.CompletedProcess[str]:
        as_account = ["runuser", "-u", POSTGRES_ACCOUNT, "--"] if self._account is not None else []
        return subprocess.run(
            [*as_account, str(self.bin_dir / program), *arguments],
            # The postgres account may not be allowed into the caller's working directory.
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.start_timeout + 30,
        )


def _may_traverse(status: os.stat_result, account: pwd.struct_passwd) -> bool:
    if status.st_uid == account.pw_uid:
        return bool(status.st_mode & stat.S_IXUSR)
    if status.st_gid in os.getgrouplist(account.pw_name, account.pw_gid):
        return bool(status.st_mode & stat.S_IXGRP)
    return bool(status.st_mode & stat.S_IXOTH)


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def process_is_running(pid: int) -> bool:
    """Whether pid is a process that has not ended (a zombie has: only its parent's wait is due)."""
    fields = _process_stat(pid)
    return fields is not None and fields[0] != "Z"


def _is_postgres(pid: int) -> bool:
    """Whether pid is a running PostgreSQL server, not another process that got a stale pid file's pid."""
    if not process_is_running(pid):
        return False
    try:
        executable = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return Path(executable).name in ("postgres", "postmaster")


def _children_of(parent: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _process_stat(int(entry.name))
            if fields is not None and fields[1] == str(parent):
                yield int(entry.name)

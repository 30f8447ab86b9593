"""PostgreSQL, the store several hosts share: a pool of connections, serializable transactions.

Every transaction runs SERIALIZABLE, so a check-then-write (a quota, a clientToken, a state
compare-and-set) is as safe under concurrent servers as it is on SQLite's single writer; the
store replays a transaction that lost a serialization race. Connections are checked as they
leave the pool, so once the database is back after a restart the next request gets a fresh one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from openmicrovm.store.connection import Row
from openmicrovm.store.errors import StoreError

# Any fixed number: the advisory lock every starting server takes while it migrates.
_MIGRATION_LOCK = 0x6F6D76
log = logging.getLogger("openmicrovm.store")
# A connection whose peer went silent (a cut link drops packets; nothing refuses them) fails within
# seconds rather than after the kernel's retransmissions give up, about 15 minutes.
DEAD_PEER_SETTINGS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # milliseconds unacknowledged before the connection is dropped
}
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)


def _native(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (a literal % doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresConnection:
    backend = "postgresql"

    def __init__(self, connection: psycopg.Connection[Row]) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._connection.execute(_native(sql), params).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._connection.execute(_native(sql), params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._connection.execute(_native(sql), params).fetchall()

    def contains(self, column: str) -> str:
        return f"strpos({column}, ?) > 0"


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


class PostgresBackend:
    name = "postgresql"

    def __init__(self, url: str, pool_size: int, connect_timeout: float) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.description = f"PostgreSQL {describe_url(url)}"
        try:
            urlsplit(url).port  # noqa: B018 -- raises on a port that is not a number
            conninfo_to_dict(url)
        except (ValueError, psycopg.ProgrammingError) as error:
            raise StoreError(
                f"malformed database URL {describe_url(url)}: {error}; the form is "
                "postgresql://user:password@host:port/database"
            ) from None
        # One connection first, so that a refusal says why (the pool only says it timed out).
        try:
            psycopg.connect(url, connect_timeout=max(int(connect_timeout), 1)).close()
        except psycopg.Error as error:
            # psycopg's message spans lines ("... failed: Connection refused", then a hint).
            reason = " ".join(str(error).split()) or type(error).__name__
            raise StoreError(
                f"cannot use the database {describe_url(url)}: {reason} Check that PostgreSQL is "
                "running and reachable, and that the user and database in the URL exist."
            ) from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=connect_timeout,
            kwargs={
                "row_factory": dict_row,
                "connect_timeout": max(int(connect_timeout), 1),
                **DEAD_PEER_SETTINGS,
            },
            configure=self._configure,
            check=ConnectionPool.check_connection,
            name="openmicrovm",
        )
        self._pool.open(wait=True, timeout=connect_timeout)

    @staticmethod
    def _configure(connection: psycopg.Connection[Any]) -> None:
        connection.isolation_level = psycopg.IsolationLevel.SERIALIZABLE

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[PostgresConnection]:
        with self._pool.connection() as connection, connection.transaction():
            yield PostgresConnection(connection)

    def dedicated(self) -> DedicatedConnection:
        """A connection of its own, outside the pool; see DedicatedConnection."""
        return DedicatedConnection(self.url, self.connect_timeout)

    def retryable(self, error: BaseException) -> bool:
        return isinstance(error, _RETRYABLE)

    def unavailable(self, error: BaseException) -> bool:
        # A lost connection, a pool with no connection to give, a server shutting down.
        return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)

    @contextlib.contextmanager
    def migration_lock(self) -> Iterator[None]:
        """Held by one starting server at a time, from before its migration transaction begins: a
        SERIALIZABLE transaction that waited for a lock inside itself would still see the database
        as it was before the other server's migration (its snapshot is older), and migrate again."""
        try:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(int(self.connect_timeout), 1)
            )
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        except psycopg.Error as error:
            raise StoreError(f"cannot prepare the database {self.description}: {error}") from None
        try:
            yield
        finally:
            conn.close()  # the lock is the session's: it goes with the connection

    def ddl(self, statement: str) -> str:
        # SQLite's REAL is an 8-byte float; PostgreSQL's is 4 bytes, too few for epoch seconds.
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)

    def close(self) -> None:
        self._pool.close()


class DedicatedConnection:
    """One connection outside the pool, for work that must get through the moment the database
    is back: a host's lease renewal. After an outage the pool reconnects with a back-off of its
    own (1, 2, 4, 8 s, ...), and its connections may all be held by requests waiting out the
    outage; a renewal stuck behind either lets the lease lapse, and the host fences itself,
    although the database was away for a few seconds only. This one connects again on the next
    transaction after any failure. Used by one thread at a time."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self._url = url
        self._connect_timeout = max(int(connect_timeout), 1)
        self._connection: psycopg.Connection[Row] | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[PostgresConnection]:
        with self._lock:
            if self._connection is None or self._connection.closed:
                self._connection = psycopg.connect(
                    self._url,
                    row_factory=dict_row,
                    connect_timeout=self._connect_timeout,
                    **DEAD_PEER_SETTINGS,
                )
                PostgresBackend._configure(self._connection)
            try:
                with self._connection.transaction():
                    yield PostgresConnection(self._connection)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self.close()  # broken or of unknown state: the next transaction connects afresh
                raise

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(psycopg.Error):
                self._connection.close()
            self._connection = None


class PostgresListener:
    """Wake-ups (NOTIFY) on a few channels, read by one thread on a connection of its own.

    `deliver(channel, payload)` is called on that thread for each one. A wake-up sent while the
    connection was down is lost, so `reconnected()` is called after every (re)connection: the
    receiver then looks at the database for whatever it may have missed."""

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        deliver: Callable[[str, str], None],
        reconnected: Callable[[], None],
        connect_timeout: float,
    ) -> None:
        self._url = url
        self._channels = list(channels)
        self._deliver = deliver
        self._reconnected = reconnected
        self._connect_timeout = max(int(connect_timeout), 1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wakeups", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pause = 0.25
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._url, autocommit=True, connect_timeout=self._connect_timeout, **DEAD_PEER_SETTINGS
                ) as conn:
                    for channel in self._channels:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    pause = 0.25
                    self._reconnected()
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._deliver(note.channel, note.payload)
            except psycopg.Error as error:
                log.warning("listening for wake-ups: %s; connecting again in %.1f s", error, pause)
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, 5.0)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

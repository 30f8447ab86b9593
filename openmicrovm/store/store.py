"""The store: a database URL in, transactions of typed repositories out.

Work on the database is a function of one transaction, `work(tx)`: `transact` runs it in a
transaction, commits, and replays it when PostgreSQL reports that it lost a serialization race
(so `work` must be free of side effects outside the database; `tx.after_commit` defers them
until the commit). A transact inside another joins the outer one. `run` does the same on the
store's worker threads, for the event loop, which must never wait on the database itself.

One exception, measured (bench/bench_api.py): SQLite reads. They come from a read connection of
their own that never waits for a writer and take about a hundred microseconds, less than the
hop to a thread costs, so `reads_inline` lets the API and the endpoint read on the loop. Every
write, and all PostgreSQL work, stays off it; `bind_loop_thread` makes that a checked rule.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from openmicrovm.store.connection import Connection, scalar
from openmicrovm.store.errors import StoreError, StoreUnavailable
from openmicrovm.store.repositories.builds import BuildsRepository
from openmicrovm.store.repositories.client_tokens import ClientTokensRepository
from openmicrovm.store.repositories.hosts import HostsRepository, LeasesRepository
from openmicrovm.store.repositories.images import ImagesRepository
from openmicrovm.store.repositories.log_sources import LogSourcesRepository
from openmicrovm.store.repositories.microvms import MicrovmsRepository
from openmicrovm.store.repositories.settings import MetaRepository, TokenKeysRepository
from openmicrovm.store.repositories.versions import VersionsRepository
from openmicrovm.store.repositories.wakeups import WakeupsRepository
from openmicrovm.store.schema import MIGRATIONS
from openmicrovm.store.sqlite import SqliteBackend, sqlite_path

if TYPE_CHECKING:  # psycopg is imported only when a PostgreSQL URL is used: ~80 ms of a start
    from openmicrovm.store.postgres import PostgresBackend, PostgresListener

log = logging.getLogger("openmicrovm.store")
T = TypeVar("T")
# A transaction that keeps losing races this often is starved, not unlucky.
MAX_ATTEMPTS = 12


def millisecond_clock() -> float:
    """Epoch seconds to the millisecond, the precision AWS timestamps have. Every stored time is
    already what the wire carries, so responses need no conversion."""
    return round(time.time(), 3)


class Tx:
    """One transaction: its repositories, and work to do once it has committed."""

    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.images = ImagesRepository(connection, clock)
        self.versions = VersionsRepository(connection, clock)
        self.builds = BuildsRepository(connection, clock)
        self.microvms = MicrovmsRepository(connection, clock)
        self.client_tokens = ClientTokensRepository(connection)
        self.meta = MetaRepository(connection)
        self.token_keys = TokenKeysRepository(connection)
        self.log_sources = LogSourcesRepository(connection)
        self.hosts = HostsRepository(connection, clock)
        self.leases = LeasesRepository(connection, clock)
        self.wakeups = WakeupsRepository(connection)
        self.committed: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed (never if it rolls back)."""
        self.committed.append(callback)


def _open_backend(url: str, pool_size: int, connect_timeout: float) -> SqliteBackend | PostgresBackend:
    path = sqlite_path(url)
    if path is not None:
        return SqliteBackend(path)
    from openmicrovm.store.postgres import PostgresBackend, describe_url

    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url, pool_size, connect_timeout)
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise StoreError(
        f"unsupported database URL scheme {scheme!r} in {describe_url(url)}: use "
        "sqlite:////path/to/file.db or postgresql://user:password@host:port/database"
    )


class Store:
    def __init__(
        self,
        url: str,
        clock: Callable[[], float] = millisecond_clock,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
    ) -> None:
        self.clock = clock
        self.backend = _open_backend(url, pool_size, connect_timeout)
        self.description = self.backend.description
        self._current = threading.local()
        self._loop_thread: int | None = None
        # PostgreSQL work runs side by side on pooled connections; SQLite's one connection
        # serialises anyway, and a few threads keep reads from queueing behind the loop.
        workers = 4 if isinstance(self.backend, SqliteBackend) else pool_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    @property
    def shared(self) -> bool:
        """Whether several servers may use this database at once (PostgreSQL; SQLite is one
        server's own file)."""
        return not isinstance(self.backend, SqliteBackend)

    def listen(
        self, channels: list[str], deliver: Callable[[str, str], None], reconnected: Callable[[], None]
    ) -> PostgresListener:
        """Receive wake-ups sent on `channels` (Tx.wakeups); PostgreSQL only. See PostgresListener."""
        if isinstance(self.backend, SqliteBackend):
            raise StoreError(f"{self.description} carries no wake-ups: only PostgreSQL does")
        from openmicrovm.store.postgres import PostgresListener

        return PostgresListener(
            self.backend.url, channels, deliver, reconnected, self.backend.connect_timeout
        )

    @property
    def reads_inline(self) -> bool:
        """Whether a read may run on the event loop itself (SQLite; see the module docstring)."""
        return isinstance(self.backend, SqliteBackend)

    def bind_loop_thread(self) -> None:
        """Called on the event loop's thread: from now on a write there (or a PostgreSQL read) is
        a programming error, raised at once rather than stalling every connection."""
        self._loop_thread = threading.get_ident()

    def transact(self, work: Callable[[Tx], T], write: bool = True) -> T:
        """Run work(tx) in a transaction and commit it; see the module docstring."""
        return self._transact(work, write, self.backend.transaction)

    def lane(self) -> Lane:
        """Transactions that wait behind nothing: see Lane."""
        return Lane(self)

    def _transact(
        self,
        work: Callable[[Tx], T],
        write: bool,
        open_transaction: Callable[[bool], AbstractContextManager[Connection]],
    ) -> T:
        outer: Tx | None = getattr(self._current, "tx", None)
        if outer is not None:
            return work(outer)
        if threading.get_ident() == self._loop_thread and (write or not self.reads_inline):
            raise RuntimeError("database work on the event loop: run it with Store.run")
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with open_transaction(write) as connection:
                    tx = Tx(connection, self.clock)
                    self._current.tx = tx
                    try:
                        result = work(tx)
                    finally:
                        self._current.tx = None
            except Exception as error:
                if self.backend.retryable(error) and attempt < MAX_ATTEMPTS:
                    # Back off a little, at random, so that the racers do not collide again.
                    time.sleep(random.uniform(0, 0.002 * attempt))
                    continue
                if self.backend.unavailable(error):
                    raise StoreUnavailable(f"the database is unavailable: {error}") from error
                raise
            for callback in tx.committed:
                callback()
            return result
        raise AssertionError("unreachable")

    def read(self, work: Callable[[Tx], T]) -> T:
        """Like transact, for work that only reads."""
        return self.transact(work, write=False)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Call work(*args) on a store thread (it may transact) and wait for it without blocking
        the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(work, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.backend.close()

    def _migrate(self) -> None:
        def migrate(tx: Tx) -> None:
            tx.connection.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            current = int(scalar(tx.connection, "SELECT value FROM meta WHERE key = 'schema_version'") or 0)
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"the database {self.description} is at schema version {current}, newer than this "
                    f"openmicrovm knows ({len(MIGRATIONS)}): upgrade openmicrovm, or point it at another "
                    "database"
                )
            for version, statements in enumerate(MIGRATIONS[current:], start=current + 1):
                log.info("migrating %s to schema version %d", self.description, version)
                for statement in statements:
                    tx.connection.execute(self.backend.ddl(statement))
                tx.meta.put("schema_version", str(version))

        try:
            with self.backend.migration_lock():
                self.transact(migrate)
        except StoreUnavailable as error:
            raise StoreError(f"cannot prepare the database {self.description}: {error}") from error


def schema_version_of(url: str, connect_timeout: float = 5.0) -> int:
    """The schema version of the database a URL names, read without migrating it (0: empty or
    absent). Raises StoreError with the reason when it cannot be reached; for `doctor`."""
    path = sqlite_path(url)
    if path is not None and path != ":memory:" and not Path(path).exists():
        return 0
    backend = _open_backend(url, 1, connect_timeout)
    try:
        with backend.transaction(write=False) as connection:
            tables = connection.all(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                if backend.name == "sqlite"
                else "SELECT tablename AS name FROM pg_tables WHERE tablename = 'meta'"
            )
            if not tables:
                return 0
            return int(scalar(connection, "SELECT value FROM meta WHERE key = 'schema_version'") or 0)
    finally:
        backend.close()


class Lane:
    """Transactions on a PostgreSQL connection of the lane's own, outside the store's pool and
    its reconnection back-off (see DedicatedConnection): for a host's lease renewal, which must
    land the moment the database is back. On SQLite, the store's own transactions: one file, no
    pool to wait behind."""

    def __init__(self, store: Store) -> None:
        self._store = store
        backend = store.backend
        self._dedicated = None if isinstance(backend, SqliteBackend) else backend.dedicated()

    def transact(self, work: Callable[[Tx], T]) -> T:
        if self._dedicated is None:
            return self._store.transact(work)
        return self._store._transact(work, True, self._dedicated.transaction)

    def close(self) -> None:
        if self._dedicated is not None:
            self._dedicated.close()

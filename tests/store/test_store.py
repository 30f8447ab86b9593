"""The store on both backends: the state machine is the only way a state moves, migrations bring
an old database up to date, concurrent writers cannot both win, and a database the server cannot
use is refused with a message that says why."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.states import MICROVM_MOVES, ImageState, MicrovmState, VersionState, VersionStatus
from openmicrovm.store import Store, StoreError, Tx, schema_version_of
from openmicrovm.store.schema import MIGRATIONS
from tests.support.server import DatabaseBackend, free_port

ACCOUNT, REGION = "000000000000", "us-east-1"


@pytest.fixture
def store_url(database_backend: DatabaseBackend, tmp_path: Path) -> Iterator[str]:
    url = database_backend.create_database() or f"sqlite:///{tmp_path / 'openmicrovm.db'}"
    yield url
    database_backend.drop_database(url if database_backend.cluster is not None else None)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = Store(store_url)
    yield opened
    opened.close()


def _microvm(store: Store, name: str = "vm") -> str:
    microvm_id = f"microvm-{name}"
    store.transact(
        lambda tx: tx.microvms.add(
            microvm_id, ACCOUNT, REGION, "arn:img", "1.0", f"{name}.endpoint", 512, 3600, None, {}
        )
    )
    return microvm_id


def test_a_state_moves_only_along_the_table_and_each_move_is_stamped(store: Store) -> None:
    microvm_id = _microvm(store)
    now = [100.0]
    store.clock = lambda: now[0]  # each transaction's repositories read the store's clock
    # PENDING cannot be suspended: the table has no such move, so nothing is written.
    assert store.transact(lambda tx: tx.microvms.transition(microvm_id, MicrovmState.SUSPENDED)) is None
    running = store.transact(lambda tx: tx.microvms.transition(microvm_id, MicrovmState.RUNNING))
    assert running is not None and running.state is MicrovmState.RUNNING
    assert running.state_changed_at == 100.0
    now[0] = 200.0
    # `expect` narrows the table: a terminate asked for only from SUSPENDED does not happen now.
    refused = store.transact(
        lambda tx: tx.microvms.transition(
            microvm_id, MicrovmState.TERMINATING, expect=[MicrovmState.SUSPENDED]
        )
    )
    assert refused is None
    ended = store.transact(
        lambda tx: tx.microvms.transition(
            microvm_id, MicrovmState.TERMINATED, reason="because", terminated_at=5.0
        )
    )
    assert ended is not None
    assert (ended.state, ended.state_reason, ended.state_changed_at, ended.terminated_at) == (
        MicrovmState.TERMINATED,
        "because",
        200.0,
        5.0,
    )
    # TERMINATED is final: no move leaves it.
    for target in MicrovmState:
        assert store.transact(lambda tx, to=target: tx.microvms.transition(microvm_id, to)) is None


def test_every_state_can_end_and_resuming_is_a_state_of_its_own(store: Store) -> None:
    assert all(
        MicrovmState.TERMINATED in MICROVM_MOVES[state]
        for state in MicrovmState
        if state.wire != "TERMINATED"
    )
    assert MicrovmState.RESUMING.wire == "PENDING" and MicrovmState.SUSPENDED.wire == "SUSPENDED"
    microvm_id = _microvm(store)
    for state in (
        MicrovmState.RUNNING,
        MicrovmState.SUSPENDING,
        MicrovmState.SUSPENDED,
        MicrovmState.RESUMING,
    ):
        assert store.transact(lambda tx, to=state: tx.microvms.transition(microvm_id, to)) is not None
    assert store.read(lambda tx: tx.microvms.state_of(microvm_id)) is MicrovmState.RESUMING


def test_a_rolled_back_transaction_leaves_nothing_and_runs_no_after_commit_work(store: Store) -> None:
    ran: list[str] = []

    def fail(tx: Tx) -> None:
        tx.images.create("arn:half", ACCOUNT, REGION, "half", "id", {})
        tx.after_commit(lambda: ran.append("after"))
        raise RuntimeError("stop half-way")

    with pytest.raises(RuntimeError):
        store.transact(fail)
    assert store.read(lambda tx: tx.images.get("arn:half")) is None and ran == []


def test_latest_versions_follow_every_version_change(store: Store) -> None:
    def setup(tx: Tx) -> None:
        tx.images.create("arn:img", ACCOUNT, REGION, "img", "id", {})
        for _ in range(3):
            tx.versions.add("arn:img", tx.images.take_version_number("arn:img"), {})

    store.transact(setup)
    store.transact(lambda tx: tx.versions.transition("arn:img", 1, VersionState.SUCCESSFUL))
    store.transact(lambda tx: tx.versions.transition("arn:img", 2, VersionState.FAILED))
    image = store.read(lambda tx: tx.images.get("arn:img"))
    # Successful but still INACTIVE: not the latest active one.
    assert image is not None and (image.latest_active_version, image.latest_failed_version) == (None, 2)
    store.transact(lambda tx: tx.versions.set_status("arn:img", 1, VersionStatus.ACTIVE))
    store.transact(lambda tx: tx.versions.transition("arn:img", 2, VersionState.DELETING))
    store.transact(lambda tx: tx.versions.delete("arn:img", 2))
    image = store.read(lambda tx: tx.images.get("arn:img"))
    assert image is not None and (image.latest_active_version, image.latest_failed_version) == (1, None)
    assert store.read(lambda tx: tx.images.transition("arn:img", ImageState.CREATED)) is not None


def test_concurrent_writers_of_one_quota_cannot_both_win(store_url: str) -> None:
    """Ten threads, each its own check-then-insert against a limit of three, at the same moment:
    serializable transactions (PostgreSQL) or the single writer (SQLite) let exactly three in."""
    stores = [Store(store_url) for _ in range(2)]  # two servers sharing one database
    barrier = threading.Barrier(10)
    outcomes: list[bool] = []

    def create(index: int) -> None:
        def attempt(tx: Tx) -> bool:
            if tx.images.count(ACCOUNT, REGION) >= 3:
                return False
            tx.images.create(f"arn:{index}", ACCOUNT, REGION, f"n{index}", str(index), {})
            return True

        barrier.wait()
        outcomes.append(stores[index % 2].transact(attempt))

    try:
        threads = [threading.Thread(target=create, args=(index,)) for index in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == [False] * 7 + [True] * 3
        assert stores[0].read(lambda tx: tx.images.count(ACCOUNT, REGION)) == 3
    finally:
        for opened in stores:
            opened.close()


def test_servers_starting_together_on_an_empty_database_migrate_it_once(store_url: str) -> None:
    """Four servers open one empty database at the same moment (a cluster's agents starting): one
    migrates, the others wait and find it done, none fails on a table that is already there."""
    barrier = threading.Barrier(4)
    opened: list[Store] = []
    failures: list[BaseException] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(Store(store_url))
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == []
        assert {s.read(lambda tx: tx.meta.get("schema_version")) for s in opened} == {str(len(MIGRATIONS))}
    finally:
        for store in opened:
            store.close()


def test_an_old_sqlite_database_is_migrated_and_its_resume_becomes_a_state(tmp_path: Path) -> None:
    path = tmp_path / "openmicrovm.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for statement in MIGRATIONS[0]:
        old.execute(statement)
    old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    # A MicroVM an older openmicrovm was resuming: PENDING with its suspended_at kept.
    old.execute(
        "INSERT INTO microvms (id, account, region, image_arn, image_version, state, endpoint, memory_mib, "
        "started_at, deadline_at, last_activity_at, suspended_at, config) "
        "VALUES ('microvm-old', ?, ?, 'arn:img', '1.0', 'PENDING', 'old.endpoint', 512, 1, 2, 1, 1.5, '{}')",
        (ACCOUNT, REGION),
    )
    old.commit()
    old.close()
    store = Store(f"sqlite:///{path}")
    try:
        microvm = store.read(lambda tx: tx.microvms.get("microvm-old"))
        assert microvm is not None and microvm.state is MicrovmState.RESUMING
        assert store.read(lambda tx: tx.meta.get("schema_version")) == str(len(MIGRATIONS))
    finally:
        store.close()


def test_a_database_the_server_cannot_use_is_refused_with_a_reason(tmp_path: Path, store_url: str) -> None:
    with pytest.raises(StoreError, match="unsupported database URL"):
        Store("mysql://db.example/x")
    with pytest.raises(StoreError, match="malformed database URL"):
        Store("postgresql://user@127.0.0.1:notaport/db")
    with pytest.raises(StoreError, match=r"cannot use the database .*Check that PostgreSQL is running"):
        Store(f"postgresql://user:secret@127.0.0.1:{free_port()}/db", connect_timeout=2)
    try:
        Store(f"postgresql://user:secret@127.0.0.1:{free_port()}/db", connect_timeout=2)
    except StoreError as error:
        assert "secret" not in str(error)  # the password never reaches a message or a log
    newer = Store(store_url)
    try:
        newer.transact(lambda tx: tx.meta.put("schema_version", "999"))
    finally:
        newer.close()
    with pytest.raises(StoreError, match="schema version 999, newer than this openmicrovm"):
        Store(store_url)


def test_doctor_reads_the_schema_version_without_migrating(store_url: str, tmp_path: Path) -> None:
    assert schema_version_of(store_url) == 0  # fresh: doctor created nothing
    assert schema_version_of(store_url) == 0
    Store(store_url).close()
    assert schema_version_of(store_url) == len(MIGRATIONS)
    assert schema_version_of(f"sqlite:///{tmp_path / 'absent' / 'openmicrovm.db'}") == 0
    assert not (tmp_path / "absent").exists()
    with pytest.raises(StoreError, match="Connection refused"):
        schema_version_of(f"postgresql://user@127.0.0.1:{free_port()}/db", connect_timeout=2)

"""The CloudWatch shipper against a CloudWatch Logs server (moto), on a real store and real log
files, driven step by step through an endpoint that goes away and comes back."""

from __future__ import annotations

import asyncio
import datetime
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openmicrovm.logs.cloudwatch import CloudWatchShipper, ShipperSettings
from openmicrovm.logs.store import LogStore
from openmicrovm.store import Store
from tests.logs import store_rows
from tests.logs.tcp_proxy import SwitchableProxy
from tests.support.moto import MotoServer
from tests.support.server import free_port

FAST = ShipperSettings(
    interval_seconds=0.05, max_backoff_seconds=0.2, read_timeout_seconds=2.0, finished_grace_seconds=0.0
)


@pytest.fixture
def clock() -> store_rows.SettableClock:
    return store_rows.SettableClock()


@pytest.fixture
def db(tmp_path: Path, clock: store_rows.SettableClock) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'openmicrovm.db'}", clock=clock)
    yield store
    store.close()


@pytest.fixture
def logs(tmp_path: Path) -> LogStore:
    return LogStore(tmp_path / "logs", 10 * 1024 * 1024, 3)


def _use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def _events(client: Any, group: str, stream: str) -> list[str]:
    messages: list[str] = []
    arguments: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
    while True:
        page = client.get_log_events(**arguments)
        messages += [event["message"] for event in page["events"]]
        if not page["events"] or page["nextForwardToken"] == arguments.get("nextToken"):
            return messages
        arguments["nextToken"] = page["nextForwardToken"]


def _ship_until(shipper: CloudWatchShipper, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the shipper did not get there in time"
        shipper.ship_once()
        time.sleep(0.05)


def _write(logs: LogStore, stream: str, start: int, stop: int) -> list[str]:
    lines = [f"line {index}" for index in range(start, stop)]
    for line in lines:
        logs.append(stream, line)
    return lines


def test_default_names_and_which_streams_ship(
    db: Store, logs: LogStore, moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_endpoint(monkeypatch, moto.url)
    name = f"img-{uuid.uuid4().hex[:8]}"
    custom_group = f"/custom/{name}"
    image_arn, build_id = store_rows.add_image(db, name, {"cloudWatch": {}})
    shipped_vm = store_rows.add_microvm(db, image_arn, {"cloudWatch": {"logGroup": custom_group}})
    named_vm = store_rows.add_microvm(
        db, image_arn, {"cloudWatch": {"logGroup": custom_group, "logStream": "mine"}}
    )
    quiet_vm = store_rows.add_microvm(db, image_arn, None)
    for stream in (
        f"builds/{build_id}",
        f"microvms/{shipped_vm}",
        f"microvms/{named_vm}",
        f"microvms/{quiet_vm}",
    ):
        logs.append(stream, f"hello from {stream}\nsecond line")
    cloudwatch = moto.client("logs")
    shipper = CloudWatchShipper(db, logs, settings=FAST)
    day = datetime.datetime.now(datetime.UTC).strftime("%Y/%m/%d")
    build_stream = f"{day}[1.0]{build_id}"

    def arrived() -> bool:
        try:
            return len(_events(cloudwatch, f"/aws/lambda-microvms/{name}", build_stream)) == 2
        except cloudwatch.exceptions.ResourceNotFoundException:
            return False

    _ship_until(shipper, arrived)
    _ship_until(
        shipper, lambda: len(cloudwatch.describe_log_streams(logGroupName=custom_group)["logStreams"]) == 2
    )
    assert _events(cloudwatch, f"/aws/lambda-microvms/{name}", build_stream) == [
        f"hello from builds/{build_id}",
        "second line",
    ]
    streams = sorted(
        s["logStreamName"] for s in cloudwatch.describe_log_streams(logGroupName=custom_group)["logStreams"]
    )
    assert streams == sorted([f"{day}[1.0]{shipped_vm}", "mine"])
    assert _events(cloudwatch, custom_group, "mine") == [f"hello from microvms/{named_vm}", "second line"]
    # A run without `logging` stays on this host: nothing of it anywhere in CloudWatch.
    groups = [g["logGroupName"] for g in cloudwatch.describe_log_groups()["logGroups"]]
    for group in groups:
        for found in cloudwatch.describe_log_streams(logGroupName=group)["logStreams"]:
            assert quiet_vm not in found["logStreamName"]


def test_endpoint_down_then_back_loses_nothing_and_duplicates_nothing(
    db: Store, logs: LogStore, moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    proxy = SwitchableProxy(moto.port, free_port())
    proxy.start()
    try:
        _use_endpoint(monkeypatch, proxy.url)
        group = f"/outage/{uuid.uuid4().hex[:8]}"
        image_arn, _ = store_rows.add_image(db, f"img-{uuid.uuid4().hex[:8]}", None)
        microvm_id = store_rows.add_microvm(
            db, image_arn, {"cloudWatch": {"logGroup": group, "logStream": "app"}}
        )
        stream = f"microvms/{microvm_id}"
        cloudwatch = moto.client("logs")
        shipper = CloudWatchShipper(db, logs, settings=FAST)

        def count() -> int:
            try:
                return len(_events(cloudwatch, group, "app"))
            except cloudwatch.exceptions.ResourceNotFoundException:
                return 0

        written = _write(logs, stream, 0, 50)
        _ship_until(shipper, lambda: count() == 50)

        proxy.stop()
        written += _write(logs, stream, 50, 120)
        for _ in range(10):  # every attempt fails; the lines wait on disk
            shipper.ship_once()
            time.sleep(0.05)
        assert count() == 50
        assert [line.split(" ", 1)[1] for line in logs.read(stream)] == written

        proxy.start()
        _ship_until(shipper, lambda: count() >= 120)
        # A new shipper (a server restart) continues from the saved offset, not from the start.
        restarted = CloudWatchShipper(db, logs, settings=FAST)
        written += _write(logs, stream, 120, 130)
        _ship_until(restarted, lambda: count() >= 130)
        for _ in range(5):
            restarted.ship_once()
        assert _events(cloudwatch, group, "app") == written
    finally:
        proxy.stop()


def test_a_batch_whose_answer_was_lost_is_not_sent_twice(
    db: Store, logs: LogStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint takes the batch but freezes before answering: the shipper times out, and
    looks for the batch before sending it again."""
    private = MotoServer(tmp_path / "moto.log")
    private.start()
    try:
        _use_endpoint(monkeypatch, private.url)
        image_arn, _ = store_rows.add_image(db, f"img-{uuid.uuid4().hex[:8]}", None)
        microvm_id = store_rows.add_microvm(
            db, image_arn, {"cloudWatch": {"logGroup": "/frozen", "logStream": "s"}}
        )
        stream = f"microvms/{microvm_id}"
        cloudwatch = private.client("logs")
        shipper = CloudWatchShipper(
            db,
            logs,
            settings=ShipperSettings(
                interval_seconds=0.05, max_backoff_seconds=0.2, read_timeout_seconds=1.0
            ),
        )

        def count() -> int:
            try:
                return len(_events(cloudwatch, "/frozen", "s"))
            except cloudwatch.exceptions.ResourceNotFoundException:
                return 0

        written = _write(logs, stream, 0, 10)
        _ship_until(shipper, lambda: count() == 10)

        assert private.process is not None
        private.process.send_signal(signal.SIGSTOP)
        try:
            written += _write(logs, stream, 10, 20)
            shipper.ship_once()  # sends, then gives up waiting for the answer
        finally:
            private.process.send_signal(signal.SIGCONT)
        assert shipper.states.get(stream).uncertain is not None
        # Give the thawed endpoint the time to store what it had received.
        deadline = time.monotonic() + 10
        while count() < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        written += _write(logs, stream, 20, 25)
        _ship_until(shipper, lambda: count() >= 25)
        for _ in range(5):
            shipper.ship_once()
        assert _events(cloudwatch, "/frozen", "s") == written
    finally:
        private.stop()


def test_finished_streams_settle_and_the_background_task_ships(
    db: Store,
    clock: store_rows.SettableClock,
    logs: LogStore,
    moto: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_endpoint(monkeypatch, moto.url)
    group = f"/task/{uuid.uuid4().hex[:8]}"
    _, build_id = store_rows.add_image(db, f"img-{uuid.uuid4().hex[:8]}", {"cloudWatch": {"logGroup": group}})
    stream = f"builds/{build_id}"
    written = _write(logs, stream, 0, 30)
    store_rows.finish_build(db, clock, build_id, time.time() - 60)
    cloudwatch = moto.client("logs")
    shipper = CloudWatchShipper(db, logs, settings=FAST)

    async def ship_in_background() -> None:
        task = asyncio.get_running_loop().create_task(shipper.run())
        try:
            deadline = time.monotonic() + 30
            while not shipper.states.get(stream).done:
                assert time.monotonic() < deadline, "the build's stream never settled"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(ship_in_background())
    found = cloudwatch.describe_log_streams(logGroupName=group)["logStreams"]
    assert len(found) == 1
    assert _events(cloudwatch, group, found[0]["logStreamName"]) == written
    # Settled for good, also for the next shipper (after a restart).
    assert CloudWatchShipper(db, logs, settings=FAST).states.get(stream).done

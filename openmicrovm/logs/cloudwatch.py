"""Ships build and MicroVM logs to CloudWatch Logs for the resources whose `logging` asks for it.

The engines only ever write to the LogStore; this shipper follows the files from a background
task, so a slow or absent log endpoint never holds up a MicroVM or a request. All its blocking
work (store queries, file reads, boto3 calls) runs in a worker thread.

Delivery is at-least-once made exactly-once in practice: the offset after the last accepted
event is written to disk before the next batch is sent, boto3's own retries are off (a retried
PutLogEvents whose first answer was lost would store its events twice), and a batch whose answer
was lost is looked up in the stream before it is sent again.

The endpoint and credentials are the standard AWS ones (AWS_ENDPOINT_URL_CLOUDWATCH_LOGS or
AWS_ENDPOINT_URL, the credential chain); the region is the build's or MicroVM's own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from openmicrovm.config import Settings
from openmicrovm.logs.batches import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, Batch, events_from, plan_batches
from openmicrovm.logs.destinations import LogTarget, find_targets
from openmicrovm.logs.ship_state import ShipState, ShipStateStore
from openmicrovm.logs.store import LogStore
from openmicrovm.store import Store, StoreUnavailable

log = logging.getLogger("openmicrovm.logs.cloudwatch")

# Errors after which the batch may or may not have been stored.
_ANSWER_LOST = (ReadTimeoutError, ConnectionClosedError)
# Errors that mean the endpoint is not there right now; nothing was stored.
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError)
_BUSY_CODES = frozenset({"ThrottlingException", "ServiceUnavailableException", "InternalFailure"})
# Batches sent per stream per cycle before the others get their turn.
_BATCHES_PER_TURN = 8
_SWEEP_EVERY_SECONDS = 300.0
_STOP_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class ShipperSettings:
    interval_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    batch_events: int = MAX_BATCH_EVENTS
    batch_bytes: int = MAX_BATCH_BYTES
    connect_timeout_seconds: float = 3.0
    read_timeout_seconds: float = 15.0
    # A finished build or MicroVM is settled this long after it ended: the engine writes its
    # last line just after it records the final state.
    finished_grace_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ShipperSettings:
        """The settings cloudwatch_* (env OPENMICROVM_CLOUDWATCH_<NAME>), within the service's own
        limits: beyond them every batch would be refused."""
        return cls(
            interval_seconds=settings.cloudwatch_interval_seconds,
            max_backoff_seconds=settings.cloudwatch_max_backoff_seconds,
            batch_events=min(max(settings.cloudwatch_batch_events, 1), MAX_BATCH_EVENTS),
            batch_bytes=min(max(settings.cloudwatch_batch_bytes, 1024), MAX_BATCH_BYTES),
            read_timeout_seconds=settings.cloudwatch_timeout_seconds,
        )


class ShippingObserver(Protocol):
    def log_events_shipped(self, count: int) -> None: ...

    def log_shipping_failed(self) -> None: ...


class _EndpointDown(Exception):
    pass


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0

    def fail(self, interval: float, ceiling: float) -> float:
        self.failures += 1
        delay = min(ceiling, interval * 2 ** min(self.failures, 16))
        self.until = time.monotonic() + delay
        return delay

    def waiting(self) -> bool:
        return time.monotonic() < self.until


class CloudWatchShipper:
    def __init__(
        self,
        store: Store,
        logs: LogStore,
        state_dir: Path | None = None,
        settings: ShipperSettings | None = None,
        observer: ShippingObserver | None = None,
        session_factory: Callable[[], boto3.session.Session] = boto3.session.Session,
    ) -> None:
        self.store = store
        self.logs = logs
        self.settings = settings or ShipperSettings.from_settings(Settings())
        self.states = ShipStateStore(state_dir or logs.root / "cloudwatch")
        self.observer = observer
        self._session_factory = session_factory
        self._session: boto3.session.Session | None = None
        self._clients: dict[str, Any] = {}
        self._region_backoff: dict[str, _Backoff] = {}
        self._target_backoff: dict[str, _Backoff] = {}
        self._last_sweep = time.monotonic()
        self._stopping = threading.Event()

    async def run(self) -> None:
        """The background task: ship, sleep, repeat, until cancelled."""
        self._stopping.clear()
        while True:
            cycle = asyncio.ensure_future(asyncio.to_thread(self.ship_once))
            try:
                delay = await asyncio.shield(cycle)
            except asyncio.CancelledError:
                # Let the worker thread stop between two calls rather than have the store closed
                # under it; a call hanging on a dead endpoint is not waited for long.
                self._stopping.set()
                await asyncio.wait([cycle], timeout=_STOP_WAIT_SECONDS)
                raise
            except StoreUnavailable as error:
                # A database outage: one line per cycle, not a traceback.
                log.warning("shipping logs to CloudWatch waits for the database: %s", error)
                delay = self.settings.interval_seconds
            except Exception:
                log.exception("shipping logs to CloudWatch failed; trying again")
                delay = self.settings.interval_seconds
            await asyncio.sleep(delay)

    # -- one cycle ----------------------------------------------------------------------------
    def ship_once(self) -> float:
        """Ship what is new in every stream that wants CloudWatch; seconds until the next cycle."""
        targets = find_targets(self.store)
        more = False
        for target in targets:
            if self._stopping.is_set():
                return 0.0
            state = self.states.get(target.stream)
            if state.done or self._waiting(target):
                continue
            try:
                more |= self._ship(target, state)
            except _EndpointDown:
                continue
            except NoCredentialsError:
                self._region_failed(target.region, "no AWS credentials are configured for CloudWatch Logs")
            except (ClientError, BotoCoreError) as error:
                self._target_failed(target, error)
        if time.monotonic() - self._last_sweep > _SWEEP_EVERY_SECONDS:
            self._sweep({target.stream for target in targets})
        return 0.0 if more else self.settings.interval_seconds

    def _waiting(self, target: LogTarget) -> bool:
        region = self._region_backoff.get(target.region)
        stream = self._target_backoff.get(target.stream)
        return bool((region and region.waiting()) or (stream and stream.waiting()))

    def _ship(self, target: LogTarget, state: ShipState) -> bool:
        """True when the stream has more to send than one turn allows."""
        if state.uncertain is not None:
            self._settle_uncertain(target, state)
        for _ in range(_BATCHES_PER_TURN):
            if self._stopping.is_set():
                return False
            chunk = self.logs.read_from(target.stream, state.offset, self.settings.batch_bytes)
            if chunk.skipped:
                log.warning(
                    "%s: %d bytes were rotated away before they could be shipped to CloudWatch Logs",
                    target.stream,
                    chunk.skipped,
                )
            batches = plan_batches(events_from(chunk), self.settings.batch_events, self.settings.batch_bytes)
            if not batches:
                self._advance(target, state, chunk.next_offset)
                self._settle_if_finished(target, state, chunk.end_offset)
                return False
            for batch in batches:
                self._put(target, state, batch)
                self._advance(target, state, batch.end_offset)
            if state.offset >= chunk.end_offset:
                self._settle_if_finished(target, state, chunk.end_offset)
                return False
        return True

    def _advance(self, target: LogTarget, state: ShipState, offset: int) -> None:
        if offset != state.offset or state.uncertain is not None:
            self.states.save(target.stream, ShipState(offset=offset, done=state.done))
            state.offset, state.uncertain = offset, None

    def _settle_if_finished(self, target: LogTarget, state: ShipState, end_offset: int) -> None:
        if target.finished_at is None or state.offset < end_offset:
            return
        if time.time() - target.finished_at < self.settings.finished_grace_seconds:
            return
        state.done = True
        self.states.save(target.stream, state)

    # -- talking to CloudWatch Logs -------------------------------------------------------------
    def _client(self, region: str) -> Any:
        client = self._clients.get(region)
        if client is None:
            if self._session is None:
                self._session = self._session_factory()
            client = self._clients[region] = self._session.client(
                "logs",
                region_name=region,
                config=Config(
                    connect_timeout=self.settings.connect_timeout_seconds,
                    read_timeout=self.settings.read_timeout_seconds,
                    retries={"total_max_attempts": 1},
                ),
            )
        return client

    def _put(self, target: LogTarget, state: ShipState, batch: Batch) -> None:
        client = self._client(target.region)
        request = {
            "logGroupName": target.log_group,
            "logStreamName": target.log_stream,
            "logEvents": batch.request_events(),
        }
        try:
            try:
                answer = client.put_log_events(**request)
            except ClientError as error:
                if error.response["Error"]["Code"] != "ResourceNotFoundException":
                    raise
                self._create_destination(client, target)
                answer = client.put_log_events(**request)
        except _UNREACHABLE as error:
            self._region_failed(target.region, f"{client.meta.endpoint_url} is unreachable ({error})")
            raise _EndpointDown from error
        except _ANSWER_LOST as error:
            # It may have been stored: remember to look before sending it again.
            self.states.save(
                target.stream, ShipState(state.offset, state.done, [state.offset, batch.end_offset])
            )
            state.uncertain = [state.offset, batch.end_offset]
            self._region_failed(target.region, f"{client.meta.endpoint_url} did not answer ({error})")
            raise _EndpointDown from error
        except ClientError as error:
            code = error.response["Error"]["Code"]
            if code == "DataAlreadyAcceptedException":
                return
            if code in _BUSY_CODES:
                self._region_failed(target.region, f"CloudWatch Logs is busy ({code})")
                raise _EndpointDown from error
            raise
        self._recovered(target)
        rejected = answer.get("rejectedLogEventsInfo")
        if rejected:
            log.warning("%s: CloudWatch Logs rejected some events: %s", target.stream, rejected)
        if self.observer is not None:
            self.observer.log_events_shipped(len(batch.events))

    def _create_destination(self, client: Any, target: LogTarget) -> None:
        for call, arguments in (
            (client.create_log_group, {"logGroupName": target.log_group}),
            (
                client.create_log_stream,
                {"logGroupName": target.log_group, "logStreamName": target.log_stream},
            ),
        ):
            try:
                call(**arguments)
            except ClientError as error:
                if error.response["Error"]["Code"] != "ResourceAlreadyExistsException":
                    raise

    def _settle_uncertain(self, target: LogTarget, state: ShipState) -> None:
        """Find out whether the batch that got no answer was stored after all."""
        assert state.uncertain is not None
        first, end = state.uncertain
        chunk = self.logs.read_from(target.stream, first, max(end - first, 1))
        events = [event for event in events_from(chunk) if event.end_offset <= end]
        if not events or chunk.skipped:
            self._advance(target, state, state.offset)
            return
        wanted = Counter((event.timestamp_ms, event.message) for event in events)
        client = self._client(target.region)
        arguments: dict[str, Any] = {
            "logGroupName": target.log_group,
            "logStreamName": target.log_stream,
            "startTime": min(stamp for stamp, _ in wanted),
            "endTime": max(stamp for stamp, _ in wanted) + 1,
            "startFromHead": True,
        }
        try:
            for _ in range(100):
                page = client.get_log_events(**arguments)
                for event in page.get("events", []):
                    key = (event["timestamp"], event["message"])
                    if wanted[key] > 0:
                        wanted[key] -= 1
                token = page.get("nextForwardToken")
                if not page.get("events") or token == arguments.get("nextToken") or not +wanted:
                    break
                arguments["nextToken"] = token
        except _UNREACHABLE + _ANSWER_LOST as error:
            self._region_failed(target.region, f"{client.meta.endpoint_url} is unreachable ({error})")
            raise _EndpointDown from error
        except ClientError as error:
            if error.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
        stored = not +wanted
        log.info(
            "%s: the batch that got no answer was %s",
            target.stream,
            "stored; not sending it again" if stored else "not stored; sending it again",
        )
        self._advance(target, state, end if stored else state.offset)

    # -- failures -------------------------------------------------------------------------------
    def _region_failed(self, region: str, why: str) -> None:
        backoff = self._region_backoff.setdefault(region, _Backoff())
        delay = backoff.fail(self.settings.interval_seconds, self.settings.max_backoff_seconds)
        if backoff.failures == 1:
            log.warning(
                "CloudWatch Logs (%s): %s; logs stay on disk and are sent once it is back", region, why
            )
        else:
            log.debug("CloudWatch Logs (%s): %s; next try in %.0f s", region, why, delay)
        if self.observer is not None:
            self.observer.log_shipping_failed()

    def _target_failed(self, target: LogTarget, error: Exception) -> None:
        backoff = self._target_backoff.setdefault(target.stream, _Backoff())
        delay = backoff.fail(self.settings.interval_seconds, self.settings.max_backoff_seconds)
        if backoff.failures == 1:
            log.warning(
                "%s: shipping to CloudWatch Logs group %r stream %r failed: %s; retrying every %.0f s at most",
                target.stream,
                target.log_group,
                target.log_stream,
                error,
                self.settings.max_backoff_seconds,
            )
        else:
            log.debug("%s: shipping failed again (%s); next try in %.0f s", target.stream, error, delay)
        if self.observer is not None:
            self.observer.log_shipping_failed()

    def _recovered(self, target: LogTarget) -> None:
        region = self._region_backoff.pop(target.region, None)
        if region is not None and region.failures:
            log.info("CloudWatch Logs (%s) is reachable again; catching up", target.region)
        self._target_backoff.pop(target.stream, None)

    def _sweep(self, wanted: set[str]) -> None:
        """Drop the state of streams that are gone (their build or MicroVM was deleted)."""
        self._last_sweep = time.monotonic()
        for stream in self.states.streams():
            if stream not in wanted and not self.logs.exists(stream):
                self.states.forget(stream)

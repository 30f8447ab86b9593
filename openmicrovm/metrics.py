"""Prometheus metrics, served at `GET /metrics` in the text exposition format.

Everything lives in one CollectorRegistry of the server's own (not prometheus-client's global
one, so two servers in one process, as in tests, never mix). Counts of resources by state and
snapshot sizes are read from the store at scrape time, so they are right after a restart; event
counters and latency histograms count from the start of this process. The engines and the
endpoint report through the small methods below and never need to know about Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from enum import StrEnum
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from openmicrovm.api.auth import AuthError, SignedRequest, identify
from openmicrovm.api.protocol import error_response
from openmicrovm.config import Settings
from openmicrovm.logs.store import LogStore
from openmicrovm.states import BuildState, ImageState, MicrovmState
from openmicrovm.store import Store

log = logging.getLogger("openmicrovm.metrics")

TRANSITIONS = ("run", "resume", "suspend", "terminate")
# From a warm freeze/thaw (~1 ms) to a cold restore on a busy host (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SNAPSHOT_SIZES = {
    "memory": "memorySnapshotSizeInBytes",
    "disk": "diskSnapshotSizeInBytes",
    "code": "codeInstallSizeInBytes",
}
_STATS_TIMEOUT_SECONDS = 2.0


class SandboxUsage(Protocol):
    """What a driver's `stats(sandbox)` answers (runtime.driver.SandboxStats)."""

    rss_bytes: int
    cpu_seconds: float


# The live sandboxes as (microvm id, sandbox handle), and how to measure one of them.
SandboxLister = Callable[[], Iterable[tuple[str, Any]]]
SandboxStatsReader = Callable[[Any], Awaitable[SandboxUsage]]


class _StoreCollector:
    """Resources by state and snapshot bytes, straight from the store at each scrape."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _by_state(counts: dict[Any, int], states: Iterable[StrEnum], name: str, help_text: str) -> Metric:
        family = GaugeMetricFamily(name, help_text, labels=["state"])
        for state in states:
            family.add_metric([state.value], counts.get(state, 0))
        return family

    def collect(self) -> Iterator[Metric]:
        microvms, builds, images, artifacts = self.store.read(
            lambda tx: (
                tx.microvms.counts_by_state(),
                tx.builds.counts_by_state(),
                tx.images.counts_by_state(),
                tx.builds.all_successful_artifacts(),
            )
        )
        yield self._by_state(microvms, MicrovmState, "openmicrovm_microvms", "MicroVMs by state.")
        yield self._by_state(builds, BuildState, "openmicrovm_builds", "Image builds by state.")
        yield self._by_state(images, ImageState, "openmicrovm_images", "MicroVM images by state.")
        sizes = GaugeMetricFamily(
            "openmicrovm_snapshot_bytes",
            "Bytes of the snapshots of successful builds, by part (memory, disk, code).",
            labels=["kind"],
        )
        for kind, key in _SNAPSHOT_SIZES.items():
            sizes.add_metric([kind], sum(int(found.get(key) or 0) for found in artifacts))
        yield sizes


class _LogCollector:
    def __init__(self, logs: LogStore) -> None:
        self.logs = logs

    def collect(self) -> Iterator[Metric]:
        lines = CounterMetricFamily(
            "openmicrovm_log_lines_written", "Log lines captured, by stream kind.", labels=["kind"]
        )
        written = CounterMetricFamily(
            "openmicrovm_log_bytes_written", "Log bytes captured, by stream kind.", labels=["kind"]
        )
        for kind, count in self.logs.counters.lines.items():
            lines.add_metric([kind], count)
        for kind, count in self.logs.counters.bytes.items():
            written.add_metric([kind], count)
        yield lines
        yield written


class _SandboxCollector:
    """The last measured memory and CPU of each live sandbox (measured just before the scrape)."""

    def __init__(self) -> None:
        self.usage: dict[str, SandboxUsage] = {}

    def collect(self) -> Iterator[Metric]:
        count = GaugeMetricFamily("openmicrovm_sandboxes", "Live sandboxes (running or suspended).")
        count.add_metric([], len(self.usage))
        rss = GaugeMetricFamily(
            "openmicrovm_sandbox_rss_bytes", "Resident memory of a MicroVM's sandbox.", labels=["microvm_id"]
        )
        cpu = CounterMetricFamily(
            "openmicrovm_sandbox_cpu_seconds", "CPU time used by a MicroVM's sandbox.", labels=["microvm_id"]
        )
        for microvm_id, usage in sorted(self.usage.items()):
            rss.add_metric([microvm_id], usage.rss_bytes)
            cpu.add_metric([microvm_id], usage.cpu_seconds)
        yield count
        yield rss
        yield cpu


# MicroVMs whose endpoint traffic is counted at once, at most.
ENDPOINT_TRAFFIC_KEPT = 10_000


class _EndpointTrafficCollector:
    """Each MicroVM's endpoint requests and bytes, until it is terminated (a MicroVM's page in
    the console charts them). Kept per replica: each one counts what it relayed."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def forget(self, microvm_id: str) -> None:
        self.requests.pop(microvm_id, None)
        self.bytes.pop(microvm_id, None)

    def count(self, table: dict[str, int], microvm_id: str, amount: int) -> None:
        if microvm_id not in table and len(table) >= ENDPOINT_TRAFFIC_KEPT:
            # A replica without a host agent never hears of terminations: drop the oldest.
            self.forget(next(iter(table)))
        table[microvm_id] = table.get(microvm_id, 0) + amount

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "openmicrovm_microvm_endpoint_requests",
            "Requests a MicroVM's endpoint answered (MicroVMs not yet terminated).",
            labels=["microvm_id"],
        )
        relayed = CounterMetricFamily(
            "openmicrovm_microvm_endpoint_bytes",
            "Bytes a MicroVM's endpoint relayed, both directions (MicroVMs not yet terminated).",
            labels=["microvm_id"],
        )
        # copy(): the scrape runs on a thread while the event loop counts (atomic under the GIL).
        for microvm_id, count in sorted(self.requests.copy().items()):
            requests.add_metric([microvm_id], count)
        for microvm_id, count in sorted(self.bytes.copy().items()):
            relayed.add_metric([microvm_id], count)
        yield requests
        yield relayed


class Metrics:
    def __init__(
        self,
        store: Store,
        logs: LogStore | None = None,
        sandboxes: SandboxLister | None = None,
        sandbox_stats: SandboxStatsReader | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        if logs is not None:
            self.registry.register(_LogCollector(logs))
        self._sandboxes = sandboxes
        self._sandbox_stats = sandbox_stats
        self._sandbox_collector = _SandboxCollector()
        self._endpoint_traffic = _EndpointTrafficCollector()
        self.registry.register(self._endpoint_traffic)
        if sandboxes is not None and sandbox_stats is not None:
            self.registry.register(self._sandbox_collector)
        self.transitions = Histogram(
            "openmicrovm_microvm_transition_seconds",
            "How long MicroVM operations take, from the request to the new state (run, resume, suspend, terminate).",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.state_changes = Counter(
            "openmicrovm_microvm_state_changes",
            "MicroVM state changes made by the engine, by the state entered.",
            ["state"],
            registry=self.registry,
        )
        self.endpoint_requests = Counter(
            "openmicrovm_endpoint_requests",
            "Requests the MicroVM endpoints answered, by status class (2xx, 4xx, ...).",
            ["code"],
            registry=self.registry,
        )
        self.endpoint_bytes = Counter(
            "openmicrovm_endpoint_bytes",
            "Bytes the MicroVM endpoints relayed, both directions.",
            registry=self.registry,
        )
        self.log_events_shipped_total = Counter(
            "openmicrovm_cloudwatch_events_shipped",
            "Log events CloudWatch Logs accepted.",
            registry=self.registry,
        )
        self.log_shipping_failures = Counter(
            "openmicrovm_cloudwatch_failures",
            "Failed attempts to ship logs to CloudWatch Logs (each is retried later).",
            registry=self.registry,
        )
        # Every label value shows up from the first scrape, so dashboards see zeros, not gaps.
        for kind in TRANSITIONS:
            self.transitions.labels(kind)
        for state in MicrovmState:
            self.state_changes.labels(state.value)
        for code in ("2xx", "3xx", "4xx", "5xx"):
            self.endpoint_requests.labels(code)

    # -- what the engines and the endpoint call ------------------------------------------------
    def observe_transition(self, kind: str, seconds: float) -> None:
        """A MicroVM operation finished: kind is "run", "resume", "suspend" or "terminate"."""
        self.transitions.labels(kind).observe(max(seconds, 0.0))

    def microvm_state_changed(self, microvm_id: str, state: MicrovmState) -> None:
        """Fits MicrovmEngine.listeners."""
        self.state_changes.labels(state.value).inc()
        if state is MicrovmState.TERMINATED:
            self._endpoint_traffic.forget(microvm_id)

    def endpoint_request_served(self, microvm_id: str, status: int) -> None:
        """Fits endpoint.proxy.Counters.on_request: one request answered with `status`."""
        self.endpoint_requests.labels(f"{status // 100}xx").inc()
        self._endpoint_traffic.count(self._endpoint_traffic.requests, microvm_id, 1)

    def endpoint_bytes_relayed(self, microvm_id: str, count: int) -> None:
        """Fits endpoint.proxy.Counters.on_bytes."""
        if count > 0:
            self.endpoint_bytes.inc(count)
            self._endpoint_traffic.count(self._endpoint_traffic.bytes, microvm_id, count)

    def log_events_shipped(self, count: int) -> None:
        """CloudWatchShipper's observer."""
        self.log_events_shipped_total.inc(count)

    def log_shipping_failed(self) -> None:
        self.log_shipping_failures.inc()

    # -- scraping -------------------------------------------------------------------------------
    async def refresh_sandboxes(self) -> None:
        """Measure every live sandbox at once; one that does not answer in time is left out."""
        if self._sandboxes is None or self._sandbox_stats is None:
            return
        reader = self._sandbox_stats
        live = list(self._sandboxes())

        async def measure(sandbox: Any) -> SandboxUsage | None:
            try:
                return await asyncio.wait_for(reader(sandbox), _STATS_TIMEOUT_SECONDS)
            except Exception as error:  # a sandbox going away mid-scrape is normal
                log.debug("no stats for a sandbox: %s", error)
                return None

        results = await asyncio.gather(*(measure(sandbox) for _, sandbox in live))
        self._sandbox_collector.usage = {
            microvm_id: usage
            for (microvm_id, _), usage in zip(live, results, strict=True)
            if usage is not None
        }

    async def exposition(self) -> bytes:
        await self.refresh_sandboxes()
        # The store collector queries the database; keep that off the event loop.
        return await asyncio.to_thread(generate_latest, self.registry)


def metrics_handler(metrics: Metrics, settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler for `GET /metrics`. Authenticated like the API: with access keys
    configured a scrape must be SigV4-signed (service `lambda`, any region), since the figures
    tell what runs on the host; without keys, anyone who may call the API may scrape."""

    async def handle(request: web.Request) -> web.Response:
        try:
            received = await request.read()
            identify(
                settings, SignedRequest(request.method, str(request.url), dict(request.headers), received)
            )
        except AuthError as error:
            status, headers, payload = error_response(error.code, error.message)
            return web.Response(status=status, headers=headers, body=payload)
        body = await metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle

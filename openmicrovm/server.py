"""Wiring: settings → store → service → dispatcher (and this host's agent) → one aiohttp server for
the API and endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import secrets
import signal
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiohttp import web

from openmicrovm.api.app import ControlPlane
from openmicrovm.api.guard import request_guard
from openmicrovm.builder.build_network import cleanup_build_networks
from openmicrovm.cluster.agent import HostAgent
from openmicrovm.cluster.dispatch import Dispatcher
from openmicrovm.cluster.identity import host_id_of
from openmicrovm.cluster.watch import ClusterWatch
from openmicrovm.config import Settings
from openmicrovm.console.route import add_console_routes
from openmicrovm.console.uploads import UPLOAD_ROUTE, make_upload_handler
from openmicrovm.endpoint.backend import EndpointBackend
from openmicrovm.endpoint.front_door import FrontDoor, start_front_door
from openmicrovm.endpoint.hostnames import endpoint_hostname
from openmicrovm.endpoint.proxy import Counters
from openmicrovm.endpoint.shell import shell_handler
from openmicrovm.endpoint.tls import all_regions, server_context, tls_dir
from openmicrovm.lifecycle.timers import Timers
from openmicrovm.logs.cloudwatch import CloudWatchShipper, ShipperSettings
from openmicrovm.logs.route import LOGS_ROUTE, make_logs_handler
from openmicrovm.logs.store import LogStore
from openmicrovm.metrics import Metrics, metrics_handler
from openmicrovm.private_files import private_dir
from openmicrovm.runtime import driver_from_settings
from openmicrovm.runtime.driver import SandboxDriver
from openmicrovm.service import Service
from openmicrovm.store import Store

log = logging.getLogger("openmicrovm.server")
# The catch-all route: the API, and the shell WebSocket of MicroVM endpoint Hosts.
_DISPATCH_ROUTE = "dispatch"
MIN_SECRET_BYTES = 32


def open_store(settings: Settings) -> Store:
    """The store the settings name (SQLite in the data dir unless database_url says otherwise)."""
    return Store(
        settings.effective_database_url,
        pool_size=settings.database_pool_size,
        connect_timeout=settings.database_connect_timeout_seconds,
    )


class DataDirLock:
    """One server (or one `openmicrovm cleanup`) per data dir at a time: two would each think
    they own the same sandboxes."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "server.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        private_dir(self.path.parent, "data dir")  # `cleanup` may be the first to make it
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class DataDirBusy(Exception):
    pass


@dataclass(frozen=True)
class Roles:
    """What one process does. `openmicrovm serve`: both; `serve --no-agent`: an API replica only;
    `openmicrovm agent`: a host agent only. Only a shared database (PostgreSQL) has room for more
    than one process, so the split roles need one."""

    api: bool = True  # the API, endpoint front door, logs and metrics, the cluster watch
    agent: bool = True  # a host agent: builds and sandboxes on this host
    # The agent's relay for other processes (PostgreSQL only): where it listens, and where
    # replicas are told to reach it (default: the address it listens on).
    listen: tuple[str, int] = ("127.0.0.1", 0)
    advertise_url: str = ""


class HostFenced(Exception):
    """The host agent stopped its sandboxes because it lost its lease; restart it to rejoin."""


def cluster_secret(settings: Settings, store: Store) -> bytes:
    """The secret replicas and agents prove to each other: the setting, else one kept in the
    database (which every process of the cluster can already read)."""
    if settings.cluster_secret:
        if len(settings.cluster_secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"cluster_secret must be at least {MIN_SECRET_BYTES} bytes long")
        return settings.cluster_secret.encode()
    return bytes.fromhex(
        store.transact(lambda tx: tx.meta.add_if_absent("cluster_secret", secrets.token_bytes(32).hex()))
    )


class Server:
    def __init__(self, settings: Settings, roles: Roles = Roles()) -> None:
        self.settings = settings
        self.roles = roles
        # 0700: both hold what other users of the host must not read (keys, MicroVM memory, layers).
        private_dir(settings.data_dir, "data dir")
        private_dir(settings.cache_dir, "cache dir")
        self.lock = DataDirLock(settings.data_dir)
        if not self.lock.acquire():
            raise DataDirBusy(f"another openmicrovm server is using the data dir {settings.data_dir}")
        # Whatever fails below (an unusable database, an invalid setting) undoes what was done.
        with contextlib.ExitStack() as undo:
            undo.callback(self.lock.release)
            self.store = open_store(settings)
            undo.callback(self.store.close)
            if not (roles.api and roles.agent) and not self.store.shared:
                raise ValueError(
                    f"an API replica without an agent, or an agent alone, needs a database several "
                    f"processes share (--database-url postgresql://...), not {self.store.description}"
                )
            self.service = Service(self.store, settings)
            self.logs = LogStore(settings.data_dir / "logs", settings.log_max_bytes, settings.log_keep_files)
            secret = cluster_secret(settings, self.store)
            self.driver: SandboxDriver | None = None
            self.agent: HostAgent | None = None
            if roles.agent:
                self.driver = driver_from_settings(settings)
                self.agent = HostAgent(
                    self.service,
                    self.driver,
                    self.logs,
                    host_id_of(settings.data_dir),
                    secret,
                    roles.advertise_url,
                    roles.listen,
                )
            self.dispatcher = Dispatcher(self.service, self.agent, self.logs, secret)
            self.service.builds = self.dispatcher
            self.service.microvms = self.dispatcher
            self.watch = ClusterWatch(self.service, Timers(self.service))
            self.control_plane = ControlPlane(self.service)
            self.endpoints = EndpointBackend(self.service, self.dispatcher)
            self.metrics = Metrics(
                self.store,
                self.logs,
                sandboxes=self.agent.microvms.live_sandboxes if self.agent else None,
                sandbox_stats=self.driver.stats if self.driver else None,
            )
            if self.agent is not None:
                self.agent.microvms.listeners.append(self.metrics.microvm_state_changed)
                self.agent.microvms.transition_observers.append(self.metrics.observe_transition)
            self.shipper = CloudWatchShipper(
                self.store, self.logs, settings=ShipperSettings.from_settings(settings), observer=self.metrics
            )
            self.endpoint_counters = Counters(
                on_bytes=self.metrics.endpoint_bytes_relayed, on_request=self.metrics.endpoint_request_served
            )
            # Every route below is behind the guard: Hosts that name this server only, and no
            # request a web page could send cross-site (api/guard.py).
            self.app = web.Application(
                client_max_size=settings.max_request_bytes,
                middlewares=[request_guard(settings, endpoint_hostname, endpoint_routes={_DISPATCH_ROUTE})],
            )
            # Before the catch-all: aiohttp tries routes in the order they were added.
            self.app.router.add_get(
                LOGS_ROUTE, make_logs_handler(self.service, self.logs, self.dispatcher.read_log)
            )
            self.app.router.add_get("/metrics", metrics_handler(self.metrics, settings))
            self.app.router.add_post(UPLOAD_ROUTE, make_upload_handler(settings))
            add_console_routes(self.app, settings.cache_dir)
            # [\s\S]: a path may hold an encoded line break, which '.' would not match.
            self.app.router.add_route("*", r"/{tail:[\s\S]*}", self.dispatch, name=_DISPATCH_ROUTE)
            self._background: list[asyncio.Task[None]] = []
            self._runner: web.AppRunner | None = None
            self._listener: asyncio.Server | None = None
            self._front_door: FrontDoor | None = None
            self._tls_listener: asyncio.Server | None = None
            undo.pop_all()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if endpoint_hostname(request.host) is not None:
            # Endpoint traffic is proxied by the front door; only the shell WebSocket comes here.
            return await shell_handler(self.endpoints, request)
        return await self.control_plane.handle(request)

    def describe(self) -> list[str]:
        lines = [
            f"data dir {self.settings.data_dir}",
            f"state in {self.store.description}",
            f"sandbox driver: {self.driver.name}" if self.driver else "no host agent (--no-agent)",
        ]
        if self.agent is not None and self.store.shared:
            lines.append(f"host agent {self.agent.host_id}")
        if self.settings.signature_required:
            lines.append(f"SigV4 required: {len(self.settings.access_keys)} access key(s) configured")
        else:
            lines.append(
                "no access keys configured: any access key is accepted and maps to account "
                f"{self.settings.default_account} (configure [[access_keys]] to require SigV4)"
            )
        return lines

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.service.bind_loop(loop)
        if self.agent is not None:
            # Build networks a crashed server left behind (live builds of other servers are kept).
            await cleanup_build_networks()
            await self.agent.start()
            self._background.append(loop.create_task(self.shipper.run()))
        if not self.roles.api:
            return
        await self.dispatcher.resume_deletions()
        self._background.append(loop.create_task(self.watch.run()))
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._listener, self._front_door = await start_front_door(
            self._runner, self.endpoints, self.endpoint_counters, self.settings.host, self.settings.port
        )
        if self.settings.tls_port:
            context = server_context(
                tls_dir(self.settings.data_dir), all_regions(self.settings.default_region)
            )
            self._tls_listener = await loop.create_server(
                self._front_door.protocol,
                self.settings.host,
                self.settings.tls_port,
                ssl=context,
                reuse_address=True,
            )

    async def close(self) -> None:
        for listener in (self._listener, self._tls_listener):
            if listener is not None:
                listener.close()
        if self._front_door is not None:
            await self._front_door.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.roles.api:
            with suppress(Exception):  # the database may be away: the lease then simply lapses
                await self.service.run(self.watch.release)
        await self.dispatcher.close()
        if self.agent is not None:
            await self.agent.close()
        if self.driver is not None:
            await self.driver.close()
        self.logs.close()
        self.store.close()
        self.lock.release()


async def serve(settings: Settings, roles: Roles = Roles()) -> None:
    server = Server(settings, roles)
    for line in server.describe():
        log.info(line)
    await server.start()
    if roles.api:
        print(f"openmicrovm listening on http://{settings.host}:{settings.port}", flush=True)
    if roles.api and settings.tls_port:
        print(
            f"openmicrovm listening on https://{settings.host}:{settings.tls_port} "
            f"(CA: {tls_dir(settings.data_dir) / 'ca.pem'})",
            flush=True,
        )
    if server.agent is not None and not roles.api:
        print(
            f"openmicrovm agent {server.agent.host_id} listening on {server.agent.advertise_url}", flush=True
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    waits = [loop.create_task(stop.wait())]
    if server.agent is not None:
        waits.append(loop.create_task(server.agent.fenced.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
        await server.close()
    if server.agent is not None and server.agent.fenced.is_set():
        raise HostFenced(f"host {server.agent.host_id} fenced itself: {server.agent.fence_reason}")

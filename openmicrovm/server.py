"""Wiring: settings → store → service → engines → one aiohttp server for the API and endpoints."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import suppress

from aiohttp import web

from openmicrovm.api.app import ControlPlane
from openmicrovm.config import Settings
from openmicrovm.service import Service
from openmicrovm.store.db import Database

log = logging.getLogger("openmicrovm.server")


def database_url(settings: Settings) -> str:
    return f"sqlite:///{settings.data_dir / 'openmicrovm.db'}"


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(database_url(settings))
        self.service = Service(self.db, settings)
        self.control_plane = ControlPlane(self.service)
        self.app = web.Application(client_max_size=settings.max_request_bytes)
        self.app.router.add_route("*", "/{tail:.*}", self.dispatch)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        return await self.control_plane.handle(request)

    def describe(self) -> list[str]:
        lines = [f"data dir {self.settings.data_dir}"]
        if self.settings.signature_required:
            lines.append(f"SigV4 required: {len(self.settings.access_keys)} access key(s) configured")
        else:
            lines.append(
                "no access keys configured: any access key is accepted and maps to account "
                f"{self.settings.default_account} (configure [[access_keys]] to require SigV4)"
            )
        return lines

    async def start(self) -> web.AppRunner:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        return runner

    async def close(self) -> None:
        self.db.close()


async def serve(settings: Settings) -> None:
    server = Server(settings)
    runner = await server.start()
    for line in server.describe():
        log.info(line)
    print(f"openmicrovm listening on http://{settings.host}:{settings.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await server.close()

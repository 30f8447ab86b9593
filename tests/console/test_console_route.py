"""The console's route on its own (aiohttp, no openmicrovm server): where it looks for the pinned
assets, and what it refuses to serve."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from openmicrovm.config import default_cache_dir
from openmicrovm.console import vendor
from openmicrovm.console.route import add_console_routes


async def _fetch_all(cache_dir: Path, paths: list[str]) -> list[int]:
    app = web.Application()
    add_console_routes(app, cache_dir)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for path in paths:
                async with session.get(f"http://127.0.0.1:{port}{path}") as answer:
                    statuses.append(answer.status)
            return statuses
    finally:
        await runner.cleanup()


@pytest.mark.skipif(
    bool(vendor.missing(default_cache_dir())), reason="xterm.js is not installed (./install.sh)"
)
def test_assets_in_the_default_cache_dir_serve_a_server_with_another(tmp_path: Path) -> None:
    # A system service names its own cache dir after install.sh fetched into the default one.
    statuses = asyncio.run(
        _fetch_all(
            tmp_path / "service-cache", ["/console/vendor/xterm/xterm.js", "/console/vendor/xterm/nope.js"]
        )
    )
    assert statuses == [200, 404]


def test_only_listed_files_are_served(tmp_path: Path) -> None:
    statuses = asyncio.run(
        _fetch_all(tmp_path, ["/console/", "/console/app.js", "/console/model.json", "/console/../route.py"])
    )
    assert statuses == [200, 200, 200, 404]

"""`openmicrovm cleanup`: stop every sandbox of a data dir while its server is not running.

MicroVMs outlive a server stop on purpose (the next start re-adopts them). This is the way to
really stop them all: each live MicroVM is marked TERMINATED with a reason that says why, and
every sandbox, network namespace and cgroup of the data dir is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from openmicrovm.config import Settings, load_settings
from openmicrovm.server import DataDirLock, open_store
from openmicrovm.store import StoreError

REASON = "Terminated by `openmicrovm cleanup` while the server was stopped."
NETWORK_SETTINGS = ("egress_allow_networks", "sandbox_subnet", "build_egress_deny", "microvm_egress_deny")


async def _cleanup(settings: Settings) -> tuple[int, list[str]]:
    from openmicrovm.cluster.identity import host_id_of
    from openmicrovm.runtime import driver_from_settings
    from openmicrovm.service import microvms
    from openmicrovm.service.core import Service

    host_id = host_id_of(settings.data_dir)
    store = open_store(settings)
    try:
        service = Service(store, settings)
        # This data dir's host only: on a shared database, other hosts' MicroVMs are theirs.
        store.transact(lambda tx: tx.microvms.adopt_unplaced(host_id))
        live = [microvm.id for microvm in store.read(lambda tx: tx.microvms.live(host_id))]
        for microvm_id in live:
            microvms.mark_terminated(service, microvm_id, REASON)
    finally:
        store.close()
    # Configured as the server configures it, but for what sandboxes may reach, which removing
    # them does not need: a network setting that stops `serve` must not stop the cleanup.
    defaults = Settings()
    driver = driver_from_settings(
        replace(
            settings,
            **{name: getattr(defaults, name) for name in NETWORK_SETTINGS},
        )
    )
    removed = await driver.cleanup_strays(set())
    return len(live), removed


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, {"data_dir": args.data_dir})
    if not settings.database_url and not (settings.data_dir / "openmicrovm.db").exists():
        print(f"openmicrovm cleanup: {settings.data_dir} holds no openmicrovm data", file=sys.stderr)
        return 0
    lock = DataDirLock(settings.data_dir)
    if not lock.acquire():
        print(
            f"openmicrovm cleanup: a server is running on {settings.data_dir}; stop it first", file=sys.stderr
        )
        return 1
    try:
        terminated, removed = asyncio.run(_cleanup(settings))
    except StoreError as error:
        print(f"openmicrovm cleanup: {error}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    print(f"terminated {terminated} MicroVM(s); removed {len(removed)} sandbox(es)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cleanup = commands.add_parser("cleanup", help="stop every sandbox of a data dir (server stopped)")
    cleanup.add_argument("--data-dir", type=Path, help="the data dir (default ~/.local/share/openmicrovm)")
    cleanup.add_argument("--config", type=Path, help="settings file (default <data dir>/settings.toml)")
    cleanup.set_defaults(run=_run)

"""`openmicrovm serve`: run the server."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from openmicrovm.config import load_settings


def _serve(args: argparse.Namespace) -> int:
    from openmicrovm.server import serve

    try:
        settings = load_settings(
            args.config,
            {
                "host": args.host,
                "port": args.port,
                "data_dir": args.data_dir,
                "driver": args.driver,
                "database_url": args.database_url,
            },
        )
    except ValueError as error:
        print(f"openmicrovm: {error}", file=sys.stderr)
        return 2
    from openmicrovm.builder.build_network import EgressSettingError
    from openmicrovm.server import DataDirBusy
    from openmicrovm.store import StoreError

    try:
        asyncio.run(serve(settings))
    except DataDirBusy as error:
        print(f"openmicrovm: {error}; stop it, or give this one another --data-dir", file=sys.stderr)
        return 1
    except StoreError as error:  # the database cannot be used: say why before listening
        print(f"openmicrovm: {error}", file=sys.stderr)
        return 2
    except EgressSettingError as error:  # raised while the server is made, before it listens
        print(f"openmicrovm: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"openmicrovm: cannot serve on {settings.host}:{settings.port}: {error}", file=sys.stderr)
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser("serve", help="run the server (API and MicroVM endpoints)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 4599)")
    serve.add_argument("--data-dir", type=Path, help="where state lives (default ~/.local/share/openmicrovm)")
    serve.add_argument(
        "--driver", choices=["auto", "gvisor", "process"], help="sandbox driver (default auto)"
    )
    serve.add_argument(
        "--database-url",
        help="postgresql://user:password@host:port/database (default: SQLite in the data dir)",
    )
    serve.add_argument("--config", type=Path, help="settings file (default <data dir>/settings.toml)")
    serve.set_defaults(run=_serve)

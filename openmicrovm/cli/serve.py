"""`openmicrovm serve`: run the server (an API replica, with a host agent unless --no-agent);
`openmicrovm agent`: run a host agent alone, for a cluster on PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from openmicrovm.config import load_settings


def _serve(args: argparse.Namespace) -> int:
    from openmicrovm.server import Roles

    return _run(args, Roles(agent=not args.no_agent))


def _agent(args: argparse.Namespace) -> int:
    from openmicrovm.server import Roles

    advertise = urlsplit(args.advertise_url)
    try:
        port = advertise.port
    except ValueError:
        port = None
    if advertise.scheme != "http" or not advertise.hostname or not port or advertise.path not in ("", "/"):
        print(
            f"openmicrovm agent: --advertise-url must be http://IP:PORT, not {args.advertise_url!r}",
            file=sys.stderr,
        )
        return 2
    listen = (advertise.hostname, port)
    if args.listen:
        host, _, listen_port = args.listen.rpartition(":")
        if not host or not listen_port.isdigit():
            print(f"openmicrovm agent: --listen must be IP:PORT, not {args.listen!r}", file=sys.stderr)
            return 2
        listen = (host.strip("[]"), int(listen_port))
    return _run(args, Roles(api=False, listen=listen, advertise_url=f"http://{advertise.netloc}"))


def _run(args: argparse.Namespace, roles: Any) -> int:
    from openmicrovm.server import serve

    try:
        settings = load_settings(
            args.config,
            {
                "host": getattr(args, "host", None),
                "port": getattr(args, "port", None),
                "data_dir": args.data_dir,
                "driver": args.driver,
                "database_url": args.database_url,
            },
        )
    except ValueError as error:
        print(f"openmicrovm: {error}", file=sys.stderr)
        return 2
    from openmicrovm.hostnet.errors import EgressSettingError
    from openmicrovm.server import DataDirBusy, HostFenced
    from openmicrovm.store import StoreError

    try:
        asyncio.run(serve(settings, roles))
    except HostFenced as error:
        print(f"openmicrovm: {error}; start it again to rejoin the cluster", file=sys.stderr)
        return 75  # EX_TEMPFAIL: a supervisor (systemd, Kubernetes, devcluster) restarts it
    except ValueError as error:  # a setting that cannot work (roles without a shared database, ...)
        print(f"openmicrovm: {error}", file=sys.stderr)
        return 2
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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="where state lives (default ~/.local/share/openmicrovm)"
    )
    parser.add_argument(
        "--database-url",
        help="postgresql://user:password@host:port/database (default: SQLite in the data dir)",
    )
    parser.add_argument("--config", type=Path, help="settings file (default <data dir>/settings.toml)")


DRIVER_HELP = "sandbox driver: auto (the default), or one `openmicrovm doctor` lists"


def _driver_name(text: str) -> str:
    """A driver the registry knows (read only when --driver is given: it loads every driver)."""
    from openmicrovm.runtime.registry import AUTO, driver_names

    if text not in (AUTO, *driver_names()):
        raise argparse.ArgumentTypeError(f"choose {AUTO}, {', '.join(driver_names())}")
    return text


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser("serve", help="run the server (API and MicroVM endpoints)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 4599)")
    serve.add_argument("--driver", type=_driver_name, help=DRIVER_HELP)
    serve.add_argument(
        "--no-agent",
        action="store_true",
        help="hold no sandboxes: an API replica of a cluster whose host agents run elsewhere (PostgreSQL only)",
    )
    _common(serve)
    serve.set_defaults(run=_serve)

    agent = commands.add_parser(
        "agent", help="run a host agent: builds and sandboxes for a cluster (PostgreSQL)"
    )
    agent.add_argument(
        "--advertise-url", required=True, help="http://IP:PORT where API replicas reach this agent"
    )
    agent.add_argument("--listen", help="IP:PORT to listen on (default: the advertise URL's)")
    agent.add_argument("--driver", type=_driver_name, help=DRIVER_HELP)
    _common(agent)
    agent.set_defaults(run=_agent)

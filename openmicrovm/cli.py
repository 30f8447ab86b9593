"""The `openmicrovm` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from openmicrovm.config import load_settings


def _serve(args: argparse.Namespace) -> int:
    from openmicrovm.server import serve

    try:
        settings = load_settings(
            args.config,
            {"host": args.host, "port": args.port, "data_dir": args.data_dir, "driver": args.driver},
        )
    except ValueError as error:
        print(f"openmicrovm: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except OSError as error:
        print(f"openmicrovm: cannot serve on {settings.host}:{settings.port}: {error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmicrovm", description="Self-hosted AWS Lambda MicroVMs.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (API and MicroVM endpoints)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 4599)")
    serve.add_argument("--data-dir", type=Path, help="where state lives (default ~/.local/share/openmicrovm)")
    serve.add_argument(
        "--driver", choices=["auto", "gvisor", "process"], help="sandbox driver (default auto)"
    )
    serve.add_argument("--config", type=Path, help="settings file (default <data dir>/settings.toml)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise SystemExit(args.run(args))

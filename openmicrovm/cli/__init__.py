"""The `openmicrovm` command: one module per group of verbs, each adding its own subcommands."""

from __future__ import annotations

import argparse
import logging

from openmicrovm.cli import cleanup, deploy, doctor, endpoint, images, logs, microvms, serve, tls

COMMAND_MODULES = [serve, deploy, images, microvms, logs, doctor, endpoint, cleanup, tls]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmicrovm", description="Self-hosted AWS Lambda MicroVMs.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from openmicrovm.runtime.proc import prefer_pidfd_child_watcher

    prefer_pidfd_child_watcher()
    raise SystemExit(args.run(args))

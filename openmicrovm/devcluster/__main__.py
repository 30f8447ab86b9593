"""`python -m openmicrovm.devcluster up|down`: see the package's docstring."""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from pathlib import Path

from openmicrovm.devcluster.cluster import UpOptions, run_up
from openmicrovm.devcluster.down import run_down
from openmicrovm.devcluster.progress import DevclusterError

_SETTING_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def setting(text: str) -> tuple[str, str]:
    """--setting KEY=VALUE: the environment variable OPENMICROVM_<KEY> for every role."""
    key, equals, value = text.partition("=")
    if not equals or not _SETTING_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. min_idle_seconds=1)")
    return f"OPENMICROVM_{key.upper()}", value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openmicrovm.devcluster",
        description="A local many-host openmicrovm cluster: PostgreSQL, S3, API replicas, host agents in "
        "network namespaces. Needs root.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up",
        help="start a cluster and run it until SIGTERM/Ctrl-C",
        description="Prints `s3 URL`, `artifacts s3://BUCKET`, `replica URL` (each), `agent URL ...` (each), "
        "`state D/cluster.json`, and `endpoint URL` last, once everything is ready.",
    )
    up.add_argument(
        "--dir", type=Path, required=True, help="a new or empty directory for data, logs, cluster.json"
    )
    up.add_argument(
        "--hosts", type=positive, default=3, help="host agents, each in its own namespace (default 3)"
    )
    up.add_argument("--replicas", type=positive, default=2, help="API replicas (default 2)")
    up.add_argument(
        "--lease-seconds",
        type=float,
        default=10.0,
        help="agents' host lease (OPENMICROVM_HOST_LEASE_SECONDS, default 10)",
    )
    up.add_argument(
        "--setting",
        type=setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="OPENMICROVM_<KEY>=VALUE for every replica and agent (repeatable)",
    )
    up.add_argument(
        "--subnet",
        type=ipaddress.IPv4Network,
        help="the agents' /24 (default: a free one of 10.251.0.0/16)",
    )
    up.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds each replica and agent may take to be ready (default 300)",
    )
    down = commands.add_parser("down", help="stop the cluster of a directory (after a killed `up`)")
    down.add_argument("--dir", type=Path, required=True, help="the --dir given to `up`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory: Path = args.dir.resolve()
    try:
        if args.command == "up":
            return run_up(
                UpOptions(
                    directory=directory,
                    hosts=args.hosts,
                    replicas=args.replicas,
                    lease_seconds=args.lease_seconds,
                    settings=dict(args.setting),
                    subnet=args.subnet,
                    start_timeout=args.start_timeout,
                )
            )
        return run_down(directory)
    except DevclusterError as error:
        print(f"devcluster: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

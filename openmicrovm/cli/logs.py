"""`openmicrovm logs ID [--follow]`: a build's or a MicroVM's log, from the server's logs route.

MicroVM ids start with "microvm-"; anything else is taken for a build id (`--build` /
`--microvm` say which when guessing is not wanted).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from openmicrovm.cli.connection import CliError, Connection, ServerError, add_connection_arguments, connect
from openmicrovm.cli.output import cli_command, warn
from openmicrovm.logs.store import split_line

LOGS_PATH = "/_openmicrovm/logs/{kind}/{id}"
FOLLOW_WAIT_SECONDS = 5


@dataclass
class LogPage:
    lines: list[str]
    finished: bool
    logging_disabled: bool
    skipped_bytes: int
    state: str
    end_offset: int


@dataclass
class LogReader:
    """Reads one stream from where the last read stopped."""

    connection: Connection
    kind: str  # "builds" or "microvms"
    resource_id: str
    offset: int = 0

    def read(self, wait: float = 0) -> LogPage:
        query: dict[str, Any] = {"after": self.offset}
        if wait:
            query["wait"] = wait
        answer = self.connection.get_json(
            LOGS_PATH.format(kind=self.kind, id=self.resource_id), query, timeout=wait + 30
        )
        self.offset = int(answer["nextOffset"])
        return LogPage(
            lines=list(answer["lines"]),
            finished=bool(answer["finished"]),
            logging_disabled=bool(answer.get("loggingDisabled")),
            skipped_bytes=int(answer.get("skippedBytes") or 0),
            state=str(answer.get("state") or ""),
            end_offset=int(answer.get("endOffset") or self.offset),
        )


def kind_of(identifier: str, args: argparse.Namespace) -> str:
    if args.build:
        return "builds"
    if args.microvm or identifier.startswith("microvm-"):
        return "microvms"
    return "builds"


def _emit(lines: list[str], as_json: bool) -> None:
    for line in lines:
        if as_json:
            at, message = split_line(line)
            print(json.dumps({"timestamp": at, "message": message}))
        else:
            print(line)
    sys.stdout.flush()


@cli_command
def _logs(args: argparse.Namespace) -> int:
    reader = LogReader(connect(args), kind_of(args.id, args), args.id)
    noted = False
    end: int | None = None
    while True:
        try:
            page = reader.read(wait=FOLLOW_WAIT_SECONDS if args.follow else 0)
        except ServerError as error:
            if error.code == "ResourceNotFoundException":
                raise CliError(
                    f"no {'build' if reader.kind == 'builds' else 'MicroVM'} with id {args.id}"
                ) from None
            if error.code == "UnknownOperationException":
                raise CliError(f"the server at {args.endpoint_url} does not serve logs (too old?)") from None
            raise
        if not noted:
            noted = True
            if page.logging_disabled:
                warn(f"logging is disabled for {args.id}: nothing was kept")
        if page.skipped_bytes:
            warn(f"{page.skipped_bytes} bytes of older output were rotated away")
        _emit(page.lines, args.output == "json")
        if not args.follow:
            # Everything that was there when we started, however many pages that takes.
            end = page.end_offset if end is None else end
            if not page.lines or reader.offset >= end:
                return 0
        elif not page.lines and page.finished:
            return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    logs = commands.add_parser(
        "logs",
        help="show a build's or a MicroVM's log",
        description="Show the log of a build (build output) or a MicroVM (lifecycle events and app output). "
        "With --output json, one JSON object per line.",
    )
    logs.add_argument("id", metavar="ID", help="MicroVM id (microvm-...) or build id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until it ends")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--build", action="store_true", help="ID is a build id")
    which.add_argument("--microvm", action="store_true", help="ID is a MicroVM id")
    add_connection_arguments(logs)
    logs.set_defaults(run=_logs)

"""What the verbs print: aligned tables for people, JSON for programs, one-line errors for both.

Results go to stdout and everything else (progress, build logs, errors) to stderr, so that
`--output json` output can always be piped into another program.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import urllib.error
from collections.abc import Callable, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoRegionError

from openmicrovm.cli.connection import CliError, ServerError

Command = Callable[[argparse.Namespace], int]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def without_metadata(response: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in response.items() if key != "ResponseMetadata"}


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, default=_plain, sort_keys=False))


def age(moment: datetime.datetime | float | None, now: datetime.datetime | None = None) -> str:
    """'12s ago', '5m ago', '3h ago', '2d ago'."""
    if moment is None:
        return "-"
    if not isinstance(moment, datetime.datetime):
        moment = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    seconds = ((now or datetime.datetime.now(datetime.UTC)) - moment).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{max(int(seconds), 0)}s ago"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "") -> None:
    if not rows:
        if empty:
            print(empty, file=sys.stderr)
        return
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        # The last column is left unpadded: it is often long (an ARN, a reason).
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False))
            + "  "
            + row[-1]
        )


def warn(message: str) -> None:
    print(f"openmicrovm: {message}", file=sys.stderr, flush=True)


def cli_command(function: Command) -> Command:
    """Turn the errors a verb can meet into one clear line on stderr and a non-zero exit."""

    @functools.wraps(function)
    def run(args: argparse.Namespace) -> int:
        try:
            return function(args)
        except CliError as error:
            warn(error.message)
            return error.status
        except ClientError as error:
            details = error.response.get("Error", {})
            warn(f"{details.get('Code', 'Error')}: {details.get('Message', str(error))}")
            return 1
        except ServerError as error:
            warn(f"{error.code}: {error.message}")
            return 1
        except (EndpointConnectionError, urllib.error.URLError, ConnectionError, TimeoutError) as error:
            endpoint = getattr(args, "endpoint_url", "the server")
            warn(f"cannot reach {endpoint} ({error}); is `openmicrovm serve` running there?")
            return 1
        except NoRegionError:
            warn("no region: pass --region or set AWS_REGION")
            return 2
        except BotoCoreError as error:
            warn(str(error))
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130

    return run

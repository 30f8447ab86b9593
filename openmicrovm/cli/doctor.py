"""`openmicrovm doctor`: can a server work on this machine, and is one answering?

Exits non-zero when something the server cannot work without is missing (no usable sandbox
driver, no buildah or debootstrap, no cgroups, a full disk, a database it cannot use), and says
what to install or fix.
A server that is not running is reported but is not a failure: doctor is for before, too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from openmicrovm.cli.connection import CliError, add_connection_arguments, connect
from openmicrovm.cli.host_checks import (
    FAIL,
    OK,
    WARN,
    Check,
    build_jail_check,
    cgroup_check,
    disk_check,
    driver_check,
    privilege_check,
    tool_checks,
)
from openmicrovm.cli.output import cli_command, print_json
from openmicrovm.config import Settings, load_settings


def _server_check(args: argparse.Namespace) -> Check:
    try:
        connection = connect(args)
        client = connection.session.client(
            "lambda-microvms",
            region_name=connection.region,
            endpoint_url=connection.endpoint_url,
            aws_access_key_id=connection.credentials.access_key,
            aws_secret_access_key=connection.credentials.secret_key,
            aws_session_token=connection.credentials.token,
            config=Config(connect_timeout=3, read_timeout=10, retries={"total_max_attempts": 1}),
        )
        images = client.list_managed_microvm_images()["items"]
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        return Check("server", WARN, f"{args.endpoint_url} answers but refused the request: {code}")
    except (BotoCoreError, CliError) as error:
        return Check(
            "server",
            WARN,
            f"{args.endpoint_url} is not reachable ({error}); start it with `openmicrovm serve`",
        )
    return Check("server", OK, f"{args.endpoint_url} is up ({len(images)} managed base image(s))")


def _database_check(settings: Settings) -> Check:
    """Where the records live, and whether this openmicrovm can use that database (read only:
    doctor never creates or migrates a schema)."""
    from openmicrovm.store import MIGRATIONS, StoreError, schema_version_of
    from openmicrovm.store.postgres import describe_url

    url = settings.effective_database_url
    try:
        version = schema_version_of(url, settings.database_connect_timeout_seconds)
    except StoreError as error:
        return Check("database", FAIL, str(error))
    except PermissionError:
        return Check(
            "database",
            WARN,
            f"{settings.data_dir} is not readable by this user; `sudo openmicrovm doctor` checks it",
        )
    where = describe_url(url)
    if version > len(MIGRATIONS):
        return Check(
            "database",
            FAIL,
            f"{where} is at schema version {version}, newer than this openmicrovm ({len(MIGRATIONS)}); upgrade it",
        )
    if version == 0:
        return Check("database", OK, f"{where}: empty; `openmicrovm serve` creates the schema")
    pending = len(MIGRATIONS) - version
    note = f", {pending} migration(s) to apply at the next start" if pending else ""
    return Check("database", OK, f"{where}: schema version {version}{note}")


def run_checks(args: argparse.Namespace) -> list[Check]:
    try:
        settings = load_settings(args.config, {"data_dir": args.data_dir})
    except ValueError as error:
        return [Check("settings", FAIL, str(error))]
    return [
        driver_check(settings),
        *tool_checks(),
        cgroup_check(),
        privilege_check(),
        build_jail_check(),
        disk_check("data dir", settings.data_dir),
        disk_check("cache dir", settings.cache_dir),
        _database_check(settings),
        _server_check(args),
    ]


def install_line(checks: list[Check]) -> str | None:
    packages = sorted({package for check in checks if check.status != OK for package in check.packages})
    return f"apt-get install {' '.join(packages)}" if packages else None


@cli_command
def _doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args)
    install = install_line(checks)
    healthy = all(check.status != FAIL for check in checks)
    if args.output == "json":
        document: dict[str, Any] = {
            "ok": healthy,
            "checks": [c.to_dict() for c in checks],
            "install": install,
        }
        print_json(document)
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            print(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
        if install:
            print(f"\nto install what is missing (as root):  {install}")
        if not healthy:
            print("\nthe server cannot work on this machine until the FAIL lines are fixed")
        elif any(check.status == WARN for check in checks):
            print("\nthe server can work here; the warnings say what it will do without")
    return 0 if healthy else 1


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    doctor = commands.add_parser("doctor", help="check this machine can run the server, and that it is up")
    doctor.add_argument(
        "--config", type=Path, help="the server's settings file (default: as `openmicrovm serve` finds it)"
    )
    doctor.add_argument(
        "--data-dir", type=Path, help="the server's data dir (default: as `openmicrovm serve` finds it)"
    )
    add_connection_arguments(doctor)
    doctor.set_defaults(run=_doctor)

"""`openmicrovm run | ps | suspend | resume | terminate`."""

from __future__ import annotations

import argparse
from typing import Any

from openmicrovm.cli import config_flags
from openmicrovm.cli.connection import CliError, add_connection_arguments, connect
from openmicrovm.cli.images import all_items, resolve_image_arn
from openmicrovm.cli.output import age, cli_command, print_json, print_table, without_metadata
from openmicrovm.cli.waiting import wait_for_microvm

DEFAULT_SUSPENDED_TTL = 28800
WAIT_SECONDS = 600.0


def _connector(region: str, kind: str) -> str:
    return f"arn:aws:lambda:{region}:aws:network-connector:aws-network-connector:{kind}"


def _idle_policy(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.idle is None:
        if args.suspended_ttl is not None or args.auto_resume:
            raise CliError(
                "--suspended-ttl and --auto-resume belong to an idle policy: add --idle SECONDS", 2
            )
        return None
    return {
        "maxIdleDurationSeconds": args.idle,
        "suspendedDurationSeconds": DEFAULT_SUSPENDED_TTL
        if args.suspended_ttl is None
        else args.suspended_ttl,
        "autoResumeEnabled": bool(args.auto_resume),
    }


def _show_microvm(args: argparse.Namespace, microvm: dict[str, Any]) -> None:
    if args.output == "json":
        print_json(without_metadata(microvm))
        return
    print(f"{microvm['microvmId']}  {microvm['state']}")
    if microvm.get("endpoint"):
        print(f"endpoint  {microvm['endpoint']}")
    if microvm.get("stateReason") and microvm["state"] == "TERMINATED":
        print(f"reason    {microvm['stateReason']}")


@cli_command
def _run(args: argparse.Namespace) -> int:
    # Flags first: a mistake in them is reported before anything is sent.
    optional = {
        "imageVersion": config_flags.version_label(args.version),
        "runHookPayload": config_flags.read_text_argument(args.payload, "--payload")
        if args.payload
        else None,
        "idlePolicy": _idle_policy(args),
        "maximumDurationInSeconds": args.max_duration,
        "logging": config_flags.logging_config(args.logging),
        "executionRoleArn": args.execution_role,
    }
    connection = connect(args)
    client = connection.client()
    request: dict[str, Any] = {"imageIdentifier": resolve_image_arn(client, args.image, connection.region)}
    request.update({key: value for key, value in optional.items() if value is not None})
    if args.shell:
        request["ingressNetworkConnectors"] = [
            _connector(connection.region, "HTTP_INGRESS"),
            _connector(connection.region, "SHELL_INGRESS"),
        ]
    microvm = without_metadata(client.run_microvm(**request))
    if not args.no_wait:
        microvm = wait_for_microvm(client, microvm["microvmId"], ("RUNNING",), "starting", args.timeout)
    _show_microvm(args, microvm)
    return 0


@cli_command
def _ps(args: argparse.Namespace) -> int:
    connection = connect(args)
    client = connection.client()
    filters: dict[str, Any] = {}
    if args.image:
        filters["imageIdentifier"] = resolve_image_arn(client, args.image, connection.region)
    items = all_items(client, "list_microvms", **filters)
    if not args.all:
        items = [item for item in items if item["state"] != "TERMINATED"]
    if args.output == "json":
        print_json(items)
        return 0
    print_table(
        ["MICROVM ID", "STATE", "IMAGE", "VERSION", "STARTED"],
        [
            [
                item["microvmId"],
                item["state"],
                item["imageArn"].rsplit(":", 1)[-1],
                item["imageVersion"],
                age(item.get("startedAt")),
            ]
            for item in items
        ],
        empty="no MicroVMs" + ("" if args.all else " (--all also lists terminated ones)"),
    )
    return 0


def _state_change(operation: str, wanted: tuple[str, ...], doing: str) -> Any:
    @cli_command
    def change(args: argparse.Namespace) -> int:
        client = connect(args).client()
        results = []
        for microvm_id in args.microvm_ids:
            getattr(client, operation)(microvmIdentifier=microvm_id)
            if args.no_wait:
                results.append(without_metadata(client.get_microvm(microvmIdentifier=microvm_id)))
            else:
                results.append(
                    without_metadata(wait_for_microvm(client, microvm_id, wanted, doing, args.timeout))
                )
        if args.output == "json":
            print_json(results[0] if len(results) == 1 else results)
        else:
            for microvm in results:
                print(f"{microvm['microvmId']}  {microvm['state']}")
        return 0

    return change


def _add_wait_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="return once the request is accepted")
    parser.add_argument(
        "--timeout",
        type=float,
        default=WAIT_SECONDS,
        help=f"seconds to wait at most (default {WAIT_SECONDS:.0f})",
    )


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = commands.add_parser("run", help="start a MicroVM from an image and wait until it is RUNNING")
    run.add_argument("image", metavar="IMAGE", help="image name or ARN")
    run.add_argument("--version", help="image version (default: the newest active one)")
    run.add_argument("--payload", help="run hook payload; @FILE reads it from a file, @- from stdin")
    run.add_argument("--idle", type=int, metavar="SECONDS", help="suspend after this many idle seconds")
    run.add_argument(
        "--suspended-ttl",
        type=int,
        metavar="SECONDS",
        help=f"terminate after this long suspended (with --idle; default {DEFAULT_SUSPENDED_TTL})",
    )
    run.add_argument("--auto-resume", action="store_true", help="resume on the next request (with --idle)")
    run.add_argument(
        "--max-duration", type=int, metavar="SECONDS", help="terminate after this long (default 8 h)"
    )
    run.add_argument(
        "--shell", action="store_true", help="allow shell access (adds the SHELL_INGRESS connector)"
    )
    run.add_argument("--logging", help="disabled, cloudwatch, cloudwatch:GROUP or cloudwatch:GROUP:STREAM")
    run.add_argument("--execution-role", help="IAM role ARN the MicroVM runs with")
    _add_wait_arguments(run)
    add_connection_arguments(run)
    run.set_defaults(run=_run)

    ps = commands.add_parser("ps", help="list MicroVMs")
    ps.add_argument("--all", "-a", action="store_true", help="include terminated MicroVMs")
    ps.add_argument("--image", help="only MicroVMs of this image (name or ARN)")
    add_connection_arguments(ps)
    ps.set_defaults(run=_ps)

    for verb, operation, wanted, doing, summary in (
        ("suspend", "suspend_microvm", ("SUSPENDED",), "suspending", "suspend MicroVMs"),
        ("resume", "resume_microvm", ("RUNNING",), "resuming", "resume suspended MicroVMs"),
        ("terminate", "terminate_microvm", ("TERMINATED",), "terminating", "terminate MicroVMs"),
    ):
        parser = commands.add_parser(verb, help=summary)
        parser.add_argument("microvm_ids", nargs="+", metavar="ID", help="MicroVM id")
        _add_wait_arguments(parser)
        add_connection_arguments(parser)
        parser.set_defaults(run=_state_change(operation, wanted, doing))

"""`openmicrovm images` and `openmicrovm versions IMAGE`, and turning image names into ARNs.

The API takes only full ARNs everywhere but CreateMicrovmImage (spec §10.3); the CLI accepts a
name as well and looks it up, so nobody has to copy ARNs around.
"""

from __future__ import annotations

import argparse
from typing import Any

from openmicrovm.cli.connection import CliError, add_connection_arguments, connect
from openmicrovm.cli.output import age, cli_command, print_json, print_table


def find_image(client: Any, name: str) -> dict[str, Any] | None:
    """The caller's image with exactly this name, or None."""
    for page in client.get_paginator("list_microvm_images").paginate(nameFilter=name):
        for item in page["items"]:
            if item["name"] == name:
                return item
    return None


def resolve_image_arn(client: Any, identifier: str, region: str) -> str:
    if identifier.startswith("arn:"):
        return identifier
    image = find_image(client, identifier)
    if image is None:
        raise CliError(f"no image named {identifier!r} in {region}; `openmicrovm images` lists them")
    return image["imageArn"]


def all_items(client: Any, operation: str, **parameters: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for page in client.get_paginator(operation).paginate(**parameters):
        items += page["items"]
    return items


@cli_command
def _images(args: argparse.Namespace) -> int:
    client = connect(args).client()
    items = all_items(client, "list_microvm_images")
    if args.output == "json":
        print_json(items)
        return 0
    print_table(
        ["NAME", "STATE", "ACTIVE", "FAILED", "CREATED", "ARN"],
        [
            [
                item["name"],
                item["state"],
                item.get("latestActiveImageVersion"),
                item.get("latestFailedImageVersion"),
                age(item.get("createdAt")),
                item["imageArn"],
            ]
            for item in items
        ],
        empty="no images yet; `openmicrovm deploy DIR --name NAME` makes one",
    )
    return 0


def _version_key(item: dict[str, Any]) -> int:
    return int(str(item["imageVersion"]).split(".")[0])


@cli_command
def _versions(args: argparse.Namespace) -> int:
    connection = connect(args)
    client = connection.client()
    arn = resolve_image_arn(client, args.image, connection.region)
    items = sorted(all_items(client, "list_microvm_image_versions", imageIdentifier=arn), key=_version_key)
    if args.output == "json":
        print_json(items)
        return 0
    print_table(
        ["VERSION", "STATE", "STATUS", "CREATED", "REASON"],
        [
            [
                item["imageVersion"],
                item["state"],
                item["status"],
                age(item.get("createdAt")),
                item.get("stateReason"),
            ]
            for item in items
        ],
        empty="this image has no versions",
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    images = commands.add_parser("images", help="list your MicroVM images")
    add_connection_arguments(images)
    images.set_defaults(run=_images)
    versions = commands.add_parser("versions", help="list the versions of an image")
    versions.add_argument("image", metavar="IMAGE", help="image name or ARN")
    add_connection_arguments(versions)
    versions.set_defaults(run=_versions)

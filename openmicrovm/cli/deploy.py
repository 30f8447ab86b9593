"""`openmicrovm deploy DIR --name NAME`: pack a folder, create the image (or a new version of it),
and follow the build to its end.

A new version of an existing image keeps the previous version's configuration (hooks, memory,
environment, logging, ...) except for what the flags change, because UpdateMicrovmImage takes
the whole configuration each time and a redeploy should not silently drop the hooks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, ParamValidationError

from openmicrovm.cli import config_flags
from openmicrovm.cli.connection import CliError, Connection, ServerError, add_connection_arguments, connect
from openmicrovm.cli.images import all_items, find_image
from openmicrovm.cli.logs import LogReader
from openmicrovm.cli.output import cli_command, print_json, warn, without_metadata
from openmicrovm.cli.packaging import check_folder, package
from openmicrovm.cli.progress import Progress
from openmicrovm.logs.store import split_line
from openmicrovm.wire_model import version_config_members

DEFAULT_BUILD_ROLE = "arn:aws:iam::000000000000:role/openmicrovm-build"
BUILD_TIMEOUT_SECONDS = 1800.0
POLL_SECONDS = 0.5
# What a redeploy keeps of the image's latest version: all of its configuration but the code (the
# new zip) and the base image's version (left for the service to resolve, as on a first deploy).
CARRIED_OVER = tuple(
    member for member in version_config_members() if member not in ("codeArtifact", "baseImageVersion")
)
FINISHED_VERSION_STATES = ("SUCCESSFUL", "FAILED")


def _latest_version(client: Any, image_arn: str) -> dict[str, Any] | None:
    versions = all_items(client, "list_microvm_image_versions", imageIdentifier=image_arn)
    return max(versions, key=lambda item: int(str(item["imageVersion"]).split(".")[0]), default=None)


def _flag_members(args: argparse.Namespace) -> dict[str, Any]:
    """The request members the flags set (checked before anything is sent)."""
    members: dict[str, Any] = {}
    if args.config:
        extra = config_flags.json_argument(args.config, "--config")
        if not isinstance(extra, dict):
            raise CliError("--config must hold a JSON object of CreateMicrovmImage members", 2)
        members.update(extra)
    flags = {
        "baseImageArn": args.base_image,
        "buildRoleArn": args.build_role,
        "description": args.description,
        "hooks": config_flags.json_argument(args.hooks, "--hooks") if args.hooks else None,
        "environmentVariables": config_flags.environment(args.env),
        "logging": config_flags.logging_config(args.logging),
        "resources": [{"minimumMemoryInMiB": args.memory}] if args.memory else None,
    }
    members.update({key: value for key, value in flags.items() if value is not None})
    return members


def _configuration(flags: dict[str, Any], region: str, previous: dict[str, Any] | None) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if previous is not None:
        request.update({key: previous[key] for key in CARRIED_OVER if previous.get(key) is not None})
    request.update(flags)
    request.setdefault("baseImageArn", f"arn:aws:lambda:{region}:aws:microvm-image:al2023-1")
    request.setdefault("buildRoleArn", DEFAULT_BUILD_ROLE)
    return request


class _BuildFollower:
    """Shows a version's build logs and stage as the build goes."""

    def __init__(self, connection: Connection, client: Any, image_arn: str, version: str) -> None:
        self.connection = connection
        self.client = client
        self.image_arn = image_arn
        self.version = version
        self.readers: dict[str, LogReader] = {}
        self.architectures: dict[str, str] = {}
        self.logs_available = True
        self.stage = ""

    def builds(self) -> list[dict[str, Any]]:
        items = all_items(
            self.client,
            "list_microvm_image_builds",
            imageIdentifier=self.image_arn,
            imageVersion=self.version,
        )
        for build in items:
            if build["buildId"] not in self.readers:
                self.readers[build["buildId"]] = LogReader(self.connection, "builds", build["buildId"])
                self.architectures[build["buildId"]] = build["architecture"]
        return items

    def show_logs(self, progress: Progress) -> None:
        """Print every new log line of every build (all of them, however many pages)."""
        if not self.logs_available:
            return
        for build_id, reader in self.readers.items():
            prefix = f"[{self.architectures[build_id]}] " if len(self.readers) > 1 else ""
            while True:
                try:
                    page = reader.read()
                except ServerError as error:
                    self.logs_available = False
                    warn(f"build logs are not available ({error.code}: {error.message})")
                    return
                for line in page.lines:
                    _, message = split_line(line)
                    if message.startswith("stage: "):
                        self.stage = message[len("stage: ") :]
                    progress.log(prefix + message)
                if not page.lines:
                    break


def _follow(follower: _BuildFollower, name: str, timeout: float) -> dict[str, Any]:
    progress = Progress()
    deadline = time.monotonic() + timeout
    try:
        while True:
            version = follower.client.get_microvm_image_version(
                imageIdentifier=follower.image_arn, imageVersion=follower.version
            )
            follower.builds()
            # The version's state is read before the logs: once it is final, every line is written.
            follower.show_logs(progress)
            if version["state"] in FINISHED_VERSION_STATES:
                return without_metadata(version)
            progress.update(f"building {name} {follower.version}: {follower.stage or version['state']}")
            if time.monotonic() > deadline:
                raise CliError(
                    f"{name} version {follower.version} is still {version['state']} after {timeout:.0f} s"
                )
            time.sleep(POLL_SECONDS)
    finally:
        progress.finish()


def _report(
    args: argparse.Namespace, image: dict[str, Any], version: dict[str, Any], builds: list[dict[str, Any]]
) -> int:
    succeeded = version["state"] == "SUCCESSFUL"
    reason = version.get("stateReason") or next(
        (b["stateReason"] for b in builds if b.get("stateReason")), None
    )
    if args.output == "json":
        print_json(
            {
                "name": image["name"],
                "imageArn": image["imageArn"],
                "imageVersion": version["imageVersion"],
                "imageState": image["state"],
                "versionState": version["state"],
                "stateReason": reason,
                "codeArtifact": version.get("codeArtifact"),
                "builds": [
                    {key: build.get(key) for key in ("buildId", "architecture", "buildState", "stateReason")}
                    for build in builds
                ],
            }
        )
    elif succeeded:
        print(f"deployed {image['name']} version {version['imageVersion']} ({image['state']})")
        print(f"image  {image['imageArn']}")
    if not succeeded:
        warn(
            f"the build of {image['name']} version {version['imageVersion']} failed: {reason or 'no reason given'}"
        )
        return 1
    return 0


@cli_command
def _deploy(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    # Mistakes in the folder or the flags are reported before anything is sent.
    check_folder(folder)
    flags = _flag_members(args)
    connection = connect(args)
    client = connection.client()
    existing = find_image(client, args.name)
    previous = _latest_version(client, existing["imageArn"]) if existing else None
    request = _configuration(flags, connection.region, previous)
    s3 = connection.client("s3") if args.bucket else None
    stored = package(folder, args.name, args.bucket, s3, args.artifact_dir)
    request["codeArtifact"] = {"uri": stored.uri}
    try:
        if existing is None:
            answer = client.create_microvm_image(name=args.name, **request)
        else:
            answer = client.update_microvm_image(imageIdentifier=existing["imageArn"], **request)
    except (ClientError, ParamValidationError):
        stored.discard()  # refused: no build will read it (a lost answer keeps it: one may)
        raise
    image_arn, version_label = answer["imageArn"], answer["imageVersion"]
    if args.no_wait:  # the build has yet to read a one-off upload: it stays
        if args.output == "json":
            print_json(without_metadata(answer))
        else:
            print(
                f"building {args.name} version {version_label}; `openmicrovm versions {args.name}` shows how it goes"
            )
        return 0
    follower = _BuildFollower(connection, client, image_arn, version_label)
    version = _follow(follower, args.name, args.timeout)
    stored.discard()  # the build has ended (past --timeout it may still read it: it stays)
    image = without_metadata(client.get_microvm_image(imageIdentifier=image_arn))
    return _report(args, image, version, follower.builds())


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = commands.add_parser(
        "deploy",
        help="build a folder with a Dockerfile into an image (a new version if it exists)",
        description="Zip DIR (its Dockerfile at the root), store the zip, create the image NAME or add a "
        "version to it, and show the build until it ends. A new version keeps the previous version's "
        "configuration except what the flags change.",
    )
    deploy.add_argument("dir", metavar="DIR", help="folder with a Dockerfile at its root")
    deploy.add_argument("--name", required=True, help="image name")
    deploy.add_argument("--bucket", help="store the zip in this S3 bucket (default: a local file:// path)")
    deploy.add_argument("--artifact-dir", type=Path, help="where to keep the zip when there is no --bucket")
    deploy.add_argument("--hooks", help="hooks configuration as JSON, or @FILE")
    deploy.add_argument(
        "--env", action="append", metavar="NAME=VALUE", help="environment variable (repeatable)"
    )
    deploy.add_argument("--memory", type=int, metavar="MIB", help="memory: 512, 1024, 2048, 4096 or 8192")
    deploy.add_argument("--logging", help="disabled, cloudwatch, cloudwatch:GROUP or cloudwatch:GROUP:STREAM")
    deploy.add_argument("--description", help="image description")
    deploy.add_argument("--base-image", help="base image ARN (default: the managed al2023-1)")
    deploy.add_argument("--build-role", help=f"build role ARN (default {DEFAULT_BUILD_ROLE})")
    deploy.add_argument("--config", help="more CreateMicrovmImage members as a JSON object, or @FILE")
    deploy.add_argument("--no-wait", action="store_true", help="return once the build has been requested")
    deploy.add_argument(
        "--timeout",
        type=float,
        default=BUILD_TIMEOUT_SECONDS,
        help=f"seconds to wait for the build at most (default {BUILD_TIMEOUT_SECONDS:.0f})",
    )
    add_connection_arguments(deploy)
    deploy.set_defaults(run=_deploy)

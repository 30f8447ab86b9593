"""The configuration an image version is built from: the rules Create and Update share (spec §2.1,
§2.4, §4, §6) beyond what the model's shapes check."""

from __future__ import annotations

import re
from typing import Any

from openmicrovm.service.arns import EGRESS_CONNECTORS, managed_connector_arn, parse_connector
from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params
from openmicrovm.service.errors import ValidationError
from openmicrovm.service.managed import host_architecture, resolve_base_image
from openmicrovm.wire_model import version_config_members

SUPPORTED_MEMORY_MIB = (512, 1024, 2048, 4096, 8192)
DEFAULT_MEMORY_MIB = 2048
RUNTIME_HOOKS = ("run", "resume", "suspend", "terminate")
IMAGE_HOOKS = ("ready", "validate")
READY_HOOK_REQUIRED = (
    "The ready (/ready) MicroVM image hook must be enabled when any MicroVM lifecycle hook (run, resume, "
    "suspend, or terminate) is enabled. The ready hook signals when the application has finished "
    "initializing so the snapshot is taken in a ready state."
)
_S3_URI = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<key>.+)")
_FILE_URI = re.compile(r"file:///.+")

CONFIG_MEMBERS = version_config_members()


def _check_code_artifact(artifact: dict[str, Any]) -> None:
    uri = artifact["uri"]
    if not (_S3_URI.fullmatch(uri) or _FILE_URI.fullmatch(uri)):
        raise ValidationError(
            f"1 validation error detected: Value '{uri}' at 'codeArtifact.uri' failed to satisfy constraint: "
            "Member must be an S3 object URI (s3://bucket/key) or, for offline use, a file:///path URI"
        )


def _memory(resources: list[dict[str, Any]] | None, base_image_arn: str) -> list[dict[str, Any]]:
    if not resources:
        return [{"minimumMemoryInMiB": DEFAULT_MEMORY_MIB}]
    memory = resources[0]["minimumMemoryInMiB"]
    if memory not in SUPPORTED_MEMORY_MIB:
        raise ValidationError(
            f"The requested memory size of {memory} MiB is not supported by base MicroVM image "
            f"{base_image_arn}. Supported memory sizes in MiB are: [{', '.join(map(str, SUPPORTED_MEMORY_MIB))}]."
        )
    return resources


def _check_hooks(hooks: dict[str, Any] | None) -> None:
    if not hooks:
        return
    runtime = hooks.get("microvmHooks") or {}
    image = hooks.get("microvmImageHooks") or {}
    enabled = [name for name in RUNTIME_HOOKS if runtime.get(name) == "ENABLED"]
    enabled += [name for name in IMAGE_HOOKS if image.get(name) == "ENABLED"]
    if any(runtime.get(name) == "ENABLED" for name in RUNTIME_HOOKS) and image.get("ready") != "ENABLED":
        raise ValidationError(READY_HOOK_REQUIRED)
    if enabled and hooks.get("port") is None:
        raise ValidationError(
            "1 validation error detected: Value null at 'hooks.port' failed to satisfy constraint: "
            f"Member must not be null when a hook is enabled (enabled: {', '.join(enabled)})"
        )


def _egress(context: RequestContext, connectors: list[str] | None) -> list[str]:
    if connectors is None:
        return [managed_connector_arn(context.region, "INTERNET_EGRESS")]
    for index, value in enumerate(connectors):
        connector = parse_connector(context, value, f"egressNetworkConnectors.{index + 1}.member")
        if connector.kind not in EGRESS_CONNECTORS:
            raise ValidationError(f"Network connector {value} is not an egress connector.")
    return connectors


def _check_architectures(configurations: list[dict[str, Any]] | None) -> None:
    if not configurations:
        return
    seen = [item["architecture"] for item in configurations]
    if len(set(seen)) != len(seen):
        raise ValidationError("cpuConfigurations lists the same architecture more than once.")


def _check_os_capabilities(capabilities: list[str] | None, sandbox_driver: str | None) -> None:
    """ALL means every Linux capability (CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_MKNOD, ...). gVisor's
    kernel contains such an app; the process driver runs apps on the host's kernel, where those
    capabilities load modules and make device nodes, so it cannot (runtime/process.py)."""
    if sandbox_driver == "process" and "ALL" in (capabilities or []):
        raise ValidationError(
            "additionalOsCapabilities ALL cannot be granted on this server: its sandbox driver is "
            "'process', which runs apps on the host's kernel and cannot contain an app with every "
            "capability (CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_MKNOD, ...). Use a server with the gvisor "
            "driver (install runsc), or leave additionalOsCapabilities out."
        )


def build_targets(config: dict[str, Any]) -> list[str]:
    """One build per architecture asked for; this host's when none is."""
    configurations = config.get("cpuConfigurations")
    if not configurations:
        return [host_architecture()]
    return [item["architecture"] for item in configurations]


def version_config(
    context: RequestContext, params: Params, sandbox_driver: str | None = None
) -> dict[str, Any]:
    """Check a Create/Update request and return the version configuration with defaults applied.
    sandbox_driver: the server's driver, for what only some drivers can run."""
    resolved_base = resolve_base_image(context, params["baseImageArn"], params.get("baseImageVersion"))
    _check_code_artifact(params["codeArtifact"])
    resources = _memory(params.get("resources"), params["baseImageArn"])
    _check_hooks(params.get("hooks"))
    _check_architectures(params.get("cpuConfigurations"))
    _check_os_capabilities(params.get("additionalOsCapabilities"), sandbox_driver)
    config = {member: params.get(member) for member in CONFIG_MEMBERS}
    config["baseImageVersion"] = resolved_base
    config["resources"] = resources
    config["egressNetworkConnectors"] = _egress(context, params.get("egressNetworkConnectors"))
    return config


def memory_mib(config: dict[str, Any]) -> int:
    return int(config["resources"][0]["minimumMemoryInMiB"])


def hook_enabled(config: dict[str, Any], name: str) -> bool:
    hooks = config.get("hooks") or {}
    group = hooks.get("microvmImageHooks" if name in IMAGE_HOOKS else "microvmHooks") or {}
    return group.get(name) == "ENABLED"

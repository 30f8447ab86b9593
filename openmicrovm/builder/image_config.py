"""The built image's run configuration: what to start, as whom, where, with which environment."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from openmicrovm.builder.buildah import BuildahError, BuildahStore, buildah_json
from openmicrovm.builder.dockerfile import final_stage_command_forms, final_stage_exposed_ports

_DEFAULT_SHELL = ["/bin/sh", "-c"]


@dataclass(frozen=True)
class ImageConfig:
    # ENTRYPOINT followed by CMD, as Docker starts a container (shell forms already wrapped).
    argv: list[str]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "0"
    # "8080/tcp"; in the order the Dockerfile's final stage wrote them, then any inherited ones.
    exposed_ports: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: list(_DEFAULT_SHELL))
    stop_signal: str = ""

    @property
    def tcp_ports(self) -> list[int]:
        ports = []
        for spec in self.exposed_ports:
            number, _, protocol = spec.partition("/")
            if protocol in ("", "tcp") and number.isdigit():
                ports.append(int(number))
        return ports

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def _env_dict(entries: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries or []:
        name, _, value = entry.partition("=")
        if name:
            env[name] = value
    return env


def _with_shell(command: list[str], shell: list[str] | None) -> list[str]:
    """Re-wrap a shell-form command buildah wrapped in /bin/sh -c with the SHELL Docker would use."""
    if shell and shell != _DEFAULT_SHELL and command[:2] == _DEFAULT_SHELL and len(command) == 3:
        return [*shell, command[2]]
    return command


def config_from_inspect(inspected: dict[str, Any], dockerfile_text: str | None = None) -> ImageConfig:
    """Build an ImageConfig from `buildah inspect --type image` output (docker or OCI format)."""
    docker = (inspected.get("Docker") or {}).get("config") or {}
    oci = (inspected.get("OCIv1") or {}).get("config") or {}
    config = docker or oci
    entrypoint = list(config.get("Entrypoint") or [])
    cmd = list(config.get("Cmd") or [])
    shell = list(docker.get("Shell") or []) or list(_DEFAULT_SHELL)
    exposed = [str(port) for port in (config.get("ExposedPorts") or {})]
    if dockerfile_text is not None:
        written = [port for port in final_stage_exposed_ports(dockerfile_text) if port in exposed]
        exposed = [*written, *(port for port in exposed if port not in written)]
        forms = final_stage_command_forms(dockerfile_text)
        if (form := forms.get("ENTRYPOINT")) is not None and form.shell_form:
            entrypoint = _with_shell(entrypoint, form.shell)
        if (form := forms.get("CMD")) is not None and form.shell_form:
            cmd = _with_shell(cmd, form.shell)
    return ImageConfig(
        argv=[*entrypoint, *cmd],
        entrypoint=entrypoint,
        cmd=cmd,
        env=_env_dict(config.get("Env")),
        workdir=config.get("WorkingDir") or "/",
        user=config.get("User") or "0",
        exposed_ports=exposed,
        labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        shell=shell,
        stop_signal=str(config.get("StopSignal") or ""),
    )


async def read_image_config(
    store: BuildahStore, image_id: str, dockerfile_text: str | None = None
) -> ImageConfig:
    inspected = await buildah_json(store, ["inspect", "--type", "image", image_id])
    if not isinstance(inspected, dict):
        raise BuildahError(f"buildah inspect returned no configuration for image {image_id}")
    return config_from_inspect(inspected, dockerfile_text)

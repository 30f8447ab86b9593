"""Just enough Dockerfile parsing to correct one buildah 1.28 divergence from Docker, and to refuse
the `RUN --mount` options through which buildah 1.28 can be made to mount a host path.

Docker runs a shell-form `CMD` / `ENTRYPOINT` with the shell a preceding `SHELL` instruction set;
buildah 1.28 always writes `/bin/sh -c` (it honours SHELL for RUN only). The image config cannot
tell a shell-form `CMD echo hi` from an exec-form `CMD ["/bin/sh", "-c", "echo hi"]`, so we look at
the final stage of the Dockerfile itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str
    line: int = 0  # where it starts in the Dockerfile, from 1


@dataclass(frozen=True)
class CommandForm:
    """How the final stage's last CMD or ENTRYPOINT was written."""

    shell_form: bool
    shell: list[str] | None  # the SHELL in effect at that instruction within the stage, if any


def _escape_character(lines: list[str]) -> str:
    for line in lines:
        match = _DIRECTIVE.match(line.strip())
        if match is None:
            break  # parser directives only count before the first other line
        if match.group(1).lower() == "escape" and match.group(2) in ("\\", "`"):
            return match.group(2)
    return "\\"


def parse_instructions(text: str) -> list[Instruction]:
    lines = text.splitlines()
    escape = _escape_character(lines)
    instructions: list[Instruction] = []
    pending = ""
    first_line = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        # Comments and blank lines are dropped, also between continuation lines (as Docker does).
        if not stripped or stripped.startswith("#"):
            continue
        body = raw.rstrip()
        if not pending:
            first_line = number
        if body.endswith(escape):
            pending += body[:-1] + " "
            continue
        logical = (pending + body).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip(), first_line))
    if pending.strip():
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), first_line))
    return instructions


def _run_flags(arguments: str) -> list[str]:
    """The `--flag[=value]` words before a RUN instruction's command."""
    flags = []
    for word in arguments.split():
        if not word.startswith("--"):
            break
        flags.append(word)
    return flags


def _mount_options(value: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in value.split(","):
        key, _, option = item.strip().strip("\"'").partition("=")
        options[key.strip().lower()] = option.strip().strip("\"'")
    return options


def _climbs(path: str) -> bool:
    return ".." in path.replace("\\", "/").split("/")


def _unsafe_mount(options: dict[str, str]) -> str | None:
    kind = options.get("type", "bind")
    if kind in ("secret", "ssh"):
        return (
            f"type={kind} mounts are not supported: builds here are given no secrets and no SSH agent. "
            "Pass what the build needs in the build context instead."
        )
    if kind not in ("bind", "cache"):
        return None
    if "from" in options:
        return (
            f"type={kind} mounts with from= are not supported: buildah 1.28 follows a symlink in the "
            "named stage or image out of it (CVE-2024-1753). Use COPY --from=<stage> instead."
        )
    for key in ("id", "source", "src"):
        if _climbs(options.get(key, "")):
            return (
                f"the {key} {options[key]!r} of a type={kind} mount climbs out with '..', which "
                "buildah 1.28 resolves outside the build (CVE-2024-9675). Name it without '..'."
            )
    return None


def unsafe_run_mount(dockerfile: Path) -> str | None:
    """Why a RUN instruction of `dockerfile` is refused, or None when none is: a `--mount` that could
    name a path outside the build, a mount of host secrets, or `--security=insecure`."""
    try:
        text = dockerfile.read_text(errors="replace")
    except OSError:
        return None  # a missing Dockerfile is reported by the build itself
    for instruction in parse_instructions(text):
        if instruction.keyword != "RUN":
            continue
        for flag in _run_flags(instruction.arguments):
            name, _, value = flag.partition("=")
            problem = None
            if name.lower() == "--mount":
                problem = _unsafe_mount(_mount_options(value))
            elif name.lower() == "--security" and value.lower().strip("\"'") == "insecure":
                problem = "RUN --security=insecure is not allowed: RUN steps never get extra privileges."
            if problem is not None:
                return f"Line {instruction.line} of the Dockerfile (RUN {flag}): {problem}"
    return None


def _json_array(arguments: str) -> list[str] | None:
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def final_stage_command_forms(text: str) -> dict[str, CommandForm]:
    """For "CMD" and "ENTRYPOINT": the form of their last occurrence in the final stage."""
    forms: dict[str, CommandForm] = {}
    shell: list[str] | None = None
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            forms, shell = {}, None
        elif instruction.keyword == "SHELL":
            shell = _json_array(instruction.arguments) or shell
        elif instruction.keyword in ("CMD", "ENTRYPOINT"):
            is_shell_form = _json_array(instruction.arguments) is None
            forms[instruction.keyword] = CommandForm(is_shell_form, shell)
    return forms


def final_stage_exposed_ports(text: str) -> list[str]:
    """EXPOSE arguments of the final stage in the order written, normalised to "port/proto".
    (The image config stores them in a map, which loses the order.)"""
    ports: list[str] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            ports = []
        elif instruction.keyword == "EXPOSE":
            for spec in instruction.arguments.split():
                number, _, protocol = spec.partition("/")
                normalised = f"{number}/{(protocol or 'tcp').lower()}"
                if number.isdigit() and normalised not in ports:
                    ports.append(normalised)
    return ports

"""Just enough Dockerfile parsing to correct one buildah 1.28 divergence from Docker.

Docker runs a shell-form `CMD` / `ENTRYPOINT` with the shell a preceding `SHELL` instruction set;
buildah 1.28 always writes `/bin/sh -c` (it honours SHELL for RUN only). The image config cannot
tell a shell-form `CMD echo hi` from an exec-form `CMD ["/bin/sh", "-c", "echo hi"]`, so we look at
the final stage of the Dockerfile itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str


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
    for raw in lines:
        stripped = raw.strip()
        # Comments and blank lines are dropped, also between continuation lines (as Docker does).
        if not stripped or stripped.startswith("#"):
            continue
        body = raw.rstrip()
        if body.endswith(escape):
            pending += body[:-1] + " "
            continue
        logical = (pending + body).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip()))
    if pending.strip():
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


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

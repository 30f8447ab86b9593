"""The agent's protocol.h against the host's copies of its values in agent_client.py, and the
agent's build covering every file it is made of. No sandbox and no root needed: this reads files."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

from openmicrovm.runtime import agent_build, agent_client

AGENT_DIR = Path(agent_build.__file__).parent / "agent"
PROTOCOL_H = AGENT_DIR / "protocol.h"
PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"

Value = int | float | str

# Every constant of agent_client is the host's copy of the protocol.h value of the same name (a
# leading underscore aside), but for these: another name, or the host's own value that must stay
# above or below one of the agent's (out_of_bounds). A new constant must be one or the other.
RENAMED = {
    "_FRAME_HEADER": "FRAME_HEADER_SIZE",
    "MAX_RELAYED_CONNECTIONS": "DEFAULT_MAX_RELAYS",
}
HOST_ONLY = {"REPLY_TIMEOUT", "_MAX_INPUT_FRAME", "_MAX_REPLY_LINE"}

_DEFINE = re.compile(r"#define\s+(\w+)(?:\s+(.*?))?\s*(?:/\*.*\*/)?\s*$")
_VALUE = re.compile(r'(?P<number>-?\d+)|\'(?P<char>[^\'\\])\'|"(?P<string>[^"\\]*)"')


@pytest.fixture(scope="session", autouse=True)
def _root_only() -> None:
    """Overrides the runtime tests' root check: nothing here starts a sandbox."""


def parse_defines(text: str) -> tuple[dict[str, Value], list[str]]:
    """`#define NAME value` lines as {NAME: value} (a number as int, a 'c' or a "string" as str),
    and the #define lines with a value of another form, which the check could not read."""
    defines: dict[str, Value] = {}
    unreadable: list[str] = []
    for line in text.splitlines():
        match = _DEFINE.match(line.strip())
        if not match or match.group(2) is None:
            continue  # not a #define, or one without a value (the include guard)
        value = _VALUE.fullmatch(match.group(2))
        if value is None:
            unreadable.append(line)
        elif value.group("number") is not None:
            defines[match.group(1)] = int(value.group("number"))
        else:
            defines[match.group(1)] = value.group("char") or value.group("string")
    return defines, unreadable


def host_constants() -> dict[str, Value]:
    """agent_client's module constants (upper-case names), bytes turned into str like C's 'c'."""
    constants: dict[str, Value] = {}
    for name, value in vars(agent_client).items():
        if name.lstrip("_").isupper() and isinstance(value, int | float | str | bytes):
            constants[name] = value.decode() if isinstance(value, bytes) else value
    return constants


def disagreements(defines: Mapping[str, Value], host: Mapping[str, Value]) -> list[str]:
    """Every shared value the two sides hold differently, or that one side lacks."""
    pairs = {name: RENAMED.get(name, name.lstrip("_")) for name in host if name not in HOST_ONLY} | RENAMED
    problems = []
    for host_name, c_name in sorted(pairs.items()):
        if host_name not in host or c_name not in defines:
            problems.append(f"{host_name} / {c_name}: missing on one side")
        elif host[host_name] != defines[c_name]:
            problems.append(
                f"agent_client.{host_name} = {host[host_name]!r}, protocol.h {c_name} = {defines[c_name]!r}"
            )
    return problems


def out_of_bounds(defines: Mapping[str, Value], host: Mapping[str, Value]) -> list[str]:
    """The host's values that must stay above or below the agent's."""
    checks = [
        (
            "REPLY_TIMEOUT * 1000 > CONNECT_TIMEOUT_MS",
            host["REPLY_TIMEOUT"] * 1000 > defines["CONNECT_TIMEOUT_MS"],
        ),
        ("_MAX_INPUT_FRAME <= MAX_CLIENT_FRAME", host["_MAX_INPUT_FRAME"] <= defines["MAX_CLIENT_FRAME"]),
        ("_MAX_REPLY_LINE >= MAX_ANSWER_LINE", host["_MAX_REPLY_LINE"] >= defines["MAX_ANSWER_LINE"]),
        (
            "MAX_RELAYED_CONNECTIONS <= MAX_RELAYS_LIMIT",
            host["MAX_RELAYED_CONNECTIONS"] <= defines["MAX_RELAYS_LIMIT"],
        ),
    ]
    return [check for check, holds in checks if not holds]


@pytest.fixture(scope="module")
def defines() -> dict[str, Value]:
    defines, unreadable = parse_defines(PROTOCOL_H.read_text())
    assert not unreadable, "protocol.h values must be plain numbers, 'c' or \"strings\" for this test"
    return defines


def test_the_host_and_protocol_h_agree_on_every_shared_value(defines: dict[str, Value]) -> None:
    assert disagreements(defines, host_constants()) == []
    assert out_of_bounds(defines, host_constants()) == []


def test_every_frame_type_and_error_code_the_host_uses_is_in_protocol_h(defines: dict[str, Value]) -> None:
    frame_types = {
        value for name, value in defines.items() if name.startswith("FRAME_") and isinstance(value, str)
    }
    error_codes = {value for name, value in defines.items() if name.startswith("ERR_")}
    host = host_constants()
    host_frame_types = {
        value for name, value in host.items() if name.startswith("_FRAME_") and isinstance(value, str)
    }
    host_error_codes = {value for name, value in host.items() if name.startswith("ERR_")}
    assert host_frame_types and host_frame_types <= frame_types
    assert host_error_codes and host_error_codes <= error_codes
    # Codes compared as literals elsewhere in the runtime (base.py's EPROTO, say) count too.
    runtime = Path(agent_client.__file__).parent
    literals = {
        code
        for path in runtime.rglob("*.py")
        for code in re.findall(r"\.code\s*[!=]=\s*[\"'](E[A-Z0-9]+)[\"']", path.read_text())
    }
    assert literals <= error_codes


def test_a_value_changed_on_either_side_is_caught(defines: dict[str, Value]) -> None:
    """The checks above can fail: each of these changes, on one side only, is reported."""
    host = host_constants()
    assert disagreements({**defines, "FRAME_HEADER_SIZE": 6}, host)
    assert disagreements({**defines, "ERR_TOO_MANY_RELAYS": "ETOOMANY"}, host)
    assert disagreements({key: value for key, value in defines.items() if key != "FRAME_SIGNAL"}, host)
    assert disagreements(defines, {**host, "MAX_RELAYED_CONNECTIONS": 129})
    assert disagreements(defines, {**host, "_FRAME_EXIT": "X"})
    assert disagreements(defines, {**host, "PROTOCOL_WORD": "OMV2"})
    assert disagreements(defines, {**host, "_FRAME_NEW": "n"}), "a new host constant needs a counterpart"
    assert out_of_bounds({**defines, "CONNECT_TIMEOUT_MS": 10000}, host)
    assert out_of_bounds(defines, {**host, "_MAX_INPUT_FRAME": 65537})
    text = re.sub(r"(#define FRAME_HEADER_SIZE) 5\b", r"\1 (4 + 1)", PROTOCOL_H.read_text())
    assert parse_defines(text)[1], "an unreadable value is reported, not skipped"


def test_the_agent_is_built_from_every_file_in_its_folder() -> None:
    on_disk = {path.name for path in AGENT_DIR.iterdir() if path.suffix in {".c", ".h"}}
    listed = {file for files in agent_build.SOURCE_FILES.values() for file in files}
    assert listed == on_disk
    agent_files = agent_build.SOURCE_FILES[agent_build.AGENT]
    included = {
        name
        for file in agent_files
        for name in re.findall(r'^#include "([^"]+)"', (AGENT_DIR / file).read_text(), re.M)
    }
    assert included <= set(agent_files)


def test_a_change_to_any_agent_file_gives_a_new_binary_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = agent_build.source_files(agent_build.AGENT)
    paths = {agent_build.binary_path(tmp_path)}
    for file in original:
        changed = {**original, file: original[file] + b"\n"}
        monkeypatch.setattr(agent_build, "source_files", lambda name=agent_build.AGENT, files=changed: files)
        paths.add(agent_build.binary_path(tmp_path))
    assert len(paths) == len(original) + 1


def test_every_file_the_helpers_are_built_from_is_packaged() -> None:
    package_data = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["openmicrovm"]
    runtime = Path(agent_client.__file__).parent
    package = runtime.parent
    packaged = {path for pattern in package_data for path in package.glob(pattern)}
    for files in agent_build.SOURCE_FILES.values():
        for file in files:
            assert runtime / "agent" / file in packaged, f"{file} is not in package-data"


def test_one_file_helpers_keep_their_cache_paths(tmp_path: Path) -> None:
    """The shim and idmap hash their one file as before the agent became several files."""
    flags = " ".join(agent_build.COMPILER_FLAGS).encode()
    for name in (agent_build.SHIM, agent_build.IDMAP):
        digest = hashlib.sha256((AGENT_DIR / f"{name}.c").read_bytes() + flags).hexdigest()[:16]
        assert agent_build.binary_path(tmp_path, name).parent == tmp_path / name / digest

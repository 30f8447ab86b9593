"""The wire between a replica and a host agent: an authenticated request line, then bytes.

    agent → replica   b"OMV-RELAY 1 <nonce hex>\\n"            a fresh challenge per connection
    replica → agent   <JSON request>\\n                         {"op", ..., "proof"}
    agent → replica   <JSON answer>\\n                          {"ok": true} or {"ok": false, "error", "message"}
    then, for "connect": the app's TCP bytes both ways; for "shell": frames (below).

The proof is HMAC-SHA256 over the challenge and the request, keyed with the cluster secret: only
a process that knows the secret gets past the first line, and a recorded request is worth
nothing on another connection. The agent proves the secret back over the replica's nonce and its
answer, so that a replica never relays a client's bytes to a stranger at an agent's address. The bytes that follow are not encrypted: run agents on a private
network (as the deployment files do) or reach them through a tunnel.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import struct
from typing import Any

GREETING = b"OMV-RELAY 1 "
MAX_LINE = 16 * 1024
HANDSHAKE_SECONDS = 5.0

# Errors an agent answers with, and what the replica makes of them.
PORT_NOT_LISTENING = "port_not_listening"
TOO_MANY_CONNECTIONS = "too_many_connections"
UNREACHABLE = "unreachable"
DENIED = "denied"

# Shell frames: one type byte, a 4-byte big-endian length, the payload.
FRAME_HEADER = struct.Struct(">cI")
FRAME_DATA = b"D"  # terminal bytes, both ways
FRAME_RESIZE = b"R"  # replica → agent: JSON [rows, cols]
FRAME_EXIT = b"X"  # agent → replica: the command's exit status, in decimal
MAX_FRAME = 1024 * 1024


class RelayError(Exception):
    """The other side broke the protocol, failed the proof, or went away."""


def new_challenge() -> str:
    return secrets.token_hex(16)


def proof(secret: bytes, challenge: str, request: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in request.items() if k != "proof"}, sort_keys=True)
    return hmac.new(secret, f"{challenge}\n{body}".encode(), hashlib.sha256).hexdigest()


def proven(secret: bytes, challenge: str, request: dict[str, Any]) -> bool:
    offered = request.get("proof")
    return isinstance(offered, str) and hmac.compare_digest(offered, proof(secret, challenge, request))


def answer_proof(secret: bytes, challenge: str, nonce: str, answer: dict[str, Any]) -> str:
    """The agent's side: the same secret, over the replica's nonce (fresh per connection)."""
    return proof(secret, f"agent\n{challenge}\n{nonce}", answer)


def answer_proven(secret: bytes, challenge: str, nonce: str, answer: dict[str, Any]) -> bool:
    offered = answer.get("proof")
    expected = answer_proof(secret, challenge, nonce, answer)
    return isinstance(offered, str) and hmac.compare_digest(offered, expected)


async def read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), HANDSHAKE_SECONDS)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError) as error:
        raise RelayError(f"no complete line: {type(error).__name__}") from None
    return line[:-1]


async def read_json(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await read_line(reader)
    try:
        value = json.loads(line)
    except ValueError:
        raise RelayError("a line that is not JSON") from None
    if not isinstance(value, dict):
        raise RelayError("a JSON line that is not an object")
    return value


def json_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


def frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next frame, or None at a clean end of the stream."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            return None
        raise RelayError("a truncated frame header") from None
    kind, length = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME:
        raise RelayError(f"a frame of {length} bytes")
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise RelayError("a truncated frame") from None

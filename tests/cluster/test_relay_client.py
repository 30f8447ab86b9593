"""A replica relays a client's bytes only to a host agent that proves the cluster secret back: a
stranger listening at an agent's address (a recycled IP, a process that took the port) gets the
request line and nothing else."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from openmicrovm.cluster import relay_protocol as wire
from openmicrovm.cluster.relay_client import open_relay
from openmicrovm.runtime.driver import DriverError, PortNotListening

SECRET = secrets.token_bytes(32)
Answer = Callable[[str, dict[str, Any]], dict[str, Any]]


async def _agent(answer: Answer) -> tuple[asyncio.Server, list[bytes]]:
    """A pretend agent on 127.0.0.1 that greets, reads one request and writes answer(challenge, request),
    then anything the client sends is recorded."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        challenge = wire.new_challenge()
        writer.write(wire.GREETING + challenge.encode() + b"\n")
        request = json.loads(await reader.readline())
        writer.write(wire.json_line(answer(challenge, request)))
        await writer.drain()
        received.append(await reader.read(1024))
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), received


def _url(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_stranger_that_answers_yes_without_the_secret_gets_no_bytes() -> None:
    async def scenario() -> None:
        server, received = await _agent(lambda challenge, request: {"ok": True, "proof": "0" * 64})
        async with server:
            with pytest.raises(DriverError, match="could not prove the cluster secret"):
                await open_relay(
                    _url(server), SECRET, {"op": "connect", "microvm": "microvm-x", "port": 8080}
                )
            await asyncio.sleep(0.1)
        assert received == [b""]  # the connection was dropped before a byte of the client's was sent

    asyncio.run(scenario())


def test_an_agent_that_proves_the_secret_is_believed_and_its_refusals_mean_what_they_say() -> None:
    def signed(fields: dict[str, Any]) -> Answer:
        def answer(challenge: str, request: dict[str, Any]) -> dict[str, Any]:
            assert wire.proven(SECRET, challenge, request)
            return dict(fields, proof=wire.answer_proof(SECRET, challenge, request["nonce"], fields))

        return answer

    async def scenario() -> None:
        server, _ = await _agent(signed({"ok": True}))
        async with server:
            _, writer = await open_relay(_url(server), SECRET, {"op": "connect", "microvm": "m", "port": 1})
            writer.close()
        refusal = {"ok": False, "error": wire.PORT_NOT_LISTENING, "message": "nothing listens on port 1"}
        server, _ = await _agent(signed(refusal))
        async with server:
            with pytest.raises(PortNotListening, match="nothing listens on port 1"):
                await open_relay(_url(server), SECRET, {"op": "connect", "microvm": "m", "port": 1})

    asyncio.run(scenario())

"""The refusals an HTTP/2 stream gets for what the rest of the server says (a database away, a
MicroVM that takes no more connections, an app not listening, a MicroVM that cannot be
resumed), each on its own stream while the connection goes on serving. The server's side is the
real HTTP/2 connection and relay; only the backend behind them is scripted, since these states
need a database outage or gVisor's connection cap to arise for real (both are tested for
HTTP/1.1 elsewhere: tests/api/test_database_outage.py, tests/reliability/test_hostile_apps.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from openmicrovm.endpoint.backend import Target, Unreachable
from openmicrovm.endpoint.h2_relay import H2EndpointRelay
from openmicrovm.endpoint.h2_server import H2ServerConnection
from openmicrovm.endpoint.proxy import Counters
from openmicrovm.runtime.driver import PortNotListening, TooManyConnections
from openmicrovm.service.token_seal import TokenClaims
from openmicrovm.states import MicrovmState
from openmicrovm.store import StoreUnavailable

HOST = "0b5e6f5e-7f43-4c4e-9a57-0d2f0c6e4a11.lambda-microvm.us-east-1.localhost"
TARGET = Target("microvm-1", "000000000000", MicrovmState.RUNNING, False, frozenset({"HTTP_INGRESS"}))


class ScriptedKeyRing:
    def open(self, token: str) -> TokenClaims:
        return TokenClaims(TARGET.account, TARGET.microvm_id, ((8080, 8080),), "endpoint", 0.0, 1e12, "t")


@dataclass
class ScriptedService:
    keyring: ScriptedKeyRing

    def clock(self) -> float:
        return 1000.0


class ScriptedBackend:
    """Answers per path: what lookup, ready and connect do for a request to that path."""

    def __init__(self) -> None:
        self.service = ScriptedService(ScriptedKeyRing())
        self.path = ""

    async def lookup(self, hostname: str) -> Target | None:
        if self.path == "/database-away":
            raise StoreUnavailable("the database is unavailable")
        return TARGET

    async def ready(self, target: Target) -> None:
        if self.path == "/cannot-resume":
            raise Unreachable("MicroVM is suspended and auto-resume is off")

    async def connect(self, microvm_id: str, port: int) -> Any:
        if self.path == "/too-many":
            raise TooManyConnections("the sandbox is relaying as many connections as it takes")
        raise PortNotListening("nothing listens")

    def record_activity(self, microvm_id: str) -> None:
        pass


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/database-away", 503, b"The service's database is unavailable; try again shortly."),
        ("/too-many", 429, b"Too many concurrent connections to this MicroVM"),
        ("/not-listening", 502, b""),
        ("/cannot-resume", 502, b""),
    ],
)
def test_each_refusal_is_a_response_on_its_stream(path: str, status: int, body: bytes) -> None:
    async def exchange() -> list[tuple[int, bytes]]:
        backend = ScriptedBackend()
        statuses: list[int] = []
        counters = Counters(on_request=lambda _vm, code: statuses.append(code))

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            relay = H2EndpointRelay(backend, counters, lambda: None, secure=False)  # type: ignore[arg-type]
            await H2ServerConnection(reader, writer, relay.handle, 30.0, relay.close).serve(b"")

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname())
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        answers: list[tuple[int, bytes]] = []
        for each in (path, path):  # twice on one connection: the first refusal does not end it
            backend.path = each
            stream_id = client.get_next_available_stream_id()
            client.send_headers(
                stream_id,
                [
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":authority", HOST),
                    (":path", each),
                    ("x-aws-proxy-auth", "t"),
                ],
                end_stream=True,
            )
            writer.write(client.data_to_send())
            got_status, got_body, ended = 0, b"", False
            while not ended:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the server ended the connection"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        got_status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        got_body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                writer.write(client.data_to_send())
            answers.append((got_status, got_body))
        # Counted per MicroVM, like HTTP/1.1 requests: a lookup that failed names none.
        assert statuses == ([] if path == "/database-away" else [status, status])
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)  # the server sees the end and finishes its connection
        listener.close()
        await listener.wait_closed()
        return answers

    assert asyncio.run(exchange()) == [(status, body), (status, body)]

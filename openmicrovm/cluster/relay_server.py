"""The host agent's end of the relay: replicas that prove the cluster secret reach the apps,
shells and logs of the MicroVMs and builds on this host (see relay_protocol.py); nobody else gets
past the first line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any

from openmicrovm.cluster import relay_protocol as wire
from openmicrovm.lifecycle.microvm_engine import MicrovmEngine
from openmicrovm.logs.store import LogStore
from openmicrovm.runtime.driver import DriverError, PortNotListening, PtySession, TooManyConnections

log = logging.getLogger("openmicrovm.relay")
# Connections that have not yet proven the secret, at once: a flood of idle sockets cannot pile up.
MAX_UNPROVEN = 64
_COPY_CHUNK = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_COPY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class _Answers:
    """The agent's answer line on one proven connection, signed over the replica's nonce."""

    def __init__(self, secret: bytes, challenge: str, nonce: str, writer: asyncio.StreamWriter) -> None:
        self.secret = secret
        self.challenge = challenge
        self.nonce = nonce
        self.writer = writer

    def _write(self, answer: dict[str, Any]) -> None:
        proof = wire.answer_proof(self.secret, self.challenge, self.nonce, answer)
        self.writer.write(wire.json_line(dict(answer, proof=proof)))

    def accept(self, **fields: Any) -> None:
        self._write({"ok": True, **fields})

    async def refuse(self, error: str, message: str) -> None:
        self._write({"ok": False, "error": error, "message": message})
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()


class RelayServer:
    def __init__(self, engine: MicrovmEngine, logs: LogStore, secret: bytes) -> None:
        self.engine = engine
        self.logs = logs
        self.secret = secret
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._unproven = 0

    async def start(self, host: str, port: int) -> int:
        """Listen; the port listened on (a free one when `port` is 0)."""
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every relayed connection (also what fencing does first)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            proven = await self._authenticate(reader, writer)
            if proven is not None:
                await self._dispatch(*proven, reader, writer)
        except (wire.RelayError, ValueError, TypeError) as error:
            log.info("relay connection refused: %s", error)
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(writer)
            writer.transport.abort()

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[dict[str, Any], _Answers] | None:
        if self._unproven >= MAX_UNPROVEN:
            return None
        self._unproven += 1
        try:
            challenge = wire.new_challenge()
            writer.write(wire.GREETING + challenge.encode() + b"\n")
            request = await wire.read_json(reader)
        finally:
            self._unproven -= 1
        if not wire.proven(self.secret, challenge, request):
            writer.write(
                wire.json_line(
                    {"ok": False, "error": wire.DENIED, "message": "proof of the cluster secret failed"}
                )
            )
            raise wire.RelayError("a request without a valid proof of the cluster secret")
        return request, _Answers(self.secret, challenge, str(request.get("nonce", "")), writer)

    async def _dispatch(
        self,
        request: dict[str, Any],
        answers: _Answers,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        op, microvm_id = request.get("op"), str(request.get("microvm", ""))
        if op == "connect":
            await self._connect(microvm_id, int(request.get("port", 0)), answers, reader, writer)
        elif op == "logs":
            await self._logs(str(request.get("stream", "")), request, answers, writer)
        elif op == "shell":
            rows, cols = int(request.get("rows", 24)), int(request.get("cols", 80))
            await self._shell(microvm_id, rows, cols, answers, reader, writer)
        else:
            await answers.refuse(wire.UNREACHABLE, f"unknown op {op!r}")

    async def _logs(
        self, stream: str, request: dict[str, Any], answers: _Answers, writer: asyncio.StreamWriter
    ) -> None:
        """A chunk of one of this host's logs: its size on the first line, then the JSON."""
        try:
            self.logs.path(stream)  # refuses a stream name that is not a build's or a MicroVM's
            chunk = await asyncio.to_thread(
                self.logs.read_from, stream, int(request.get("after", 0)), int(request.get("limit", 0))
            )
        except (ValueError, TypeError) as error:
            return await answers.refuse(wire.UNREACHABLE, f"no such log: {error}")
        body = json.dumps(dataclasses.asdict(chunk)).encode()
        answers.accept(bytes=len(body))
        writer.write(body)
        writer.close()  # flushes the chunk, then ends the connection: the replica reads to the end
        await writer.wait_closed()

    async def _connect(
        self,
        microvm_id: str,
        port: int,
        answers: _Answers,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            app_reader, app_writer = await self.engine.connect(microvm_id, port)
        except PortNotListening as error:
            return await answers.refuse(wire.PORT_NOT_LISTENING, str(error))
        except TooManyConnections as error:
            return await answers.refuse(wire.TOO_MANY_CONNECTIONS, str(error))
        except (DriverError, OSError) as error:
            return await answers.refuse(wire.UNREACHABLE, str(error))
        answers.accept()
        try:
            await asyncio.gather(_pump(reader, app_writer), _pump(app_reader, writer))
        finally:
            app_writer.transport.abort()

    async def _shell(
        self,
        microvm_id: str,
        rows: int,
        cols: int,
        answers: _Answers,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            session = await self.engine.open_shell(microvm_id, rows, cols)
        except (DriverError, OSError) as error:
            return await answers.refuse(wire.UNREACHABLE, str(error))
        answers.accept()
        output = asyncio.ensure_future(self._shell_output(session, writer))
        try:
            while (received := await wire.read_frame(reader)) is not None:
                kind, payload = received
                if kind == wire.FRAME_DATA:
                    await session.write(payload)
                elif kind == wire.FRAME_RESIZE:
                    rows, cols = json.loads(payload)
                    await session.resize(int(rows), int(cols))
        except (wire.RelayError, ValueError, TypeError) as error:
            log.info("shell relay for %s ended: %s", microvm_id, error)
        finally:
            await session.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(output, 5)
            output.cancel()

    @staticmethod
    async def _shell_output(session: PtySession, writer: asyncio.StreamWriter) -> None:
        while data := await session.read():
            writer.write(wire.frame(wire.FRAME_DATA, data))
            await writer.drain()
        status = await session.wait()
        writer.write(wire.frame(wire.FRAME_EXIT, str(status).encode()))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

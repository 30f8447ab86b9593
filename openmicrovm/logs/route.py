"""`GET /_openmicrovm/logs/{builds|microvms}/{id}?after=<offset>`: read a build's or a MicroVM's
log, for `openmicrovm logs` and anyone else who wants it over HTTP.

Logs are not part of the AWS API, so this small read-only route sits beside it. It is
authenticated exactly like the API (SigV4 with the service name `lambda`; with no access keys
configured, any or no signature maps to the default account) and answers only for builds and
MicroVMs of the caller's own account and region: anything else is simply not found.

The answer is JSON: `lines` (each "<ISO-8601 timestamp> <message>"), `nextOffset` to pass as
`after` next time, `endOffset` (where the log ends now), `skippedBytes` (rotated away before
they were read), the resource's `state`, `finished` (it has ended and will write no more) and
`loggingDisabled`. `limit=<bytes>` bounds one answer; `wait=<seconds>` (up to 5) holds it until
there is something new, for followers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from openmicrovm.api.auth import AuthError, SignedRequest, identify
from openmicrovm.api.protocol import (
    JSON_CONTENT_TYPE,
    UNAVAILABLE_CODE,
    UNAVAILABLE_MESSAGE,
    UNAVAILABLE_STATUS,
    error_response,
)
from openmicrovm.logs.store import LogChunk, LogStore
from openmicrovm.service.core import Service
from openmicrovm.states import FINISHED_BUILD_STATES, MicrovmState
from openmicrovm.store import StoreUnavailable, Tx

LOGS_ROUTE = "/_openmicrovm/logs/{kind:builds|microvms}/{id}"
DEFAULT_LIMIT = 256 * 1024
MAX_LIMIT = 1024 * 1024
# Short enough that a follower never holds up a server shut-down for long (aiohttp waits for
# in-flight requests), long enough that following costs a request every few seconds at most.
MAX_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.2

_NOT_FOUND = {"builds": "Build not found: {}", "microvms": "MicroVM not found: {}"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Owner:
    """Whose build or MicroVM a log belongs to, and where it stands."""

    account: str
    region: str
    state: str
    finished: bool
    config: dict[str, Any]


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error(code: str, message: str, status: int | None = None) -> web.Response:
    status, headers, body = error_response(code, message, status=status)
    return web.Response(status=status, headers=headers, body=body)


def _number(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _Refused(
            "ValidationException", f"Query parameter {name} must be a number, got {raw!r}."
        ) from None
    if not low <= value <= high:
        raise _Refused("ValidationException", f"Query parameter {name} must be between {low:g} and {high:g}.")
    return value


LogReader = Callable[[str, int, int], Awaitable[LogChunk]]


def make_logs_handler(service: Service, logs: LogStore, read_log: LogReader) -> Handler:
    """The aiohttp handler for LOGS_ROUTE; read_log(stream, after, limit) reads a chunk wherever
    the log is kept (this host, or the host agent that writes it)."""

    def owner(tx: Tx, kind: str, resource_id: str) -> _Owner | None:
        if kind == "builds":
            job = tx.builds.job(resource_id)
            if job is None:
                return None
            state = job.build.state
            return _Owner(job.account, job.region, state.value, state in FINISHED_BUILD_STATES, job.config)
        microvm = tx.microvms.get(resource_id)
        if microvm is None:
            return None
        finished = microvm.state is MicrovmState.TERMINATED
        return _Owner(microvm.account, microvm.region, microvm.state.wire, finished, microvm.config)

    async def resource(kind: str, resource_id: str, account: str, region: str) -> dict[str, Any]:
        found = await service.fetch(lambda tx: owner(tx, kind, resource_id))
        if found is None or found.account != account or found.region != region:
            raise _Refused("ResourceNotFoundException", _NOT_FOUND[kind].format(resource_id))
        return {
            "state": found.state,
            "finished": found.finished,
            "loggingDisabled": "disabled" in (found.config.get("logging") or {}),
        }

    async def handle(request: web.Request) -> web.StreamResponse:
        kind, resource_id = request.match_info["kind"], request.match_info["id"]
        try:
            caller = identify(
                service.settings,
                SignedRequest(request.method, str(request.url), dict(request.headers), b""),
            )
            after = int(_number(request, "after", 0, 0, 2**62))
            limit = int(_number(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))
            wait = _number(request, "wait", 0, 0, MAX_WAIT_SECONDS)
            stream = f"{kind}/{resource_id}"
            try:
                logs.path(stream)
            except ValueError:
                raise _Refused("ResourceNotFoundException", _NOT_FOUND[kind].format(resource_id)) from None
            # The state is read before the lines: once it says finished, every line is written.
            status = await resource(kind, resource_id, caller.account, caller.region)
            deadline = asyncio.get_running_loop().time() + wait
            chunk = await read_log(stream, after, limit)
            while not chunk.lines and not status["finished"] and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(_POLL_SECONDS)
                status = await resource(kind, resource_id, caller.account, caller.region)
                chunk = await read_log(stream, after, limit)
        except AuthError as error:
            return _error(error.code, error.message)
        except _Refused as error:
            return _error(error.code, error.message)
        except StoreUnavailable:
            return _error(UNAVAILABLE_CODE, UNAVAILABLE_MESSAGE, UNAVAILABLE_STATUS)
        body = {
            "stream": stream,
            "lines": chunk.lines,
            "nextOffset": chunk.next_offset,
            "skippedBytes": chunk.skipped,
            "endOffset": chunk.end_offset,
            **status,
        }
        return web.Response(body=json.dumps(body).encode(), content_type=JSON_CONTENT_TYPE)

    return handle

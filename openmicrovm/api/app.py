"""The HTTP front door of the control plane: route, authenticate, parse, validate, call the
service, serialise. No request can crash the server: a database outage becomes a 503
ServiceException, anything unexpected a 500 InternalServerException, and both are logged."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web

from openmicrovm.api.auth import AuthError, SignedRequest, identify
from openmicrovm.api.body import BodyTooLarge, read_body_limited
from openmicrovm.api.protocol import (
    JSON_CONTENT_TYPE,
    UNAVAILABLE_CODE,
    UNAVAILABLE_MESSAGE,
    UNAVAILABLE_STATUS,
    error_response,
    parse_input,
    serialize_output,
)
from openmicrovm.api.routing import Router
from openmicrovm.api.validation import Validator
from openmicrovm.service import Service
from openmicrovm.service.context import RequestContext
from openmicrovm.service.errors import ServiceError
from openmicrovm.store import StoreUnavailable

log = logging.getLogger("openmicrovm.api")


class ControlPlane:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.router = Router()
        self.validator = Validator(
            {"IdlePolicyMaxIdleDurationSecondsInteger": service.settings.min_idle_seconds}
        )

    def _error(
        self,
        request_id: str,
        code: str,
        message: str,
        members: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> web.Response:
        status, headers, body = error_response(code, message, members, status)
        headers["x-amzn-RequestId"] = request_id
        return web.Response(status=status, headers=headers, body=body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        raw_path = request.rel_url.raw_path
        match = self.router.match(request.method, raw_path)
        if match is None:
            allowed = self.router.allows(raw_path)
            hint = f"; this path accepts {', '.join(allowed)}" if allowed else ""
            return self._error(
                request_id,
                "UnknownOperationException",
                f"No operation matches {request.method} {raw_path}{hint}",
            )
        operation = match.operation
        try:
            body = await read_body_limited(request, self.service.settings.max_request_bytes)
            caller = identify(
                self.service.settings,
                SignedRequest(request.method, str(request.url), dict(request.headers), body),
            )
            params = parse_input(operation, match.labels, request.rel_url.raw_query_string, body)
            self.validator.check(operation.input_shape, params)
            context = RequestContext(caller.account, caller.region, request_id)
            if operation.http["method"] == "GET" and self.service.store.reads_inline:
                # Reads only (the store refuses a write here), from SQLite's read connection,
                # which never waits: cheaper inline than the hop to a store thread.
                result = self.service.call(operation.name, context, params)
            else:
                # Off the event loop: an operation waits on the database, and the loop must not.
                result = await self.service.run(self.service.call, operation.name, context, params)
        except ServiceError as error:
            return self._error(request_id, error.code, error.message, error.members)
        except AuthError as error:
            return self._error(request_id, error.code, error.message)
        except BodyTooLarge as error:
            return self._error(request_id, "RequestEntityTooLargeException", str(error))
        except StoreUnavailable as error:
            log.warning("%s: %s (request %s)", operation.name, error, request_id)
            return self._error(request_id, UNAVAILABLE_CODE, UNAVAILABLE_MESSAGE, status=UNAVAILABLE_STATUS)
        except Exception:
            log.exception("%s failed (request %s)", operation.name, request_id)
            return self._error(
                request_id,
                "InternalServerException",
                f"Internal error; the server log has request {request_id}.",
            )
        payload = serialize_output(operation, result)
        headers = {"x-amzn-RequestId": request_id}
        if payload is None:
            return web.Response(status=operation.http.get("responseCode", 200), headers=headers)
        headers["Content-Type"] = JSON_CONTENT_TYPE
        return web.Response(status=operation.http.get("responseCode", 200), headers=headers, body=payload)

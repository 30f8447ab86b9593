"""A request body read whole, but never past a limit: the API's JSON bodies and the console's
uploads are refused (RequestEntityTooLargeException) before an oversized one is held in memory."""

from __future__ import annotations

from aiohttp import web


class BodyTooLarge(Exception):
    """The body is over the limit; the message says by how much, for the client."""


async def read_body_limited(request: web.Request, limit: int, what: str = "") -> bytes:
    """The whole body, or BodyTooLarge: at once when Content-Length says so, else as soon as
    the bytes read pass `limit`. `what` tells the client what the limit stands for."""
    aside = f" ({what})" if what else ""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"The request body is {request.content_length} bytes; the limit is {limit}{aside}."
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes{aside}.")
        chunks.append(chunk)
    return b"".join(chunks)

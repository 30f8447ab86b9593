"""`POST /_openmicrovm/artifacts`: store a code artifact zip sent over HTTP, for CreateMicrovmImage
and UpdateMicrovmImage to name by the file:// URI it answers with.

The CLI writes its zip straight into an artifact dir the server reads; a browser cannot, so the
console sends the zip here. It is authenticated like the API (api/auth.py). The body is JSON,
`{"zipFile": "<base64>"}`, like every other body this server takes (api/cross_site.py: a web page
can send any other type cross-site without the browser asking first). The zip is stored under a
name made of its SHA-256 in the first of the setting artifact_file_roots, so that sending the same
folder twice stores it once and a name cannot be guessed without the content. The answer is
`{"codeArtifact": {"uri": "file:///..."}, "sha256": ..., "size": ...}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import os
import tempfile
import uuid
import zipfile
from pathlib import Path

import orjson
from aiohttp import web

from openmicrovm.api.auth import AuthError, SignedRequest, identify
from openmicrovm.api.body import BodyTooLarge, read_body_limited
from openmicrovm.api.protocol import JSON_CONTENT_TYPE, error_response
from openmicrovm.config import Settings

UPLOAD_ROUTE = "/_openmicrovm/artifacts"
UPLOAD_NAME_PREFIX = "upload-"


class UploadRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def body_limit(max_upload_bytes: int) -> int:
    """The largest JSON body that can carry a zip of max_upload_bytes (base64 plus the wrapper)."""
    return -(-max_upload_bytes // 3) * 4 + 1024


def decode_upload(body: bytes, max_upload_bytes: int) -> bytes:
    """The zip a request body carries, or UploadRefused saying what was wrong with it."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UploadRefused(
            "ValidationException", 'The body must be JSON: {"zipFile": "<base64 zip>"}.'
        ) from None
    encoded = document.get("zipFile") if isinstance(document, dict) else None
    if not isinstance(encoded, str) or not encoded:
        raise UploadRefused(
            "ValidationException",
            'The body must hold "zipFile": the zip\'s bytes in base64, a non-empty string.',
        )
    try:
        archive = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise UploadRefused("ValidationException", '"zipFile" is not valid base64.') from None
    if len(archive) > max_upload_bytes:
        raise UploadRefused(
            "RequestEntityTooLargeException",
            f"The zip is {len(archive)} bytes; the limit is {max_upload_bytes} (setting max_upload_bytes).",
        )
    if not zipfile.is_zipfile(io.BytesIO(archive)):
        raise UploadRefused(
            "ValidationException", '"zipFile" is not a zip archive; send the folder\'s files zipped.'
        )
    return archive


def store_upload(archive: bytes, directory: Path) -> Path:
    """Write the zip under its content's name; an equal file already there is kept. Written to a
    private temporary name first, then renamed, so a build never reads half a zip and a file or
    symlink planted under the final name (a shared, sticky upload dir) is replaced, not followed."""
    digest = hashlib.sha256(archive).hexdigest()
    target = directory / f"{UPLOAD_NAME_PREFIX}{digest}.zip"
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(archive)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _answer(status: int, document: dict[str, object]) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(document),
        headers={"Content-Type": JSON_CONTENT_TYPE, "x-amzn-RequestId": str(uuid.uuid4())},
    )


def _refusal(code: str, message: str) -> web.Response:
    status, headers, payload = error_response(code, message)
    headers["x-amzn-RequestId"] = str(uuid.uuid4())
    return web.Response(status=status, headers=headers, body=payload)


def make_upload_handler(settings: Settings) -> web.RequestHandler:
    directory = settings.effective_artifact_file_roots[0]

    async def handle(request: web.Request) -> web.Response:
        try:
            body = await read_body_limited(
                request, body_limit(settings.max_upload_bytes), "a zip of max_upload_bytes in base64"
            )
            identify(settings, SignedRequest(request.method, str(request.url), dict(request.headers), body))
            archive = decode_upload(body, settings.max_upload_bytes)
            stored = await asyncio.to_thread(store_upload, archive, directory)
        except AuthError as error:
            return _refusal(error.code, error.message)
        except UploadRefused as error:
            return _refusal(error.code, error.message)
        except BodyTooLarge as error:
            return _refusal("RequestEntityTooLargeException", str(error))
        except OSError as error:
            return _refusal(
                "ServiceException",
                f"The zip could not be stored in {directory}: {error.strerror}. Check that the "
                "directory (the first of the setting artifact_file_roots) is writable and has room.",
            )
        return _answer(
            201,
            {
                "codeArtifact": {"uri": f"file://{stored}"},
                "sha256": stored.name[len(UPLOAD_NAME_PREFIX) : -len(".zip")],
                "size": len(archive),
            },
        )

    return handle

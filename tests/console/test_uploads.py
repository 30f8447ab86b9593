"""POST /_openmicrovm/artifacts, the console's upload of a code artifact zip: what it stores, and
what a web page, a bad body, an oversized zip or an unsigned caller gets instead."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from openmicrovm.console.uploads import UPLOAD_ROUTE, store_upload
from tests.support.http import RawResponse, raw_request
from tests.support.images import zip_files
from tests.support.server import ServerProcess

APP_ZIP = zip_files(
    {"Dockerfile": "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n", "app.py": "print(1)\n"}
)
KEY = {"access_key_id": "AKIDUPLOADS", "secret_access_key": "uploads-secret", "account_id": "333333333333"}


def post(server: ServerProcess, body: bytes | str, headers: dict[str, str] | None = None) -> RawResponse:
    sent = {"Host": f"127.0.0.1:{server.port}", "Content-Type": "application/json", **(headers or {})}
    return raw_request(server.port, "POST", UPLOAD_ROUTE, body, sent)


def upload_body(archive: bytes) -> str:
    return json.dumps({"zipFile": base64.b64encode(archive).decode()})


def stored_path(answer: RawResponse) -> Path:
    uri = answer.json()["codeArtifact"]["uri"]
    assert uri.startswith("file:///")
    return Path(uri[len("file://") :])


def test_a_zip_is_stored_under_its_hash_readable_by_the_server_only(server: ServerProcess) -> None:
    answer = post(server, upload_body(APP_ZIP))
    assert answer.status == 201, answer.body
    path = stored_path(answer)
    assert path.read_bytes() == APP_ZIP
    assert answer.json()["sha256"] == hashlib.sha256(APP_ZIP).hexdigest() and answer.json()["size"] == len(
        APP_ZIP
    )
    assert path.name == f"upload-{hashlib.sha256(APP_ZIP).hexdigest()}.zip"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The same folder sent again is the same file; nothing half-written stays beside it.
    assert stored_path(post(server, upload_body(APP_ZIP))) == path
    assert not [name for name in os.listdir(path.parent) if name.endswith(".partial")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "The body must be JSON"),
        ("[]", '"zipFile"'),
        (json.dumps({"zipFile": ""}), '"zipFile"'),
        (json.dumps({"zipFile": "%%%not-base64"}), "not valid base64"),
        (json.dumps({"zipFile": base64.b64encode(b"just text").decode()}), "not a zip archive"),
    ],
)
def test_a_bad_body_is_refused_saying_what_is_wrong(server: ServerProcess, body: str, message: str) -> None:
    answer = post(server, body)
    assert answer.status == 400 and answer.error_type.startswith("ValidationException")
    assert message in answer.json()["message"]


def test_a_web_page_cannot_upload(server: ServerProcess) -> None:
    # Another site's page: its Origin is refused, and so is a body a form could send without one.
    assert post(server, upload_body(APP_ZIP), {"Origin": "http://evil.example"}).status == 403
    raw = post(server, APP_ZIP, {"Content-Type": "application/zip"})
    assert raw.status == 403 and "Content-Type: application/json" in raw.json()["message"]
    form = post(server, "zipFile=UEsFBg", {"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 403


def test_an_oversized_zip_is_refused_and_leaves_nothing(make_server: Callable[..., ServerProcess]) -> None:
    small = make_server({"max_upload_bytes": 200})
    before = set(os.listdir(small.data_dir.parent))
    big = zip_files({"Dockerfile": os.urandom(400).hex()})
    answer = post(small, upload_body(big))
    assert answer.status == 413 and answer.error_type.startswith("RequestEntityTooLargeException")
    assert "max_upload_bytes" in answer.json()["message"]
    # A body too large for any allowed zip is cut off before it is read whole.
    assert post(small, "x" * 4096).status == 413
    assert set(os.listdir(small.data_dir.parent)) - before <= {"server1"}


def test_with_access_keys_an_upload_must_be_signed(make_server: Callable[..., ServerProcess]) -> None:
    keyed = make_server({"access_keys": [KEY]})
    unsigned = post(keyed, upload_body(APP_ZIP))
    assert unsigned.status in (400, 403) and unsigned.error_type.startswith(
        "MissingAuthenticationTokenException"
    )
    body = upload_body(APP_ZIP)
    request = AWSRequest(
        method="POST",
        url=f"http://127.0.0.1:{keyed.port}{UPLOAD_ROUTE}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    SigV4Auth(Credentials(KEY["access_key_id"], KEY["secret_access_key"]), "lambda", "us-east-1").add_auth(
        request
    )
    signed = post(keyed, body, dict(request.headers.items()))
    assert signed.status == 201, signed.body
    tampered = post(keyed, upload_body(APP_ZIP + b"\0"), dict(request.headers.items()))
    assert tampered.error_type.startswith("InvalidSignatureException")


def test_a_planted_link_under_the_final_name_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    planted = uploads / f"upload-{hashlib.sha256(APP_ZIP).hexdigest()}.zip"
    planted.symlink_to(victim)
    stored = store_upload(APP_ZIP, uploads)
    assert stored == planted and not stored.is_symlink() and stored.read_bytes() == APP_ZIP
    assert victim.read_bytes() == b"keep me"

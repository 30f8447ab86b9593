"""GET /_openmicrovm/logs/{kind}/{id}: served like the API — same SigV4 rules, same accounts —
and only for the caller's own builds and MicroVMs. Waits on the lead's wiring of the route."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cli.helpers import cli
from tests.conftest import image_request
from tests.logs import server_http
from tests.support.server import ServerProcess

ALICE = {"access_key_id": "AKIDALICE", "secret_access_key": "alice-secret", "account_id": "111111111111"}
BOB = {"access_key_id": "AKIDBOB", "secret_access_key": "bob-secret", "account_id": "222222222222"}


def _failed_build(client: Any, name: str, **overrides: Any) -> tuple[str, str]:
    """An image whose artifact does not exist: its build fails at once, after writing its log."""
    arn = client.create_microvm_image(**image_request(name, **overrides))["imageArn"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
        if builds and builds[0]["buildState"] == "FAILED":
            return arn, builds[0]["buildId"]
        time.sleep(0.1)
    raise AssertionError(f"the build of {name} did not fail in time")


def test_only_the_owner_reads_a_build_log(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server({"access_keys": [ALICE, BOB]})
    alice = server.client(key=ALICE["access_key_id"], secret=ALICE["secret_access_key"])
    _, build_id = _failed_build(alice, f"alice-{uuid.uuid4().hex[:6]}")

    status, page = server_http.logs(
        server.url, "builds", build_id, key=ALICE["access_key_id"], secret=ALICE["secret_access_key"]
    )
    assert status == 200, page
    assert page["finished"] is True and page["state"] == "FAILED" and page["loggingDisabled"] is False
    text = server_http.messages(page["lines"])
    assert text[0].startswith(f"build {build_id} of ") and text[-1].startswith("build failed: ")
    assert page["nextOffset"] == page["endOffset"] > 0

    status, page = server_http.logs(
        server.url, "builds", build_id, key=BOB["access_key_id"], secret=BOB["secret_access_key"]
    )
    assert (status, page["code"]) == (404, "ResourceNotFoundException")
    status, page = server_http.logs(server.url, "builds", build_id, key=None)
    assert (status, page["code"]) == (403, "MissingAuthenticationTokenException")
    status, page = server_http.logs(
        server.url, "builds", build_id, key=ALICE["access_key_id"], secret="wrong"
    )
    assert (status, page["code"]) == (403, "InvalidSignatureException")

    # The CLI signs with the caller's credentials from the usual chain.
    as_alice = {
        "AWS_ACCESS_KEY_ID": ALICE["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": ALICE["secret_access_key"],
    }
    shown = cli(server.url, tmp_path, "logs", build_id, extra_env=as_alice)
    assert shown.returncode == 0 and "build failed: " in shown.stdout
    as_bob = {"AWS_ACCESS_KEY_ID": BOB["access_key_id"], "AWS_SECRET_ACCESS_KEY": BOB["secret_access_key"]}
    refused = cli(server.url, tmp_path, "logs", build_id, extra_env=as_bob)
    assert refused.returncode == 1 and "no build with id" in refused.stderr


def test_offsets_and_bad_queries(server: ServerProcess) -> None:
    client = server.client()
    _, build_id = _failed_build(client, f"offsets-{uuid.uuid4().hex[:6]}")
    everything = server_http.all_log_lines(server.url, "builds", build_id)
    status, first = server_http.logs(server.url, "builds", build_id)
    assert status == 200 and first["lines"] == everything
    status, rest = server_http.logs(server.url, "builds", build_id, after=first["nextOffset"])
    assert status == 200 and rest["lines"] == [] and rest["nextOffset"] == first["nextOffset"]
    status, headers, _ = server_http.get(f"{server.url}/_openmicrovm/logs/builds/{build_id}?after=-5")
    assert status == 400 and headers["X-Amzn-Errortype"] == "ValidationException"
    status, headers, _ = server_http.get(f"{server.url}/_openmicrovm/logs/builds/{build_id}?wait=soon")
    assert status == 400 and headers["X-Amzn-Errortype"] == "ValidationException"


def test_disabled_logging_keeps_nothing(server: ServerProcess) -> None:
    client = server.client()
    _, quiet = _failed_build(client, f"quiet-{uuid.uuid4().hex[:6]}", logging={"disabled": {}})
    _, chatty = _failed_build(client, f"chatty-{uuid.uuid4().hex[:6]}")
    logs_dir = server.data_dir / "logs" / "builds"
    assert not list(logs_dir.glob(f"{quiet}.*"))
    assert (logs_dir / f"{chatty}.log").exists()
    status, page = server_http.logs(server.url, "builds", quiet)
    assert status == 200 and page["lines"] == [] and page["loggingDisabled"] is True

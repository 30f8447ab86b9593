"""X-aws-proxy-force-h2: an HTTP/1.1 client reaches an app that speaks only h2c."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.endpoint.conftest import run_microvm
from tests.support.endpoint import auth_token, call
from tests.support.images import REPO, image_request, upload, wait_image_settled, zip_files
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

H2C_APP = REPO / "tests" / "apps" / "h2c"


def _h2c_context() -> dict[str, bytes | str]:
    """The app, its Dockerfile, and the pure-Python h2 packages it imports (from this venv)."""
    files: dict[str, bytes | str] = {p.name: p.read_bytes() for p in H2C_APP.iterdir() if p.is_file()}
    for package in ("h2", "hpack", "hyperframe"):
        root = Path(importlib.import_module(package).__file__).parent  # type: ignore[arg-type]
        for path in root.rglob("*.py"):
            files[f"{package}/{path.relative_to(root)}"] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def h2c_vm(endpoint_server: ServerProcess, moto: MotoServer) -> Any:
    client = endpoint_server.client()
    arn = client.create_microvm_image(
        **image_request(
            "h2c", upload(moto, zip_files(_h2c_context())), resources=[{"minimumMemoryInMiB": 512}]
        )
    )["imageArn"]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    vm = run_microvm(endpoint_server, arn)
    yield vm
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])


def test_force_h2_reaches_an_h2c_app(endpoint_server: ServerProcess, h2c_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), h2c_vm["microvmId"])
    got = call(
        endpoint_server,
        h2c_vm["endpoint"],
        token,
        "/hello?x=1",
        headers={"X-aws-proxy-force-h2": "true", "X-Custom": "kept"},
    )
    assert got.status == 200, got.body
    answer = json.loads(got.body)
    assert (answer["protocol"], answer["method"], answer["path"]) == ("h2", "GET", "/hello?x=1")
    assert answer["authority"].startswith(h2c_vm["endpoint"])
    assert answer["headers"]["x-custom"] == "kept"
    assert not [name for name in answer["headers"] if name.startswith("x-aws-proxy-")]
    posted = call(
        endpoint_server,
        h2c_vm["endpoint"],
        token,
        "/upload",
        method="POST",
        body=b"z" * 200_000,
        headers={"X-aws-proxy-force-h2": "true"},
    )
    assert json.loads(posted.body)["body_bytes"] == 200_000  # larger than one HTTP/2 flow-control window
    # Without the header the endpoint speaks HTTP/1.1, which this app does not understand.
    assert call(endpoint_server, h2c_vm["endpoint"], token, "/").status == 502


def test_force_h2_to_an_http1_app_is_502(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    got = call(
        endpoint_server, echo_vm["endpoint"], token, "/headers", headers={"X-aws-proxy-force-h2": "true"}
    )
    assert (got.status, got.body) == (502, b"")

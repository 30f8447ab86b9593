"""What a server on the process driver refuses and says (security issue 11, item 3): it cannot
contain an app with every capability, so additionalOsCapabilities ALL is a ValidationException at
the API call; and falling back to it when gVisor is missing is a WARNING naming what is lost."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from openmicrovm.runtime.registry import missing_for
from tests.conftest import image_request
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess


@pytest.fixture(autouse=True)
def _process_driver_runs_here() -> None:
    problems = missing_for("process")
    if problems:
        pytest.skip(f"process driver unavailable: {'; '.join(problems)}")


def _refused(error: pytest.ExceptionInfo[ClientError]) -> str:
    assert error.value.response["Error"]["Code"] == "ValidationException"
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return str(error.value.response["Error"]["Message"])


def test_all_capabilities_are_refused_on_the_process_driver(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server({"driver": "process"})
    client = server.client()
    name = f"all-caps-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ClientError) as error:
        client.create_microvm_image(**image_request(name, additionalOsCapabilities=["ALL"]))
    message = _refused(error)
    assert "additionalOsCapabilities ALL" in message and "'process'" in message
    assert "every capability" in message and "gvisor driver" in message
    assert name not in {item["name"] for item in client.list_microvm_images()["items"]}
    # Without ALL the same image is accepted; an update cannot add ALL either.
    created = client.create_microvm_image(**image_request(name))
    assert created["state"] == "CREATING"
    arn = created["imageArn"]
    # An update is checked once the image is no longer busy (its build fails: the bucket is absent).
    deadline = time.monotonic() + 120  # a bound for slow machines, not a performance assertion
    while client.get_microvm_image(imageIdentifier=arn)["state"] in ("CREATING", "UPDATING"):
        assert time.monotonic() < deadline, "the image's build did not end"
        time.sleep(0.2)
    update = image_request(name, additionalOsCapabilities=["ALL"])
    del update["name"]
    with pytest.raises(ClientError) as error:
        client.update_microvm_image(imageIdentifier=arn, **update)
    assert "additionalOsCapabilities ALL" in _refused(error)


def test_all_capabilities_stay_allowed_on_the_gvisor_driver(
    make_server: Callable[..., ServerProcess],
) -> None:
    problems = missing_for("gvisor")
    if problems:
        pytest.skip(f"gvisor driver unavailable: {'; '.join(problems)}")
    client = make_server({"driver": "gvisor"}).client()
    created = client.create_microvm_image(
        **image_request(f"all-caps-{uuid.uuid4().hex[:8]}", additionalOsCapabilities=["ALL"])
    )
    assert created["state"] == "CREATING"


@pytest.fixture
def fallback_server(
    tmp_path: Path, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """A server on driver "auto" where runsc does not run: it falls back to the process driver."""
    env: dict[str, Any] = {**moto.environment(), "OPENMICROVM_RUNSC": str(tmp_path / "no-runsc")}
    with database_backend.server(tmp_path / "server", {"driver": "auto"}, env=env) as server:
        server.start()
        yield server


def test_the_fallback_to_the_process_driver_is_a_warning_naming_what_is_lost(
    fallback_server: ServerProcess,
) -> None:
    fallback_server.client().list_microvm_images()  # up and serving
    lines = [
        line for line in fallback_server.log().splitlines() if "falling back to the process driver" in line
    ]
    assert len(lines) == 1, fallback_server.log()
    line = lines[0]
    assert "WARNING" in line
    assert "no-runsc" in line  # why gVisor is unavailable
    for lost in (
        "isolates less than gVisor",
        "host's kernel",
        "no memory snapshots",
        "no internet egress",
        "ALL",
    ):
        assert lost in line, lost

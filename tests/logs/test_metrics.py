"""GET /metrics: Prometheus text that parses, with figures that follow real operations.
Waits on the lead's wiring: the /metrics route, the engine's listeners and transition observers,
the endpoint's Counters."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cli.helpers import (
    cli,
    cli_json,
    deploy_sample,
    terminate_all,
)
from tests.conftest import image_request
from tests.logs import server_http
from tests.support import endpoint
from tests.support.server import ServerProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess) -> Samples:
    status, headers, body = server_http.get(f"{server.url}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_store_figures_follow_the_api(server: ServerProcess) -> None:
    before = scrape(server)
    assert value(before, "openmicrovm_microvms", state="RUNNING") >= 0  # every state is there
    assert ("openmicrovm_builds", (("state", "FAILED"),)) in before
    client = server.client()
    arn = client.create_microvm_image(**image_request(f"metrics-{uuid.uuid4().hex[:6]}"))["imageArn"]
    deadline = time.monotonic() + 120
    while (
        client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"][0]["buildState"]
        != "FAILED"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    after = scrape(server)
    assert (
        value(after, "openmicrovm_builds", state="FAILED")
        == value(before, "openmicrovm_builds", state="FAILED") + 1
    )
    assert value(after, "openmicrovm_images", state="CREATE_FAILED") == (
        value(before, "openmicrovm_images", state="CREATE_FAILED") + 1
    )
    assert value(after, "openmicrovm_log_lines_written_total", kind="builds") > value(
        before, "openmicrovm_log_lines_written_total", kind="builds"
    )


@pytest.fixture(scope="module")
def sample_image(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("metrics")
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    result = deploy_sample(server.url, folder, name)
    assert result.returncode == 0, result.stderr
    yield name


@pytest.fixture
def microvms(server: ServerProcess) -> Iterator[list[str]]:
    """The ids of the MicroVMs a test starts; whatever is still alive at its end is terminated."""
    started: list[str] = []
    yield started
    terminate_all(server.client(), started)


def test_lifecycle_moves_the_counters(
    server: ServerProcess, sample_image: str, tmp_path: Path, microvms: list[str]
) -> None:
    before = scrape(server)
    assert value(before, "openmicrovm_snapshot_bytes", kind="code") > 0
    microvm = cli_json(server.url, tmp_path, "run", sample_image)
    microvms.append(microvm["microvmId"])
    running = scrape(server)
    assert (
        value(running, "openmicrovm_microvms", state="RUNNING")
        == value(before, "openmicrovm_microvms", state="RUNNING") + 1
    )
    assert value(running, "openmicrovm_microvm_state_changes_total", state="RUNNING") >= (
        value(before, "openmicrovm_microvm_state_changes_total", state="RUNNING") + 1
    )
    assert value(running, "openmicrovm_microvm_transition_seconds_count", kind="run") >= (
        value(before, "openmicrovm_microvm_transition_seconds_count", kind="run") + 1
    )
    assert value(running, "openmicrovm_sandbox_rss_bytes", microvm_id=microvm["microvmId"]) > 0

    token = endpoint.auth_token(server.client(), microvm["microvmId"])
    assert endpoint.app_state(server, microvm, token)["microvmId"] == microvm["microvmId"]
    served = scrape(server)
    assert value(served, "openmicrovm_endpoint_requests_total", code="2xx") >= (
        value(running, "openmicrovm_endpoint_requests_total", code="2xx") + 1
    )
    assert value(served, "openmicrovm_endpoint_bytes_total") > value(
        running, "openmicrovm_endpoint_bytes_total"
    )
    # The same traffic, on this MicroVM's own series (the console charts it).
    assert value(served, "openmicrovm_microvm_endpoint_requests_total", microvm_id=microvm["microvmId"]) >= 1
    assert value(served, "openmicrovm_microvm_endpoint_bytes_total", microvm_id=microvm["microvmId"]) > 0

    cli_json(server.url, tmp_path, "suspend", microvm["microvmId"])
    cli_json(server.url, tmp_path, "resume", microvm["microvmId"])
    cli_json(server.url, tmp_path, "terminate", microvm["microvmId"])
    after = scrape(server)
    for kind in ("suspend", "resume", "terminate"):
        assert value(after, "openmicrovm_microvm_transition_seconds_count", kind=kind) >= (
            value(before, "openmicrovm_microvm_transition_seconds_count", kind=kind) + 1
        ), kind
    assert value(after, "openmicrovm_microvms", state="TERMINATED") == (
        value(before, "openmicrovm_microvms", state="TERMINATED") + 1
    )
    assert ("openmicrovm_sandbox_rss_bytes", (("microvm_id", microvm["microvmId"]),)) not in after
    # A terminated MicroVM's traffic series go with it: they do not pile up.
    assert (
        "openmicrovm_microvm_endpoint_bytes_total",
        (("microvm_id", microvm["microvmId"]),),
    ) not in after


def test_a_run_with_logging_disabled_keeps_no_log(
    server: ServerProcess, sample_image: str, tmp_path: Path, microvms: list[str]
) -> None:
    quiet = cli_json(server.url, tmp_path, "run", sample_image, "--logging", "disabled")
    microvms.append(quiet["microvmId"])
    chatty = cli_json(server.url, tmp_path, "run", sample_image)
    microvms.append(chatty["microvmId"])
    for microvm in (quiet, chatty):
        cli_json(server.url, tmp_path, "suspend", microvm["microvmId"])
        cli_json(server.url, tmp_path, "terminate", microvm["microvmId"])
    logs_dir = server.data_dir / "logs" / "microvms"
    assert not list(logs_dir.glob(f"{quiet['microvmId']}.*"))
    assert (logs_dir / f"{chatty['microvmId']}.log").exists()
    shown = cli(server.url, tmp_path, "logs", quiet["microvmId"])
    assert shown.returncode == 0 and shown.stdout == ""
    assert "logging is disabled" in shown.stderr

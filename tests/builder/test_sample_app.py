"""The sample app on its own (a host process): hooks, knobs, and what GET / reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from tests.support.images import SAMPLE_APP
from tests.support.server import free_port

HOOK = "/aws/lambda-microvms/runtime/v1/"

App = Callable[..., str]


@pytest.fixture
def start_app() -> Iterator[App]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> str:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(SAMPLE_APP / "app.py")],
            env={**os.environ, "PORT": str(port), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                return url
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("the sample app did not start")

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def post(url: str, hook: str, body: dict[str, str] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url + HOOK + hook, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_ready_is_503_at_first_then_200_and_hooks_are_counted(start_app: App) -> None:
    url = start_app(READY_DELAY="1.0")
    assert post(url, "ready") == 503
    deadline = time.monotonic() + 10
    while post(url, "ready") != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert post(url, "run", {"microvmId": "microvm-1", "runHookPayload": "hello"}) == 200
    assert post(url, "suspend") == 200 and post(url, "resume") == 200
    first, second = get(url), get(url)
    assert first["id"] == second["id"]
    assert (first["counter"], second["counter"]) == (2, 3)  # the startup probe was the first
    assert (first["microvmId"], first["payload"]) == ("microvm-1", "hello")
    hooks = first["hooks"]
    assert isinstance(hooks, dict) and hooks["run"] == 1 and hooks["suspend"] == 1 and hooks["ready"] >= 2


def test_environment_knobs(start_app: App) -> None:
    url = start_app(READY_DELAY="0", READY_STATUS="500", VALIDATE_STATUS="404")
    assert post(url, "ready") == 500
    assert post(url, "validate") == 404
    assert post(url, "terminate") == 200


def test_a_json_run_payload_sets_knobs_for_this_microvm(start_app: App) -> None:
    url = start_app(READY_DELAY="0")
    payload = json.dumps({"SUSPEND_STATUS": "500"})
    assert post(url, "run", {"microvmId": "microvm-2", "runHookPayload": payload}) == 200
    assert post(url, "suspend") == 500
    assert get(url)["payload"] == payload
    assert (
        post(url, "run", {"microvmId": "microvm-3", "runHookPayload": json.dumps({"RUN_STATUS": "500"})})
        == 500
    )

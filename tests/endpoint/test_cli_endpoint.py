"""`openmicrovm curl | forward | shell` against the real server: tokens are minted and refreshed by
the CLI, the user never handles one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from tests.support.server import ServerProcess, free_port


def _cli(server: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openmicrovm", *args, "--endpoint-url", server.url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_curl(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    done = _cli(endpoint_server, "curl", echo_vm["microvmId"], "/headers")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["port"] == 8080
    assert not [name for name, _ in answer["headers"] if name.lower().startswith("x-aws-proxy-")]
    other_port = _cli(endpoint_server, "curl", echo_vm["microvmId"], "/headers", "--port", "9090")
    assert json.loads(other_port.stdout)["port"] == 9090
    upload = _cli(endpoint_server, "curl", echo_vm["microvmId"], "/upload", "-d", "hello")
    assert json.loads(upload.stdout)["bytes"] == 5
    missing = _cli(endpoint_server, "curl", echo_vm["microvmId"], "/nothing-here")
    assert missing.returncode == 22 and "HTTP 404" in missing.stderr
    unknown = _cli(endpoint_server, "curl", "microvm-00000000-0000-0000-0000-000000000000")
    assert unknown.returncode != 0 and "MicroVM not found" in unknown.stderr


def test_forward(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    local = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openmicrovm",
            "forward",
            echo_vm["microvmId"],
            "--local",
            str(local),
            "--endpoint-url",
            endpoint_server.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", local), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        for _ in range(3):  # several requests, each gets the token
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/headers", timeout=30) as response:
                answer = json.loads(response.read())
            assert answer["port"] == 8080
        request = urllib.request.Request(
            f"http://127.0.0.1:{local}/upload", data=b"x" * 100_000, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["bytes"] == 100_000
    finally:
        process.terminate()
        process.wait(10)


def test_shell(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    done = _cli(endpoint_server, "shell", echo_vm["microvmId"], stdin="echo $((6*7))\nexit 3\n")
    assert "42" in done.stdout.replace("$((6*7))", ""), (done.stdout, done.stderr)
    assert done.returncode == 3

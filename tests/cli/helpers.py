"""Running the `openmicrovm` command as a user would: a subprocess against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.images import REPO, SAMPLE_APP

SAMPLE_HOOKS = {
    "port": 8080,
    "microvmImageHooks": {
        "ready": "ENABLED",
        "readyTimeoutInSeconds": 30,
        "validate": "ENABLED",
        "validateTimeoutInSeconds": 30,
    },
    "microvmHooks": {"run": "ENABLED", "suspend": "ENABLED", "resume": "ENABLED", "terminate": "ENABLED"},
}
BUILD_TIMEOUT = 900


def cli_environment(
    endpoint_url: str, artifact_dir: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        # The CLI must work without any AWS configuration; the tests' own must not leak in.
        if not key.startswith("AWS_") and key != "OPENMICROVM_ENDPOINT"
    }
    env.update(
        {
            "OPENMICROVM_ENDPOINT": endpoint_url,
            "OPENMICROVM_ARTIFACT_DIR": str(artifact_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "openmicrovm", *args]


def cli(
    endpoint_url: str,
    artifact_dir: Path,
    *args: str,
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        env=cli_environment(endpoint_url, artifact_dir, extra_env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def deploy_sample(
    endpoint_url: str, artifact_dir: Path, name: str, *more: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`openmicrovm deploy` of the sample app with every hook, plus the `more` arguments."""
    return cli(
        endpoint_url,
        artifact_dir,
        *("deploy", str(SAMPLE_APP), "--name", name, "--hooks", json.dumps(SAMPLE_HOOKS), *more),
        extra_env=extra_env,
        timeout=BUILD_TIMEOUT,
    )


def cli_json(endpoint_url: str, artifact_dir: Path, *args: str, **kwargs: Any) -> Any:
    result = cli(endpoint_url, artifact_dir, *args, "--output", "json", **kwargs)
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def terminate_all(client: Any, microvm_ids: list[str], timeout: float = 120) -> None:
    """Leave no MicroVM behind, even when a test failed half-way: a server that stops keeps its
    sandboxes for the next start, and these servers are not started again."""
    for microvm_id in microvm_ids:
        try:
            client.terminate_microvm(microvmIdentifier=microvm_id)
        except Exception:  # already terminated, or the server is gone: nothing left to do
            continue
    deadline = time.monotonic() + timeout
    for microvm_id in microvm_ids:
        while time.monotonic() < deadline:
            try:
                if client.get_microvm(microvmIdentifier=microvm_id)["state"] == "TERMINATED":
                    break
            except Exception:
                break
            time.sleep(0.2)

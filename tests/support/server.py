"""The real openmicrovm server as a subprocess, and clients for it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from openmicrovm.lifecycle.recovery import FINISHED as RECOVERY_FINISHED
from tests.support.model_check import check_error, check_output

if TYPE_CHECKING:
    from tests.support.postgres import PostgresCluster

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def write_settings(path: Path, settings: dict[str, Any]) -> None:
    lines = []
    tables = []
    for key, value in settings.items():
        if key == "access_keys":
            for entry in value:
                tables.append(
                    "[[access_keys]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in entry.items())
                )
        elif isinstance(value, dict):
            tables.append(f"[{key}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n\n" + "\n".join(tables))


class ServerProcess:
    def __init__(
        self,
        data_dir: Path,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        database_url: str | None = None,
        role: str = "serve",
        args: list[str] | None = None,
    ) -> None:
        """database_url: the server's database (settings' database_url, which `openmicrovm cleanup`
        reads too); without it, the server's own SQLite file in data_dir. role: "serve" (the API on
        `port`), or "agent" (a host agent whose relay listens on `port`); args: more flags."""
        self.data_dir = data_dir
        self.role = role
        self.args = list(args or [])
        self.port = free_port()
        self.settings = dict(settings or {})
        if database_url is not None:
            self.settings["database_url"] = database_url
        # Tests and benches write their file:// zips next to the server's data dir (the pytest
        # temp dir, a bench's scratch dir): allow that tree, as a user adds their zips' folder.
        self.settings.setdefault("artifact_file_roots", [str(data_dir.parent)])
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"
        self.has_listened = False

    @property
    def database_url(self) -> str | None:
        return self.settings.get("database_url")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, recovered: bool = True) -> None:
        """Start the server and wait until it listens; with `recovered`, also until a host agent
        has finished its start-up recovery (strays removed while the API already serves), so that
        a test sees the host as recovery leaves it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        recoveries = self.log().count(RECOVERY_FINISHED)
        write_settings(self.data_dir / "settings.toml", self.settings)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "openmicrovm",
                    *self._role_args(),
                    "--data-dir",
                    str(self.data_dir),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    self.has_listened = True
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"server did not listen within {timeout}s:\n{self.log()}")
        if recovered and self.has_agent:
            while self.log().count(RECOVERY_FINISHED) <= recoveries:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"the server's recovery did not finish within {timeout}s:\n{self.log()}"
                    )
                time.sleep(0.05)

    @property
    def has_agent(self) -> bool:
        """Whether this process runs a host agent (the agent role, or serve without --no-agent)."""
        return self.role == "agent" or "--no-agent" not in self.args

    def _role_args(self) -> list[str]:
        if self.role == "agent":
            return ["agent", "--advertise-url", f"http://127.0.0.1:{self.port}"]
        return ["serve", "--port", str(self.port)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0, cleanup: bool = True) -> None:
        """Stop the server; with cleanup, also every sandbox it leaves running (MicroVMs outlive a
        server stop on purpose, so that a restart can re-adopt them)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if cleanup and self._may_have_records():
            self.cleanup()

    def cleanup(self, timeout: float = 120.0) -> None:
        """`openmicrovm cleanup` of the data dir (the server stopped): every sandbox it left goes."""
        cleaned = subprocess.run(
            [
                sys.executable,
                "-m",
                "openmicrovm",
                "--log-level",
                "WARNING",
                "cleanup",
                "--data-dir",
                str(self.data_dir),
            ],
            cwd=REPO,
            capture_output=True,
            timeout=timeout,
        )
        if cleaned.returncode != 0:
            raise RuntimeError(
                f"openmicrovm cleanup --data-dir {self.data_dir} exited with {cleaned.returncode}:\n"
                f"{cleaned.stderr.decode(errors='replace')}"
            )

    def _may_have_records(self) -> bool:
        """Whether there can be sandboxes for `openmicrovm cleanup` to end: not when the server never
        opened its database (it refused its settings, say; cleanup, reading them too, would fail)."""
        if self.database_url is not None:
            return self.has_listened
        return (self.data_dir / "openmicrovm.db").exists()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop(cleanup=False)
        self.start()

    def client(
        self,
        region: str = "us-east-1",
        key: str = "AKIDTEST",
        secret: str = "secret",
        validate: bool = True,
        client_side_validation: bool = True,
    ) -> Any:
        """boto3 for this server; client_side_validation=False lets bad input reach the server."""
        client = boto3.client(
            "lambda-microvms",
            endpoint_url=self.url,
            region_name=region,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(
                retries={"max_attempts": 1},
                connect_timeout=5,
                read_timeout=120,
                parameter_validation=client_side_validation,
            ),
        )
        if validate:
            client.meta.events.register("after-call.lambda-microvms", _validate_raw_response)
            client.meta.events.register("after-call-error.lambda-microvms", _validate_raw_response)
        return client


class DatabaseBackend:
    """Where the servers of a test keep their records: "sqlite" (each server's own file in its data
    dir, the server's default), "postgresql" (a fresh database per server on the session's cluster,
    dropped when the server is done with), or "cluster": the "server" is then a cluster of API
    replicas and host agents on a fresh PostgreSQL database (tests/support/cluster.py)."""

    def __init__(self, name: str, cluster: PostgresCluster | None = None) -> None:
        self.name = name
        self.cluster = cluster

    def __repr__(self) -> str:
        return f"DatabaseBackend({self.name!r})"

    def create_database(self) -> str | None:
        """The database_url of a new server's own database; None for SQLite (the server makes its file)."""
        return self.cluster.create_database() if self.cluster is not None else None

    def drop_database(self, url: str | None) -> None:
        if self.cluster is not None and url is not None:
            self.cluster.drop_database(url)

    @contextlib.contextmanager
    def server(
        self, data_dir: Path, settings: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> Iterator[ServerProcess]:
        """A ServerProcess on a database of its own, not started yet. On leaving, it is stopped, the
        sandboxes it left are cleaned up, and its database is dropped."""
        database_url = self.create_database()
        process: Any
        if self.name == "cluster":
            from tests.support.cluster import ClusterUnderTest

            assert database_url is not None
            process = ClusterUnderTest(data_dir, database_url, settings, env, hosts=3)
        else:
            process = ServerProcess(data_dir, settings, env=env, database_url=database_url)
        try:
            yield process
        finally:
            try:
                process.stop()
            finally:
                self.drop_database(database_url)


def _validate_raw_response(http_response: Any = None, model: Any = None, **_: Any) -> None:
    """Every response body is checked against the model's output (or error) shape."""
    if http_response is None or model is None:
        return
    raw = http_response.content
    document = json.loads(raw) if raw else None
    if http_response.status_code >= 300:
        code = http_response.headers.get("x-amzn-errortype", "").split(":")[0]
        check_error(model.name, code, document)
    else:
        expected = model.http.get("responseCode", 200)
        assert http_response.status_code == expected, (
            f"{model.name} answered {http_response.status_code}, not {expected}"
        )
        check_output(model.name, document)

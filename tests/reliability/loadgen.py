"""Load: many clients at once cycling MicroVMs of one image through run, get, suspend, resume and
terminate, recording every call's latency and every error by type; and samples of the server
process (memory, threads, fds, child processes) to show nothing keeps growing afterwards.

Used by the CI smoke test (a few clients, seconds) and by bench/load.py (50 clients, minutes)."""

from __future__ import annotations

import collections
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.server import ServerProcess

# The only errors a client may see under load: the service is busy, or the host is full.
ALLOWED_ERRORS = {"ThrottlingException", "InsufficientCapacityException", "TooManyRequestsException"}
OPERATIONS = ("RunMicrovm", "GetMicrovm", "SuspendMicrovm", "ResumeMicrovm", "TerminateMicrovm")


# openmicrovm/logs/store.py keeps up to this many log files open (least recently used goes).
LOG_FILES_KEPT_OPEN = 128


@dataclass
class Sample:
    """One look at the server process. `fds` leaves out open log files (`log_fds`), which the log
    store caches on purpose, up to LOG_FILES_KEPT_OPEN, and connections to the database
    (`database_fds`), which the PostgreSQL pool keeps on purpose, up to its size."""

    rss_kib: int
    threads: int
    fds: int
    children: int
    log_fds: int = 0
    database_fds: int = 0

    @classmethod
    def of(cls, pid: int, logs_dir: Path | None = None, database_url: str | None = None) -> Sample:
        status = {
            line.split(":")[0]: line.split(":")[1].strip()
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":" in line
        }
        children = sum(
            1 for entry in Path("/proc").iterdir() if entry.name.isdigit() and _parent(entry) == pid
        )
        targets = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                continue
        marker = str(logs_dir.resolve()) + "/" if logs_dir is not None else None
        logs = sum(1 for target in targets if marker and target.startswith(marker))
        port = urlsplit(database_url).port if database_url else None
        to_database = _sockets_to(port) if port else set()
        pooled = sum(1 for target in targets if target in to_database)
        return cls(
            int(status["VmRSS"].split()[0]),
            int(status["Threads"]),
            len(targets) - logs - pooled,
            children,
            logs,
            pooled,
        )


def _sockets_to(port: int) -> set[str]:
    """The fd link targets ("socket:[inode]") of this host's TCP sockets whose peer is `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{fields[9]}]")
    return found


def _parent(entry: Path) -> int:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    to_state: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cycles: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, operation: str, seconds: float) -> None:
        with self.lock:
            self.latencies[operation].append(seconds)

    def waited(self, what: str, seconds: float) -> None:
        with self.lock:
            self.to_state[what].append(seconds)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1

    @property
    def calls(self) -> int:
        return sum(len(values) for values in self.latencies.values())

    @property
    def unexpected(self) -> dict[str, int]:
        return {kind: n for kind, n in self.errors.items() if kind.split(" ")[0] not in ALLOWED_ERRORS}

    def table(self) -> list[str]:
        lines = [f"{'operation':22s} {'calls':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}"]
        for name, values in [*self.latencies.items(), *((f"-> {k}", v) for k, v in self.to_state.items())]:
            ordered = sorted(values)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            lines.append(
                f"{name:22s} {len(values):7d} {statistics.median(ordered) * 1000:8.1f} {p99 * 1000:8.1f} "
                f"{ordered[-1] * 1000:8.1f}"
            )
        return lines


class Load:
    """`clients` threads, each cycling its own MicroVM of `image` until `duration` has passed."""

    def __init__(self, server: ServerProcess, image: str, clients: int, duration: float) -> None:
        self.server = server
        self.image = image
        self.clients = clients
        self.duration = duration
        self.tally = Tally()
        self.started_ids: list[str] = []
        self._ids_lock = threading.Lock()

    def _client(self) -> Any:
        return boto3.client(
            "lambda-microvms",
            endpoint_url=self.server.url,
            region_name="us-east-1",
            aws_access_key_id="AKIDLOAD",
            aws_secret_access_key="x",
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=10, read_timeout=120, max_pool_connections=4
            ),
        )

    def _call(self, operation: str, action: Any) -> Any:
        started = time.monotonic()
        try:
            result = action()
        except ClientError as error:
            self.tally.error(error.response["Error"]["Code"])
            return None
        except BotoCoreError as error:
            self.tally.error(f"{type(error).__name__} (no answer)")
            return None
        self.tally.add(operation, time.monotonic() - started)
        return result

    def _wait(
        self, client: Any, microvm_id: str, states: set[str], label: str, timeout: float = 300
    ) -> str | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            vm = self._call("GetMicrovm", lambda: client.get_microvm(microvmIdentifier=microvm_id))
            if vm is not None and vm["state"] in states:
                self.tally.waited(label, time.monotonic() - started)
                return str(vm["state"])
            if vm is not None and vm["state"] == "TERMINATED" and "TERMINATED" not in states:
                self.tally.error(f"TERMINATED unexpectedly ({vm.get('stateReason')})")
                return None
            time.sleep(0.2)
        self.tally.error(f"timed out waiting for {label}")
        return None

    def _cycle(self, client: Any) -> None:
        vm = self._call("RunMicrovm", lambda: client.run_microvm(imageIdentifier=self.image))
        if vm is None:
            time.sleep(1)
            return
        microvm_id = vm["microvmId"]
        with self._ids_lock:
            self.started_ids.append(microvm_id)
        try:
            if self._wait(client, microvm_id, {"RUNNING"}, "RUNNING after run") is None:
                return
            if (
                self._call("SuspendMicrovm", lambda: client.suspend_microvm(microvmIdentifier=microvm_id))
                is None
            ):
                return
            if self._wait(client, microvm_id, {"SUSPENDED"}, "SUSPENDED") is None:
                return
            if (
                self._call("ResumeMicrovm", lambda: client.resume_microvm(microvmIdentifier=microvm_id))
                is None
            ):
                return
            self._wait(client, microvm_id, {"RUNNING"}, "RUNNING after resume")
        finally:
            self._call("TerminateMicrovm", lambda: client.terminate_microvm(microvmIdentifier=microvm_id))
            if self._wait(client, microvm_id, {"TERMINATED"}, "TERMINATED") is not None:
                with self.tally.lock:
                    self.tally.cycles += 1

    def _worker(self, deadline: float) -> None:
        client = self._client()
        while time.monotonic() < deadline:
            self._cycle(client)

    def run(self) -> Tally:
        deadline = time.monotonic() + self.duration
        threads = [
            threading.Thread(target=self._worker, args=(deadline,), daemon=True) for _ in range(self.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=self.duration + 900)
        return self.tally

    def leftovers(self) -> list[str]:
        """MicroVMs this load started that are not TERMINATED."""
        client = self._client()
        left = []
        for microvm_id in self.started_ids:
            state = client.get_microvm(microvmIdentifier=microvm_id)["state"]
            if state != "TERMINATED":
                left.append(f"{microvm_id} {state}")
        return left

"""HTTP/2 and gRPC through the endpoint (issue 17 figures), each beside its baseline in the same run:

- gRPC unary calls per second and p50 latency, one grpcio client with `--concurrency` threads on
  one channel: through the endpoint (h2c, the endpoint relays each stream to the app's h2c
  connection) against direct to the app (a plain byte relay into the sandbox made by the
  sandbox driver, so both paths reach the same app in the same sandbox);
- requests per second through the endpoint with `--concurrency` clients (one connection each,
  one request at a time): HTTP/2 with prior knowledge against HTTP/1.1 keep-alive, to the same
  HTTP/1.1 echo app.

    .venv/bin/python bench/bench_http2.py [--seconds 3] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.bench_endpoint import _cpu_seconds
from bench.common import build_image, load, percentile, run_workers
from tests.support.grpc_app import grpc_app_files
from tests.support.images import REPO
from tests.support.server import ServerProcess


def _grpc_load(
    channel: grpc.Channel, metadata: list[tuple[str, str]], seconds: float, threads: int
) -> dict[str, float]:
    say = channel.unary_unary("/echo.Echo/Say")
    say(b"warm-up", metadata=metadata, timeout=30)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        mine = []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            say(b"ping", metadata=metadata, timeout=30)
            mine.append(time.perf_counter() - started)
        latencies.extend(mine)

    began = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for each in workers:
        each.start()
    for each in workers:
        each.join()
    elapsed = time.perf_counter() - began
    return {
        "calls_per_second": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }


class SandboxRelay:
    """127.0.0.1:<port> → the app's port inside the sandbox, bytes only: the "direct" path."""

    def __init__(self, driver: Any, sandbox: Any, port: int) -> None:
        self.driver, self.sandbox, self.port = driver, sandbox, port
        self.listen_port = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.listen_port = server.sockets[0].getsockname()[1]
        return server

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self.driver.connect(self.sandbox, self.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def _serve_relay(data_dir: str, microvm_id: str, ports: multiprocessing.Queue) -> None:
    """In a process of its own (the grpc client's threads hold this one's GIL): the relay."""
    from openmicrovm.config import default_cache_dir
    from openmicrovm.runtime import make_driver

    async def run() -> None:
        driver = make_driver("auto", Path(data_dir) / "sandboxes", default_cache_dir())
        sandbox = await driver.adopt(microvm_id)
        relay = SandboxRelay(driver, sandbox, 8080)
        await relay.start()
        ports.put(relay.listen_port)
        await asyncio.Event().wait()

    asyncio.run(run())


def grpc_figures(
    server: ServerProcess, vm: dict[str, Any], token: str, args: argparse.Namespace
) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that has imported grpc
    ports: multiprocessing.Queue = spawn.Queue()
    relay = spawn.Process(
        target=_serve_relay, args=(str(server.data_dir), vm["microvmId"], ports), daemon=True
    )
    relay.start()
    relay_port = ports.get(timeout=60)
    authority = f"{vm['endpoint']}:{server.port}"
    paths = {"direct": (relay_port, []), "endpoint": (server.port, [("x-aws-proxy-auth", token)])}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    for _ in range(3):  # alternated, so that the machine's drift falls on both alike
        for name, (port, metadata) in paths.items():
            options = [("grpc.default_authority", authority)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                runs[name].append(_grpc_load(channel, metadata, args.seconds, args.concurrency))
    results: dict[str, Any] = {
        name: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        for name, measured in runs.items()
    }
    results["endpoint / direct calls per second"] = round(
        results["endpoint"]["calls_per_second"] / results["direct"]["calls_per_second"], 2
    )
    results["added p50 ms"] = round(results["endpoint"]["p50_ms"] - results["direct"]["p50_ms"], 3)
    relay.terminate()
    relay.join()
    return results


async def _h2_load(
    port: int, authority: str, token: str, seconds: float, concurrency: int
) -> dict[str, float]:
    """`concurrency` HTTP/2 connections (prior knowledge), one GET /headers at a time on each."""
    headers = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", "/headers"),
        ("x-aws-proxy-auth", token),
    ]

    async def worker(latencies: list[float], deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                stream_id = connection.get_next_available_stream_id()
                connection.send_headers(stream_id, headers, end_stream=True)
                writer.write(connection.data_to_send())
                status, ended = "", False
                while not ended:
                    data = await reader.read(65536)
                    if not data:
                        raise RuntimeError("the server ended the connection")
                    for event in connection.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            status = dict(event.headers)[b":status"].decode()
                        elif isinstance(event, h2.events.DataReceived):
                            connection.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                        elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                            ended = True
                    writer.write(connection.data_to_send())
                if status != "200":
                    raise RuntimeError(f"status {status}")
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    return await run_workers(worker, seconds, concurrency)


async def protocol_figures(
    server: ServerProcess, vm: dict[str, Any], token: str, args: argparse.Namespace
) -> dict[str, Any]:
    authority = f"{vm['endpoint']}:{server.port}"
    request = f"GET /headers HTTP/1.1\r\nHost: {authority}\r\nX-aws-proxy-auth: {token}\r\n\r\n".encode()

    async def endpoint() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 20)

    assert server.process is not None
    pid = server.process.pid
    runs: dict[str, list[dict[str, float]]] = {"HTTP/1.1": [], "HTTP/2": []}
    for _ in range(3):  # alternated, so that the machine's drift falls on both alike
        for name, measured in runs.items():
            cpu_before = _cpu_seconds(pid)
            if name == "HTTP/1.1":
                run = await load(endpoint, request, args.seconds, args.concurrency)
            else:
                run = await _h2_load(server.port, authority, token, args.seconds, args.concurrency)
            # The server's own CPU per request: the endpoint's cost without the clients' (on the
            # same cores) or the machine's noise.
            run["server_cpu_us_per_request"] = (_cpu_seconds(pid) - cpu_before) / run["requests"] * 1e6
            measured.append(run)
    results: dict[str, Any] = {
        name: {
            key: round(statistics.median(run[key] for run in measured), 3)
            for key in ("requests_per_second", "p50_ms", "p99_ms", "server_cpu_us_per_request")
        }
        for name, measured in runs.items()
    }
    for figure in ("requests_per_second", "server_cpu_us_per_request"):
        results[f"HTTP/2 / HTTP/1.1 {figure}"] = round(
            results["HTTP/2"][figure] / results["HTTP/1.1"][figure], 2
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        context = scratch / "grpc-app"
        for name, data in grpc_app_files().items():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            (context / name).write_bytes(data)
        server = ServerProcess(scratch / "data")
        server.start()
        try:
            client = server.client(validate=False)
            vms = {}
            for name, app_dir in (("grpc", context), ("echo", REPO / "tests" / "apps" / "echo")):
                arn = build_image(server, name, app_dir, scratch)
                vm = client.run_microvm(imageIdentifier=arn)
                while client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] != "RUNNING":
                    time.sleep(0.01)
                token = client.create_microvm_auth_token(
                    microvmIdentifier=vm["microvmId"], expirationInMinutes=30, allowedPorts=[{"port": 8080}]
                )["authToken"]["X-aws-proxy-auth"]
                vms[name] = (vm, token)
            results = {
                "gRPC unary": grpc_figures(server, *vms["grpc"], args),
                "through the endpoint": asyncio.run(protocol_figures(server, *vms["echo"], args)),
            }
            for vm, _token in vms.values():
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])
        finally:
            server.stop()
    for section, figures in results.items():
        print(section)
        for name, value in figures.items():
            print(f"  {name:40} {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""gRPC through the endpoint to a grpcio server inside a MicroVM: unary, server-streaming and
bidirectional calls, over h2c and over TLS with the local CA, refusals as gRPC statuses, and a
stream cut by a suspend that the client carries on after the auto-resume."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.endpoint.conftest import HTTP, idle_policy_microvm, run_microvm
from tests.support.endpoint import auth_token
from tests.support.grpc_app import grpc_app_files
from tests.support.images import image_request, upload, wait_image_settled, wait_microvm, zip_files
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

TIMEOUT = 30


@pytest.fixture(scope="module")
def grpc_image(endpoint_server: ServerProcess, moto: MotoServer) -> str:
    client = endpoint_server.client()
    arn = client.create_microvm_image(
        **image_request(
            "grpc", upload(moto, zip_files(grpc_app_files())), resources=[{"minimumMemoryInMiB": 512}]
        )
    )["imageArn"]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    return arn


@pytest.fixture(scope="module")
def grpc_vm(endpoint_server: ServerProcess, grpc_image: str) -> Iterator[dict[str, Any]]:
    vm = run_microvm(endpoint_server, grpc_image, ingressNetworkConnectors=[HTTP])
    yield vm
    endpoint_server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])


def cleartext_channel(server: ServerProcess, vm: dict[str, Any]) -> grpc.Channel:
    """h2c with prior knowledge to the server's plain port; :authority names the endpoint."""
    return grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.default_authority", f"{vm['endpoint']}:{server.port}")]
    )


def tls_channel(server: ServerProcess, vm: dict[str, Any]) -> grpc.Channel:
    tls_port = server.settings["tls_port"]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(server.data_dir / "tls" / "ca.pem").read_bytes()
    )
    return grpc.secure_channel(
        f"127.0.0.1:{tls_port}",
        credentials,
        options=[
            ("grpc.ssl_target_name_override", vm["endpoint"]),
            ("grpc.default_authority", f"{vm['endpoint']}:{tls_port}"),
        ],
    )


def _auth(token: str, **more: str) -> list[tuple[str, str]]:
    return [("x-aws-proxy-auth", token), *more.items()]


def test_unary_calls_over_h2c_and_tls(endpoint_server: ServerProcess, grpc_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), grpc_vm["microvmId"])
    for make in (cleartext_channel, tls_channel):
        with make(endpoint_server, grpc_vm) as channel:
            say = channel.unary_unary("/echo.Echo/Say")
            answer, call = say.with_call(
                b"hello", metadata=_auth(token, **{"x-echo": "back"}), timeout=TIMEOUT
            )
            assert answer == b"said:hello", make.__name__
            assert ("x-echo", "back") in call.trailing_metadata()  # trailers pass through
            with pytest.raises(grpc.RpcError) as failed:
                say(b"fail", metadata=_auth(token), timeout=TIMEOUT)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert failed.value.details() == "asked to fail"
            seen = channel.unary_unary("/echo.Echo/Headers")(b"", metadata=_auth(token), timeout=TIMEOUT)
            names = [line.split("=", 1)[0] for line in seen.decode().splitlines()]
            assert "x-amzn-requestid" in names
            assert not [name for name in names if name.startswith("x-aws-proxy-")]


def test_streams_both_ways(endpoint_server: ServerProcess, grpc_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), grpc_vm["microvmId"])
    with tls_channel(endpoint_server, grpc_vm) as channel:
        counted = list(
            channel.unary_stream("/echo.Echo/Count")(b"20", metadata=_auth(token), timeout=TIMEOUT)
        )
        assert counted == [b"%d" % n for n in range(20)]
        messages = [b"m%d" % n + b"x" * (n * 1000) for n in range(100)]  # up to ~100 KB each
        replies = list(
            channel.stream_stream("/echo.Echo/Chat")(iter(messages), metadata=_auth(token), timeout=TIMEOUT)
        )
        assert [reply.split(b":", 1)[1] for reply in replies] == messages
        numbers = [int(reply.split(b":", 1)[0]) for reply in replies]
        assert numbers == sorted(numbers) and len(set(numbers)) == 100


def test_a_cancelled_call_is_cancelled_in_the_app(
    endpoint_server: ServerProcess, grpc_vm: dict[str, Any]
) -> None:
    """The client's RST_STREAM reaches the app as one: its handler stops sending."""
    token = auth_token(endpoint_server.client(), grpc_vm["microvmId"])
    with cleartext_channel(endpoint_server, grpc_vm) as channel:
        call = channel.unary_stream("/echo.Echo/Count")(b"1000", metadata=_auth(token), timeout=TIMEOUT)
        assert [next(call) for _ in range(3)] == [b"0", b"1", b"2"]
        call.cancel()
        last = channel.unary_unary("/echo.Echo/LastCount")
        deadline = time.monotonic() + 10
        while (outcome := last(b"", metadata=_auth(token), timeout=TIMEOUT).split())[1] != b"cancelled":
            assert time.monotonic() < deadline, f"the app went on: {outcome}"
            time.sleep(0.1)
        assert int(outcome[0]) < 1000


def test_refusals_arrive_as_grpc_statuses(endpoint_server: ServerProcess, grpc_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), grpc_vm["microvmId"])
    with cleartext_channel(endpoint_server, grpc_vm) as channel:
        say = channel.unary_unary("/echo.Echo/Say")
        for metadata in (
            [],
            [("x-aws-proxy-auth", "not-a-token")],
            _auth(token, **{"x-aws-proxy-port": "9090"}),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                say(b"hi", metadata=metadata, timeout=TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, metadata  # HTTP 403
        assert say(b"still", metadata=_auth(token), timeout=TIMEOUT) == b"said:still"


def test_a_bidirectional_stream_carries_on_after_a_suspend_and_resume(
    endpoint_server: ServerProcess, grpc_image: str
) -> None:
    client = endpoint_server.client(client_side_validation=False, validate=False)
    with idle_policy_microvm(endpoint_server, grpc_image, 3600, auto_resume=True) as vm:
        token = auth_token(client, vm["microvmId"])
        with cleartext_channel(endpoint_server, vm) as channel:
            chat = channel.stream_stream("/echo.Echo/Chat")
            outbox: queue.Queue[bytes | None] = queue.Queue()

            def requests() -> Iterator[bytes]:
                while (message := outbox.get()) is not None:
                    yield message

            replies = chat(requests(), metadata=_auth(token), timeout=120)
            received: list[bytes] = []
            for n in range(3):
                outbox.put(b"before-%d" % n)
                received.append(next(replies))
            assert [reply.split(b":", 1)[1] for reply in received] == [b"before-0", b"before-1", b"before-2"]
            last_before = int(received[-1].split(b":", 1)[0])
            # The suspend cuts the stream (as AWS cuts connections at suspend) ...
            client.suspend_microvm(microvmIdentifier=vm["microvmId"])
            with pytest.raises(grpc.RpcError) as cut:
                next(replies)
            outbox.put(None)
            assert cut.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.CANCELLED,
            )
            wait_microvm(client, vm["microvmId"], {"SUSPENDED"})
            # ... and the client opens a new one, which resumes the MicroVM: its memory (the count) kept.
            again = list(chat(iter([b"after-0", b"after-1"]), metadata=_auth(token), timeout=TIMEOUT))
            assert [reply.split(b":", 1)[1] for reply in again] == [b"after-0", b"after-1"]
            assert int(again[0].split(b":", 1)[0]) == last_before + 1
        assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"


def test_a_grpc_stream_counts_as_activity_for_the_idle_timer(
    endpoint_server: ServerProcess, grpc_image: str
) -> None:
    client = endpoint_server.client(client_side_validation=False, validate=False)
    with idle_policy_microvm(endpoint_server, grpc_image, 2, auto_resume=False) as vm:
        token = auth_token(client, vm["microvmId"])
        with cleartext_channel(endpoint_server, vm) as channel:
            # 100 messages 50 ms apart: 5 s of one stream, past the 2 s idle limit, never cut.
            counted = list(
                channel.unary_stream("/echo.Echo/Count")(b"100", metadata=_auth(token), timeout=TIMEOUT)
            )
            assert len(counted) == 100
        assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"
        wait_microvm(client, vm["microvmId"], {"SUSPENDED"}, timeout=30)  # then silence

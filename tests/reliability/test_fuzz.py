"""Fuzzing the real server (SigV4 required, so every generated request is signed and checked):
requests generated from botocore's model for all 24 operations, and malformed raw HTTP for the
API and the endpoint parser. The server never answers 5xx, never goes silent, answers in the
model's shapes, never refuses a correctly signed request, and its records stay legal.

CI sends about a thousand requests; `python -m bench.fuzz` sends tens of thousands."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import image_request
from tests.reliability.conftest import ALICE, BOB, client_for, seed_identifiers
from tests.reliability.fuzzing import (
    Identifiers,
    Verdict,
    raw_corpus,
    raw_requests,
    send,
    send_raw,
    wire_requests,
)
from tests.reliability.invariants import read_snapshot, record_violations, settled_violations
from tests.reliability.rawhttp import exchange
from tests.support.images import wait_for
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

MODEL_EXAMPLES = 500
RAW_EXAMPLES = 100
ENDPOINT_HOST = f"{uuid.uuid4()}.lambda-microvm.us-east-1.localhost"
# Corpus entries that hit a known bug, each shown by an xfail test below.
KNOWN_BUG_ENTRIES: set[str] = set()


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[tuple[ServerProcess, Identifiers]]:
    with database_backend.server(
        tmp_path_factory.mktemp("fuzz"), {"access_keys": [ALICE, BOB]}, env=moto.environment()
    ) as server:
        server.start()
        yield server, seed_identifiers(server)


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """A server in the default mode (no access keys): raw requests get past authentication."""
    with database_backend.server(tmp_path_factory.mktemp("fuzz-open"), {}, env=moto.environment()) as server:
        server.start()
        yield server


def _still_whole(server: ServerProcess, pid: int) -> None:
    assert server.process is not None and server.process.poll() is None and server.process.pid == pid
    answer = exchange(
        server.port,
        b"GET /2025-09-09/managed-microvm-images HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    assert answer.status in (200, 403), answer  # alive (and, with access keys, insisting on a signature)
    assert record_violations(read_snapshot(server.data_dir)) == []


def test_model_driven_requests(fuzzed: tuple[ServerProcess, Identifiers]) -> None:
    server, ids = fuzzed
    assert server.process is not None
    pid = server.process.pid
    verdict = Verdict()

    @settings(
        max_examples=MODEL_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=st.data())
    def one(data: Any) -> None:
        request = data.draw(wire_requests(ids))
        before = len(verdict.problems)
        verdict.judge(request, send(server.port, request, ALICE["access_key_id"], ALICE["secret_access_key"]))
        assert len(verdict.problems) == before, verdict.problems[-1]

    one()
    print(
        f"model-driven: {verdict.sent} requests, statuses {sorted(verdict.statuses.items())}, "
        f"known bugs {verdict.known}, slowest {verdict.slowest:.2f} s"
    )
    assert verdict.server_errors == 0
    _still_whole(server, pid)


@pytest.mark.parametrize("mode", ["open", "keyed"])
def test_raw_malformed_http(
    fuzzed: tuple[ServerProcess, Identifiers], open_server: ServerProcess, mode: str
) -> None:
    server = open_server if mode == "open" else fuzzed[0]
    assert server.process is not None
    pid = server.process.pid
    problems: list[str] = []
    sent = 0
    for name, payload in raw_corpus(ENDPOINT_HOST):
        if name in KNOWN_BUG_ENTRIES:
            continue
        statuses, problem = send_raw(server.port, payload)
        sent += 1
        if problem or any(status >= 500 for status in statuses):
            problems.append(f"{name}: {statuses} {problem or ''}")

    @settings(
        max_examples=RAW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(payload=raw_requests(ENDPOINT_HOST))
    def one(payload: bytes) -> None:
        statuses, problem = send_raw(server.port, payload)
        assert problem is None and all(status < 500 for status in statuses), (
            payload[:300],
            statuses,
            problem,
        )

    one()
    print(f"raw: {sent} corpus requests + {RAW_EXAMPLES} generated")
    assert problems == []
    _still_whole(server, pid)


def test_records_settle_after_the_fuzzing(fuzzed: tuple[ServerProcess, Identifiers]) -> None:
    """Whatever the fuzzers created (images whose builds fail at once) settles, and nothing of it
    is left on the host."""
    server, _ = fuzzed
    wait_for(
        lambda: not read_snapshot(server.data_dir).transitional(), 120, "the fuzzed records to settle", 0.5
    )
    assert server.process is not None
    assert settled_violations(server.data_dir, frozenset({server.process.pid})) == []


def test_deeply_nested_json_is_a_validation_error(fuzzed: tuple[ServerProcess, Identifiers]) -> None:
    server, _ = fuzzed
    alice = client_for(server, ALICE, validate=False)
    alice.meta.events.register_last(
        "before-sign.lambda-microvms.CreateMicrovmImage",
        lambda request, **_: setattr(request, "data", b"[" * 100000),
    )
    with pytest.raises(ClientError) as refused:
        alice.create_microvm_image(**image_request("nested"))
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_a_path_with_an_encoded_line_break_gets_an_aws_error(
    fuzzed: tuple[ServerProcess, Identifiers],
) -> None:
    server, _ = fuzzed
    answer = exchange(
        server.port,
        b"GET /2025-09-09/microvms/microvm-%0A HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    assert answer.status in (400, 403, 404)
    assert b"x-amzn-errortype" in answer.data.lower(), answer.data

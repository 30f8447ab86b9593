"""Writes that race: concurrent clients, lined up by a barrier, against the check-then-write rules of
the control plane (quotas, unique names, clientToken idempotency, one update at a time). On SQLite a
single writer serialises them; on PostgreSQL serializable transactions, replayed when they lose a
race, must give the same answers: exactly as many winners as the rule allows, the AWS error the
spec names for every loser, never a 500."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from tests.conftest import image_request
from tests.reliability.invariants import read_snapshot, record_violations
from tests.support.clients import aws_error
from tests.support.images import wait_image_settled
from tests.support.server import ServerProcess

RACERS = 8
# Long enough for every thread to reach the barrier on a loaded machine.
BARRIER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Answer:
    """How one racing call ended."""

    response: dict[str, Any] | None = None
    code: str | None = None
    message: str = ""
    status: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.response is not None

    def body(self) -> dict[str, Any]:
        """The response without its per-request metadata (request id, retries)."""
        assert self.response is not None, self
        return {key: value for key, value in self.response.items() if key != "ResponseMetadata"}


def race(calls: list[Callable[[], dict[str, Any]]]) -> list[Answer]:
    """Run each call on its own thread, all released at once; their answers, in order. Each call
    must use its own boto3 client (made before, on this thread: making clients is not thread-safe)."""
    barrier = threading.Barrier(len(calls))
    answers: list[Answer | None] = [None] * len(calls)

    def run(index: int, call: Callable[[], dict[str, Any]]) -> None:
        barrier.wait(BARRIER_TIMEOUT)
        try:
            answers[index] = Answer(response=call())
        except ClientError as error:
            answers[index] = Answer(
                code=error.response["Error"]["Code"],
                message=error.response["Error"]["Message"],
                status=error.response["ResponseMetadata"]["HTTPStatusCode"],
            )
        except Exception as error:  # no answer, or one off the model: recorded, never lost
            answers[index] = Answer(code=type(error).__name__, message=str(error))

    threads = [threading.Thread(target=run, args=(index, call)) for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BARRIER_TIMEOUT + 180)
    assert all(answer is not None for answer in answers), f"calls that never returned: {answers}"
    return [answer for answer in answers if answer is not None]


def tally(answers: list[Answer]) -> Counter[str]:
    """'ok' or the error code and HTTP status of each answer, counted."""
    return Counter("ok" if answer.succeeded else f"{answer.code} {answer.status}" for answer in answers)


def clients_for(server: ServerProcess, count: int = RACERS) -> list[Any]:
    return [server.client() for _ in range(count)]


def image_names(client: Any, name_filter: str) -> list[str]:
    names: list[str] = []
    token: str | None = None
    while True:
        page = client.list_microvm_images(nameFilter=name_filter, **({"nextToken": token} if token else {}))
        names += [item["name"] for item in page["items"]]
        token = page.get("nextToken")
        if not token:
            return sorted(names)


def update_request(**overrides: Any) -> dict[str, Any]:
    """An UpdateMicrovmImage request (a new version of the same missing artifact)."""
    request = image_request("unused", **overrides)
    del request["name"]
    return request


def assert_records_consistent(server: ServerProcess) -> None:
    assert record_violations(read_snapshot(server.data_dir)) == []


def test_images_quota_admits_exactly_as_many_as_it_allows(make_server: Callable[..., ServerProcess]) -> None:
    quota = 3
    racers = 12
    server = make_server({"quotas": {"images": quota}})
    prefix = f"quota-{uuid.uuid4().hex[:6]}"
    clients = clients_for(server, racers)
    answers = race(
        [
            lambda client=client, n=n: client.create_microvm_image(**image_request(f"{prefix}-{n}"))
            for n, client in enumerate(clients)
        ]
    )

    assert tally(answers) == {"ok": quota, "ServiceQuotaExceededException 402": racers - quota}, answers
    refused = [answer.message for answer in answers if not answer.succeeded]
    assert all(f"({quota})" in message and "images" in message for message in refused), refused
    created = sorted(answer.body()["name"] for answer in answers if answer.succeeded)
    assert image_names(server.client(), prefix) == created
    assert_records_consistent(server)


def test_one_name_created_by_many_at_once_is_created_once(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server()
    name = f"same-{uuid.uuid4().hex[:8]}"
    clients = clients_for(server)
    answers = race(
        [lambda client=client: client.create_microvm_image(**image_request(name)) for client in clients]
    )

    assert tally(answers) == {"ok": 1, "ValidationException 400": RACERS - 1}, answers
    refused = {answer.message for answer in answers if not answer.succeeded}
    assert refused == {f"MicroVM image {name} already exists."}
    assert image_names(server.client(), name) == [name]
    assert_records_consistent(server)


def test_one_client_token_sent_by_many_at_once_creates_one_image(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server()
    name = f"token-{uuid.uuid4().hex[:8]}"
    token = str(uuid.uuid4())
    clients = clients_for(server)
    answers = race(
        [
            lambda client=client: client.create_microvm_image(**image_request(name, clientToken=token))
            for client in clients
        ]
    )

    assert tally(answers) == {"ok": RACERS}, answers
    # Every replay is the first call's response, verbatim: the same image, id and timestamps.
    first = answers[0].body()
    assert all(answer.body() == first for answer in answers), [answer.body() for answer in answers]
    assert image_names(server.client(), name) == [name]
    assert_records_consistent(server)


def test_one_client_token_with_different_parameters_has_one_winner(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server()
    prefix = f"mismatch-{uuid.uuid4().hex[:6]}"
    token = str(uuid.uuid4())
    clients = clients_for(server)
    answers = race(
        [
            lambda client=client, n=n: client.create_microvm_image(
                **image_request(f"{prefix}-{n}", clientToken=token)
            )
            for n, client in enumerate(clients)
        ]
    )

    assert tally(answers) == {"ok": 1, "ValidationException 400": RACERS - 1}, answers
    refused = {answer.message for answer in answers if not answer.succeeded}
    assert refused == {"The provided clientToken was used with different request parameters."}
    winner = next(answer for answer in answers if answer.succeeded).body()["name"]
    assert image_names(server.client(), prefix) == [winner]
    assert_records_consistent(server)


def test_concurrent_updates_make_one_version_and_the_versions_quota_holds(
    make_server: Callable[..., ServerProcess],
) -> None:
    # UpdateMicrovmImage is refused while the image is busy (CREATING, UPDATING), so the racers
    # compete for the image's state first: one makes version 2.0, the others find it UPDATING.
    # The quota (2 versions) is then full, which the next update, once settled, must be told.
    server = make_server({"quotas": {"versions_per_image": 2}})
    client = server.client()
    arn = client.create_microvm_image(**image_request(f"update-{uuid.uuid4().hex[:8]}"))["imageArn"]
    # The artifact's bucket does not exist: the first build fails fast and the image settles.
    assert wait_image_settled(client, arn, timeout=120)["state"] == "CREATE_FAILED"

    clients = clients_for(server)
    answers = race(
        [
            lambda client=client, n=n: client.update_microvm_image(
                imageIdentifier=arn, **update_request(description=f"racer {n}")
            )
            for n, client in enumerate(clients)
        ]
    )

    assert tally(answers) == {"ok": 1, "ConflictException 409": RACERS - 1}, answers
    assert [answer.body()["imageVersion"] for answer in answers if answer.succeeded] == ["2.0"]
    refused = {answer.message for answer in answers if not answer.succeeded}
    assert refused == {"MicroVM Image is already in state: UPDATING"}, refused
    versions = client.list_microvm_image_versions(imageIdentifier=arn)["items"]
    assert sorted(version["imageVersion"] for version in versions) == ["1.0", "2.0"]

    assert wait_image_settled(client, arn, timeout=120)["state"] == "UPDATE_FAILED"
    code, _message, status = aws_error(client.update_microvm_image, imageIdentifier=arn, **update_request())
    assert (code, status) == ("ServiceQuotaExceededException", 402)
    assert_records_consistent(server)

"""Running MicroVMs for a test and making sure they are gone afterwards, whatever the test did."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tests.support.images import wait_microvm


class Fleet:
    """The MicroVMs one test runs; `terminate_all` (called by the `fleet` context) ends them."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.ids: list[str] = []

    def run(self, arn: str, wait: bool = True, **kwargs: Any) -> dict[str, Any]:
        vm = self.client.run_microvm(imageIdentifier=arn, **kwargs)
        self.ids.append(vm["microvmId"])
        return wait_microvm(self.client, vm["microvmId"], {"RUNNING"}) if wait else vm

    def terminate_all(self) -> None:
        for microvm_id in self.ids:
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.terminate_microvm(microvmIdentifier=microvm_id)
        for microvm_id in self.ids:
            with contextlib.suppress(ClientError, BotoCoreError, AssertionError):
                wait_microvm(self.client, microvm_id, {"TERMINATED"}, timeout=60)


@contextlib.contextmanager
def fleet(client: Any) -> Iterator[Fleet]:
    running = Fleet(client)
    try:
        yield running
    finally:
        running.terminate_all()

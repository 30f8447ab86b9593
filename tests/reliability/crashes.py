"""Crash trials: a scripted workload against a real server, a SIGKILL at a random moment, a restart,
and the invariants of invariants.py plus "every acknowledged call's effect is still there".

One `CrashHarness` owns one server (its own data dir) for many trials; state carries over from
trial to trial, as it would on a machine that crashes now and then. The CI test runs a few trials;
bench/crash_trials.py runs hundreds.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.reliability.invariants import (
    Ledger,
    buildah_export_leftovers,
    read_snapshot,
    record_violations,
    settled_violations,
)
from tests.support.images import ALL_HOOKS, image_request, upload, wait_image_settled, zip_dir
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

CHURN_PREFIX = "churn-"
_TESTS = "tests/reliability/test_crash_safety.py::"
# Violations caused by known, reported bugs, each shown by an xfail test: a violation containing
# every fragment of an entry is counted and printed but not failed on. Remove an entry once its
# xfail test passes.
KNOWN_BUGS: list[tuple[tuple[str, ...], str]] = []


def known_bug(violation: str) -> str | None:
    """The xfail test of the known bug behind this violation, or None for a new problem."""
    for fragments, test in KNOWN_BUGS:
        if all(fragment in violation for fragment in fragments):
            return test
    return None


@dataclass
class TrialResult:
    number: int
    kill_after: float
    operations: list[str]
    in_flight: str | None
    violations: list[str]
    recovery_seconds: float

    @property
    def unexpected(self) -> list[str]:
        return [violation for violation in self.violations if known_bug(violation) is None]

    def describe(self) -> str:
        lines = [
            f"trial {self.number}: killed after {self.kill_after:.2f} s during {self.in_flight or 'a pause'}, "
            f"recovered in {self.recovery_seconds:.1f} s; last calls: {self.operations[-4:]}"
        ]
        for violation in self.violations:
            bug = known_bug(violation)
            lines.append(f"  {'known bug (' + bug + ')' if bug else 'VIOLATION'}: {violation}")
        return "\n".join(lines)


class _ServerGone(Exception):
    pass


def all_items(list_call: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """Every item of a paginated list operation, as {"items": [...]}."""
    items: list[Any] = []
    token = None
    while True:
        page = list_call(maxResults=50, **({"nextToken": token} if token else {}), **kwargs)
        items += page["items"]
        token = page.get("nextToken")
        if not token:
            return {"items": items}


@dataclass
class Workload:
    """Issues API calls one after the other until told to stop or the server disappears, writing
    every acknowledged call into the ledger."""

    server: ServerProcess
    stable_image: str
    good_uri: str
    bad_uri: str
    ledger: Ledger
    rng: random.Random
    max_live: int = 3
    builds: bool = True
    script: list[str] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    in_flight: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = boto3.client(
            "lambda-microvms",
            endpoint_url=self.server.url,
            region_name="us-east-1",
            aws_access_key_id="AKIDCRASH",
            aws_secret_access_key="x",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=60),
        )
        try:
            while not self.stop.is_set():
                self._step(client)
                time.sleep(self.rng.uniform(0.0, 0.25))
        except _ServerGone:
            return

    def _call(self, label: str, target: str | None, action: Callable[[], Any]) -> Any:
        self.in_flight = label
        try:
            result = action()
        except ClientError as error:
            self.operations.append(f"{label} -> {error.response['Error']['Code']}")
            self.in_flight = None
            return None
        except BotoCoreError as error:
            if target is not None:
                self.ledger.unknown.add(target)
            self.operations.append(f"{label} -> no answer ({type(error).__name__})")
            raise _ServerGone from error
        self.in_flight = None
        self.operations.append(label)
        return result if result is not None else {}

    def _step(self, client: Any) -> None:
        listed = self._call("ListMicrovms", None, lambda: all_items(client.list_microvms))
        images = self._call(
            "ListMicrovmImages", None, lambda: all_items(client.list_microvm_images, nameFilter=CHURN_PREFIX)
        )
        if listed is None or images is None:
            return
        states = {item["microvmId"]: item["state"] for item in listed["items"]}
        running = [vm for vm, state in states.items() if state == "RUNNING"]
        suspended = [vm for vm, state in states.items() if state == "SUSPENDED"]
        live = [vm for vm, state in states.items() if state != "TERMINATED"]
        churn = images["items"]
        settled = [i for i in churn if i["state"] in ("CREATED", "UPDATED", "CREATE_FAILED", "UPDATE_FAILED")]
        building = any(i["state"] in ("CREATING", "UPDATING") for i in churn)
        choices: list[tuple[str, float]] = [
            ("run", 3.0 if len(live) < self.max_live else 0.0),
            ("suspend", 3.0 if running else 0.0),
            ("resume", 3.0 if suspended else 0.0),
            ("terminate", (1.0 + 3.0 * (len(live) >= self.max_live)) if live else 0.0),
        ]
        if self.builds:
            choices += [
                ("create-good", 0.6 if not building and len(churn) < 4 else 0.0),
                ("create-bad", 0.6 if len(churn) < 6 else 0.0),
                ("update", 0.5 if settled and not building else 0.0),
                ("delete-version", 0.5 if settled else 0.0),
                ("delete-image", 0.5 if settled and len(churn) > 2 else 0.0),
            ]
        if self.script:
            operation = self.script.pop(0)
        else:
            names, weights = zip(*choices, strict=True)
            if not any(weights):
                return
            operation = self.rng.choices(names, weights)[0]
        getattr(self, "_" + operation.replace("-", "_"))(client, running, suspended, live, settled)

    # -- operations ------------------------------------------------------------------------------
    def _run(self, client: Any, *_: Any) -> None:
        vm = self._call("RunMicrovm", None, lambda: client.run_microvm(imageIdentifier=self.stable_image))
        if vm:
            self.ledger.microvms[vm["microvmId"]] = "run"

    def _vm_operation(self, client: Any, name: str, pool: list[str]) -> None:
        if not pool:
            return
        vm = self.rng.choice(pool)
        method = getattr(client, f"{name}_microvm")
        if (
            self._call(f"{name.capitalize()}Microvm {vm}", vm, lambda: method(microvmIdentifier=vm))
            is not None
        ):
            self.ledger.microvms[vm] = name

    def _suspend(self, client: Any, running: list[str], *_: Any) -> None:
        self._vm_operation(client, "suspend", running)

    def _resume(self, client: Any, _running: list[str], suspended: list[str], *_: Any) -> None:
        self._vm_operation(client, "resume", suspended)

    def _terminate(
        self, client: Any, _running: list[str], _suspended: list[str], live: list[str], *_: Any
    ) -> None:
        self._vm_operation(client, "terminate", live)

    def _create(self, client: Any, uri: str, good: bool) -> None:
        name = f"{CHURN_PREFIX}{self.rng.randrange(16**8):08x}"
        request = image_request(name, uri, resources=[{"minimumMemoryInMiB": 512}])
        created = self._call(
            f"CreateMicrovmImage {name}", None, lambda: client.create_microvm_image(**request)
        )
        if created:
            self.ledger.images[created["imageArn"]] = "create"
            if good:
                self.ledger.good_versions.add((created["imageArn"], created["imageVersion"]))

    def _create_good(self, client: Any, *_: Any) -> None:
        self._create(client, self.good_uri, True)

    def _create_bad(self, client: Any, *_: Any) -> None:
        self._create(client, self.bad_uri, False)

    def _update(self, client: Any, *rest: Any) -> None:
        image = self.rng.choice(rest[-1])
        good = self.rng.random() < 0.5
        request = image_request(
            image["name"], self.good_uri if good else self.bad_uri, resources=[{"minimumMemoryInMiB": 512}]
        )
        del request["name"]
        arn = image["imageArn"]
        updated = self._call(
            f"UpdateMicrovmImage {arn}",
            arn,
            lambda: client.update_microvm_image(imageIdentifier=arn, **request),
        )
        if updated:
            self.ledger.versions[(arn, updated["imageVersion"])] = "create"
            if good:
                self.ledger.good_versions.add((arn, updated["imageVersion"]))

    def _delete_version(self, client: Any, *rest: Any) -> None:
        image = self.rng.choice(rest[-1])
        arn = image["imageArn"]
        versions = self._call(
            f"ListMicrovmImageVersions {arn}",
            None,
            lambda: client.list_microvm_image_versions(imageIdentifier=arn),
        )
        if not versions or len(versions["items"]) < 2:
            return
        version = self.rng.choice(versions["items"])["imageVersion"]
        deleted = self._call(
            f"DeleteMicrovmImageVersion {arn} {version}",
            arn,
            lambda: client.delete_microvm_image_version(imageIdentifier=arn, imageVersion=version),
        )
        if deleted:
            self.ledger.versions[(arn, version)] = "delete"

    def _delete_image(self, client: Any, *rest: Any) -> None:
        arn = self.rng.choice(rest[-1])["imageArn"]
        if self._call(
            f"DeleteMicrovmImage {arn}", arn, lambda: client.delete_microvm_image(imageIdentifier=arn)
        ):
            self.ledger.images[arn] = "delete"


class CrashHarness:
    """One server of its own, with a built image to run, for many crash trials."""

    def __init__(
        self,
        server: ServerProcess,
        moto: MotoServer,
        sample_app: Any,
        tenant_app: Any,
        seed: int | None = None,
        recovery_timeout: float = 300.0,
    ) -> None:
        self.server = server
        self.moto = moto
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.recovery_timeout = recovery_timeout
        self.good_uri = upload(moto, zip_dir(tenant_app))
        self.bad_uri = "s3://no-such-bucket-openmicrovm/app.zip"
        client = server.client()
        arn = client.create_microvm_image(
            **image_request(
                "stable",
                upload(moto, zip_dir(sample_app)),
                hooks=ALL_HOOKS,
                resources=[{"minimumMemoryInMiB": 512}],
            )
        )["imageArn"]
        image = wait_image_settled(client, arn)
        assert image["state"] == "CREATED", image
        self.stable_image = arn
        self.results: list[TrialResult] = []
        # A problem that lasts (a leak, a lost MicroVM) is reported by the trial that found it only.
        self.reported: set[str] = set()

    def trial(
        self, kill_after: float | None = None, script: list[str] | None = None, builds: bool = True
    ) -> TrialResult:
        number = len(self.results) + 1
        kill_after = self.rng.uniform(0.3, 6.0) if kill_after is None else kill_after
        workload = Workload(
            self.server,
            self.stable_image,
            self.good_uri,
            self.bad_uri,
            self.ledger,
            random.Random(self.rng.random()),
            builds=builds,
            script=list(script or []),
        )
        thread = threading.Thread(target=workload.run, name=f"workload-{number}", daemon=True)
        thread.start()
        time.sleep(kill_after)
        self.server.kill()
        workload.stop.set()
        thread.join(timeout=90)
        violations = record_violations(read_snapshot(self.server.data_dir))
        violations = [f"right after the kill: {v}" for v in violations]
        started = time.monotonic()
        self.server.start()
        violations += self._wait_settled()
        recovery = time.monotonic() - started
        assert self.server.process is not None
        violations += settled_violations(self.server.data_dir, frozenset({self.server.process.pid}))
        violations += self.ledger.effect_violations(read_snapshot(self.server.data_dir))
        snapshot = read_snapshot(self.server.data_dir)
        violations += buildah_export_leftovers({b["build_id"] for b in snapshot.builds})
        fresh = [v for v in dict.fromkeys(violations) if v not in self.reported]
        self.reported.update(fresh)
        result = TrialResult(number, kill_after, workload.operations, workload.in_flight, fresh, recovery)
        self.results.append(result)
        return result

    def _wait_settled(self) -> list[str]:
        """Poll until nothing is transitional; legal states must hold at every poll."""
        deadline = time.monotonic() + self.recovery_timeout
        seen: list[str] = []
        while True:
            snapshot = read_snapshot(self.server.data_dir)
            for problem in record_violations(snapshot):
                if problem not in seen:
                    seen.append(f"during recovery: {problem}")
            moving = snapshot.transitional()
            if not moving:
                return seen
            if time.monotonic() > deadline:
                return [*seen, *(f"stuck after {self.recovery_timeout:g} s: {item}" for item in moving)]
            time.sleep(0.25)

    def terminate_everything(self) -> None:
        """End every MicroVM the trials left (the server stays up for the caller to stop)."""
        client = self.server.client(validate=False)
        live = [
            vm["microvmId"] for vm in all_items(client.list_microvms)["items"] if vm["state"] != "TERMINATED"
        ]
        for vm in live:
            with contextlib.suppress(ClientError, BotoCoreError):
                client.terminate_microvm(microvmIdentifier=vm)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {v["state"] for v in all_items(client.list_microvms)["items"]}
            if states <= {"TERMINATED"}:
                return
            time.sleep(0.2)

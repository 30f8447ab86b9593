"""Fuzzing the real server (not a test): requests generated from botocore's model for all 24
operations (signed, on a server that requires SigV4), then malformed raw HTTP (a corpus and
generated variations) for the API and the endpoint parser. See tests/reliability/fuzzing.py.

    .venv/bin/python -m bench.fuzz [--requests 10000] [--raw 2000] [--seed N]

Prints requests sent, statuses, 5xx seen, answers explained by known bugs, every other problem
(first of each kind), the slowest answer, and whether the records are legal and settle afterwards.
Exit status 1 when a problem was found.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.conftest import ALICE, BOB, seed_identifiers
from tests.reliability.fuzzing import (
    Verdict,
    raw_corpus,
    raw_requests,
    send,
    send_raw,
    wire_requests,
)
from tests.reliability.invariants import read_snapshot, record_violations, settled_violations
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

ENDPOINT_HOST = f"{uuid.uuid4()}.lambda-microvm.us-east-1.localhost"
# Raw corpus entries that hit a known bug (see tests/reliability/test_fuzz.py).
KNOWN_RAW = {"deeply nested JSON": "test_fuzz.py::test_deeply_nested_json_is_a_validation_error"}


def _kind(problem: str) -> str:
    return problem.split(" to ")[0].split(": ")[0][:90]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10000, help="model-driven requests")
    parser.add_argument("--raw", type=int, default=2000, help="generated raw HTTP requests (plus the corpus)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="omv-fuzz-"))
    moto = MotoServer(scratch / "moto.log")
    moto.start()
    server = ServerProcess(scratch / "data", {"access_keys": [ALICE, BOB]}, env=moto.environment())
    server.start()
    assert server.process is not None
    pid = server.process.pid
    problems: list[str] = []
    started = time.monotonic()
    try:
        ids = seed_identifiers(server)

        verdict = Verdict()
        options = settings(
            max_examples=args.requests,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )

        @options
        @given(data=st.data())
        def model_driven(data: st.DataObject) -> None:
            request = data.draw(wire_requests(ids))
            verdict.judge(
                request, send(server.port, request, ALICE["access_key_id"], ALICE["secret_access_key"])
            )
            if verdict.sent % 1000 == 0:
                print(f"  {verdict.sent} model-driven requests, {verdict.server_errors} 5xx", flush=True)

        if args.seed is not None:
            model_driven = seed(args.seed)(model_driven)
        model_driven()
        problems += verdict.problems

        # Raw HTTP goes to the keyed server and to one in the default mode (no access keys), where
        # malformed bodies get past authentication to the parsers.
        open_server = ServerProcess(scratch / "open", {}, env=moto.environment())
        open_server.start()
        targets = [server, open_server]
        raw_sent, raw_5xx = 0, 0
        raw_known: collections.Counter[str] = collections.Counter()
        for target in targets:
            for name, payload in raw_corpus(ENDPOINT_HOST):
                statuses, problem = send_raw(target.port, payload)
                raw_sent += 1
                raw_5xx += sum(status >= 500 for status in statuses)
                if problem or any(status >= 500 for status in statuses):
                    if name in KNOWN_RAW and not problem:
                        raw_known[KNOWN_RAW[name]] += 1
                    else:
                        problems.append(f"raw {name}: {statuses} {problem or ''}")
        raw_options = settings(
            max_examples=args.raw,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )

        @raw_options
        @given(payload=raw_requests(ENDPOINT_HOST))
        def raw(payload: bytes) -> None:
            nonlocal raw_sent, raw_5xx
            statuses, problem = send_raw(targets[raw_sent % 2].port, payload)
            raw_sent += 1
            raw_5xx += sum(status >= 500 for status in statuses)
            if problem or any(status >= 500 for status in statuses):
                problems.append(f"raw generated {payload[:120]!r}: {statuses} {problem or ''}")

        raw()
        open_alive = open_server.process is not None and open_server.process.poll() is None
        problems += [f"open server: {p}" for p in record_violations(read_snapshot(open_server.data_dir))]
        open_server.stop()

        alive = server.process.poll() is None and server.process.pid == pid and open_alive
        records = record_violations(read_snapshot(server.data_dir))
        deadline = time.monotonic() + 300
        while read_snapshot(server.data_dir).transitional() and time.monotonic() < deadline:
            time.sleep(1)
        settled = settled_violations(server.data_dir, frozenset({pid}))
        print()
        print(
            f"model-driven requests: {verdict.sent}, 5xx: {verdict.server_errors}, slowest {verdict.slowest:.2f} s"
        )
        print(f"  statuses: {dict(sorted(verdict.statuses.items()))}")
        print(f"  answers explained by known bugs: {verdict.known or 'none'}")
        print(
            f"raw HTTP requests: {raw_sent} (corpus + generated), 5xx: {raw_5xx} "
            f"(explained by known bugs: {dict(raw_known) or 'none'})"
        )
        print(f"total requests: {verdict.sent + raw_sent} in {time.monotonic() - started:.0f} s")
        print(f"server alive afterwards (same pid): {alive}")
        print(f"record violations: {len(records)}; after settling: {len(settled)}")
        problems += records + settled
        kinds = collections.Counter(_kind(p) for p in problems)
        print(f"problems: {len(problems)}")
        shown: set[str] = set()
        for problem in problems:
            if _kind(problem) not in shown:
                shown.add(_kind(problem))
                print(f"  x{kinds[_kind(problem)]:<5d} {problem[:400]}")
    finally:
        server.stop()
        moto.stop()
    if not problems:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"data dir kept: {server.data_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

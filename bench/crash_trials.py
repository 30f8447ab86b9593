"""Crash-safety trials (not a test): a random workload (builds, runs, suspends, resumes,
terminates, image and version deletes) against a real server, SIGKILL at a random moment, restart,
and every invariant of tests/reliability/invariants.py checked after each recovery.

    .venv/bin/python -m bench.crash_trials [--trials 100] [--seed N] [--no-builds]

Prints one line per trial, every violation (marked when a known bug, with its xfail test, explains
it), and totals: trials run, violations (known / new) by kind, recovery time. Exit status 1 when a
violation no known bug explains was seen. The server's data dir is kept when anything was found.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.conftest import TENANT_APP
from tests.reliability.crashes import CrashHarness, all_items, known_bug
from tests.reliability.invariants import sweep_cgroups
from tests.support.images import SAMPLE_APP
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

_IDS = [
    (re.compile(r"microvm-[0-9a-f-]{36}"), "<microvm>"),
    (re.compile(r"(build|validate)-[0-9a-f-]{36}"), r"\1-<id>"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"omv-[0-9a-f]{8}-"), "omv-<scope>-"),
    (re.compile(r"[0-9a-f]{12}"), "<key>"),
    (re.compile(r"process \d+"), "process <pid>"),
    (re.compile(r"arn:aws:lambda:[^ ]+"), "<arn>"),
    (re.compile(r"/tmp/\S+"), "<path>"),
]


def kind_of(violation: str) -> str:
    """The violation with ids, pids and paths blanked out, cut short: a key for tallies."""
    text = violation.split(" [")[0]
    for pattern, replacement in _IDS:
        text = pattern.sub(replacement, text)
    return text[:110]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-builds", action="store_true", help="only MicroVM operations in the workload")
    parser.add_argument("--max-kill-after", type=float, default=6.0)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="omv-crash-trials-"))
    moto = MotoServer(scratch / "moto.log")
    moto.start()
    server = ServerProcess(scratch / "data", {}, env=moto.environment())
    server.start()
    known: collections.Counter[str] = collections.Counter()
    new: collections.Counter[str] = collections.Counter()
    recoveries: list[float] = []
    trials_run = 0
    started = time.monotonic()
    try:
        harness = CrashHarness(server, moto, SAMPLE_APP, TENANT_APP, seed=args.seed)
        print(f"data dir {server.data_dir}; image built in {time.monotonic() - started:.1f} s", flush=True)
        for _ in range(args.trials):
            result = harness.trial(
                kill_after=harness.rng.uniform(0.3, args.max_kill_after), builds=not args.no_builds
            )
            trials_run += 1
            recoveries.append(result.recovery_seconds)
            print(
                f"trial {result.number:4d}: kill at {result.kill_after:4.2f} s "
                f"(in flight: {result.in_flight or '-'}), recovery {result.recovery_seconds:5.1f} s, "
                f"{len(result.violations)} violation(s)",
                flush=True,
            )
            for violation in result.violations:
                bug = known_bug(violation)
                (known if bug else new)[kind_of(violation)] += 1
                print(f"    {'known' if bug else 'NEW  '} {violation[:400]}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        _clean_up(server)
        moto.stop()
    total = sum(known.values()) + sum(new.values())
    print()
    print(f"trials run: {trials_run} in {time.monotonic() - started:.0f} s")
    if recoveries:
        print(f"recovery: median {statistics.median(recoveries):.1f} s, max {max(recoveries):.1f} s")
    print(f"violations: {total} ({sum(known.values())} explained by known bugs, {sum(new.values())} new)")
    for title, tally in (("known bugs", known), ("NEW", new)):
        for kind, count in tally.most_common():
            print(f"  {title:10s} {count:4d}  {kind}")
    if total:
        print(f"data dir kept for inspection: {server.data_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if new else 0


def _clean_up(server: ServerProcess) -> None:
    """End every MicroVM; one more restart first lets recovery sweep what the bugs leaked."""
    try:
        server.kill()
        server.start()
        client = server.client(validate=False)
        for vm in all_items(client.list_microvms)["items"]:
            if vm["state"] != "TERMINATED":
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if {vm["state"] for vm in all_items(client.list_microvms)["items"]} <= {"TERMINATED"}:
                break
            time.sleep(0.5)
    finally:
        server.stop()
        sweep_cgroups(server.data_dir)


if __name__ == "__main__":
    raise SystemExit(main())

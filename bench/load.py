"""Load (not a test): N concurrent clients, each cycling MicroVMs of one image through run, get,
suspend, resume and terminate for a while, against a real server. See tests/reliability/loadgen.py.

    .venv/bin/python -m bench.load [--clients 50] [--seconds 180] [--app tenant|sample]

Prints calls and errors by type (only throttling and capacity errors are allowed), p50/p99 latency
per operation and per state change, and the server process (RSS, threads, fds, children, open log
files) before the load, right after it, and in samples over the next half minute, to show that
nothing keeps growing. Exit status 1 on an unexpected error, a MicroVM left behind, or growth.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.conftest import TENANT_APP
from tests.reliability.invariants import settled_violations, sweep_cgroups
from tests.reliability.loadgen import LOG_FILES_KEPT_OPEN, Load, Sample
from tests.support.images import ALL_HOOKS, SAMPLE_APP, image_request, upload, wait_image_settled, zip_dir
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument(
        "--app",
        choices=["tenant", "sample"],
        default="sample",
        help="sample: examples/sample-app with every hook; tenant: the hook-less test app",
    )
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="omv-load-"))
    moto = MotoServer(scratch / "moto.log")
    moto.start()
    server = ServerProcess(scratch / "data", {}, env=moto.environment())
    server.start()
    assert server.process is not None
    pid, logs = server.process.pid, server.data_dir / "logs"
    failed = False
    try:
        client = server.client()
        app = SAMPLE_APP if args.app == "sample" else TENANT_APP
        extra = {"hooks": ALL_HOOKS} if args.app == "sample" else {}
        arn = client.create_microvm_image(
            **image_request(
                "load", upload(moto, zip_dir(app)), resources=[{"minimumMemoryInMiB": 512}], **extra
            )
        )["imageArn"]
        assert wait_image_settled(client, arn)["state"] == "CREATED"
        before = Sample.of(pid, logs)
        print(
            f"{args.clients} clients for {args.seconds:g} s against {args.app} app; server before: {before}",
            flush=True,
        )
        started = time.monotonic()
        load = Load(server, arn, args.clients, args.seconds)
        tally = load.run()
        elapsed = time.monotonic() - started
        right_after = Sample.of(pid, logs)
        print()
        print(
            f"cycles completed: {tally.cycles} in {elapsed:.0f} s; API calls: {tally.calls} "
            f"({tally.calls / elapsed:.1f}/s)"
        )
        print("\n".join(tally.table()))
        print(f"errors by type: {dict(tally.errors) or 'none'}")
        unexpected = tally.unexpected
        print(f"unexpected errors: {unexpected or 'none'}")
        left = load.leftovers()
        print(f"MicroVMs left not TERMINATED: {left or 'none'}")
        samples = [right_after]
        for _ in range(6):
            time.sleep(5)
            samples.append(Sample.of(pid, logs))
        print("server samples after the load (every 5 s):")
        for sample in samples:
            print(f"  {sample}")
        settled = [p for p in settled_violations(server.data_dir, frozenset({pid}))]
        print(f"host leftovers / record problems: {settled or 'none'}")
        last = samples[-1]
        grew = (
            last.fds > before.fds + 5
            or last.children > before.children
            or last.threads > before.threads + 8
            or last.log_fds > LOG_FILES_KEPT_OPEN
            or last.rss_kib > samples[1].rss_kib * 1.1
        )
        print(
            f"growth after the load: {'YES' if grew else 'none'} (rss {before.rss_kib} -> {last.rss_kib} KiB, "
            f"fds {before.fds} -> {last.fds}, log fds {before.log_fds} -> {last.log_fds}, "
            f"threads {before.threads} -> {last.threads}, children {before.children} -> {last.children})"
        )
        failed = bool(unexpected or left or settled or grew)
    finally:
        server.stop()
        sweep_cgroups(server.data_dir)
        moto.stop()
    if not failed:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"data dir kept: {server.data_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Log capture: how many lines per second the LogStore takes, and whether capturing slows a
chatty app down (goal: at most 10 % slower than the same app whose output is thrown away).

    .venv/bin/python bench/bench_logs.py [--seconds 2] [--rounds 3] [--lines 200000]

1. LogStore.append, one line per call, beside a plain file write + flush of the same lines (the
   floor for any capture that keeps every line on disk as it comes).
2. A chatty app (a Python process printing log lines as fast as it can, flushing each one the
   way `logging` does) whose stdout pipe is read by an asyncio loop, as a server reads a
   sandbox's output: once appending every chunk of lines to the LogStore (logging on), once
   discarding them (logging off). The app counts its own lines; the figure that matters is its
   throughput with logging on against off, measured in the same run, rounds alternating.

Part 2 reads the app's pipe directly with the LogStore the server uses. It does not go through a
sandbox driver: the drivers' own capture of app output into the LogStore was not in the tree
when this was written; when it is, point part 2 at it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmicrovm.logs.store import LogStore

LINE = "2024-01-01 12:00:00,000 INFO app.worker request handled path=/items/{index} status=200 ms=3"
CHATTY_APP = """
import sys, time
deadline = time.monotonic() + float(sys.argv[1])
count = 0
write, flush = sys.stdout.write, sys.stdout.flush
line = %r
while True:
    for _ in range(100):
        write(line.format(index=count) + "\\n")
        flush()
        count += 1
    if time.monotonic() >= deadline:
        break
print(count, file=sys.stderr)
"""


def append_throughput(root: Path, lines: int) -> tuple[float, float]:
    """(LogStore lines/s, plain file lines/s)."""
    store = LogStore(root / "store", 1 << 30, 2)
    started = time.perf_counter()
    for index in range(lines):
        store.append("microvms/bench", LINE.format(index=index))
    store_rate = lines / (time.perf_counter() - started)
    store.close()
    started = time.perf_counter()
    with open(root / "plain.log", "a") as handle:
        for index in range(lines):
            handle.write(LINE.format(index=index) + "\n")
            handle.flush()
    plain_rate = lines / (time.perf_counter() - started)
    return store_rate, plain_rate


async def chatty_app(seconds: float, store: LogStore | None, stream: str) -> tuple[float, int]:
    """(the app's own lines per second, lines captured)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHATTY_APP % LINE,
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    started = time.perf_counter()
    captured = 0
    pending = b""
    while chunk := await process.stdout.read(65536):
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if not cut:
            continue
        complete, pending = pending[:cut], pending[cut:]
        captured += complete.count(b"\n")
        if store is not None:
            store.append(stream, complete.decode("utf-8", "replace"))
    elapsed = time.perf_counter() - started
    produced = int((await process.stderr.read()).decode().split()[0])
    await process.wait()
    return produced / elapsed, captured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the chatty app runs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=200_000, help="lines for the append comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-logs-") as scratch:
        root = Path(scratch)
        rates = [append_throughput(root / f"round{i}", args.lines) for i in range(args.rounds)]
        store_rate = statistics.median(rate for rate, _ in rates)
        plain_rate = statistics.median(rate for _, rate in rates)
        print("1. one line per call")
        print(f"   LogStore.append           {store_rate:>12,.0f} lines/s")
        print(
            f"   plain write + flush       {plain_rate:>12,.0f} lines/s   (LogStore at {store_rate / plain_rate:.0%})"
        )

        store = LogStore(root / "capture", 10 * 1024 * 1024, 3)
        on: list[float] = []
        off: list[float] = []
        captured: list[int] = []
        for index in range(args.rounds):
            rate, lines = asyncio.run(chatty_app(args.seconds, store, f"microvms/chatty{index}"))
            on.append(rate)
            captured.append(lines)
            off.append(asyncio.run(chatty_app(args.seconds, None, "unused"))[0])
        kept = sum(os.path.getsize(p) for p in (root / "capture" / "microvms").iterdir())
        slower = 1 - statistics.median(on) / statistics.median(off)
        print(f"2. chatty app, {args.seconds:g} s per round, {args.rounds} rounds, medians")
        print(f"   logging off (discarded)   {statistics.median(off):>12,.0f} lines/s of the app")
        print(f"   logging on (LogStore)     {statistics.median(on):>12,.0f} lines/s of the app")
        print(
            f"   captured                  {statistics.median(captured) / args.seconds:>12,.0f} lines/s into the LogStore"
        )
        print(
            f"   the app is {slower:+.1%} slower with logging on (goal: at most 10 %); {kept / 1e6:.1f} MB kept"
        )


if __name__ == "__main__":
    main()

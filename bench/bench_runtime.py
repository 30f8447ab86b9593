"""Benchmark of the sandbox drivers (not a test): prints medians, compared with a plain host process.

    sudo .venv/bin/python bench/bench_runtime.py [--runs 10] [--drivers gvisor,process]
        [--runsc PATH[:PLATFORM],...]

For a stdlib HTTP app, per driver: start -> first HTTP 200; snapshot time and size; restore -> first
200 (cold, and from the warm pool); suspend, and resume -> first 200 (from a frozen sandbox, and
from disk); one request to a warm sandbox, and one request whose handler makes 20,000 stat() calls
(syscall-heavy work); memory per idle sandbox beyond the app's own, and how many idle sandboxes fit
in 8 GiB. Baseline in the same run: the same app as a plain host process (`python3 app.py`) ->
first 200, and the same syscall-heavy request.

--runsc compares runsc binaries and platforms: the gvisor driver is measured once per entry, e.g.
`--runsc /usr/bin/runsc:ptrace,default:ptrace,default:systrap` (default: the driver's own choice,
the newest runsc here on its best platform).

Memory is compared as PSS (proportional set size: shared pages split between their users), summed
over every host process of a sandbox (gVisor: sentry, gofer, ptrace stubs; process: bwrap, agent,
app), against the PSS of the app as a host process. The cgroup's own count (what stats() reports)
is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openmicrovm.builder.base_rootfs import ensure_base_rootfs
from openmicrovm.config import default_cache_dir
from openmicrovm.runtime import PortNotListening, ProcessConfig, Sandbox, SandboxSpec, make_driver
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.gvisor import GVisorDriver
from openmicrovm.runtime.records import record_of
from openmicrovm.runtime.registry import missing_for

APP = """
import http.server, os, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/syscalls":
            for _ in range(20000):
                os.stat("/")
        body = b"ok\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""
PORT = 8080
MIB = 1024 * 1024
GOAL_RESTORE_MS, GOAL_RESUME_MS, GOAL_OVERHEAD_MIB = 100.0, 50.0, 15.0

Samples = list[float]


def pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def get_once(driver: BaseDriver, sandbox: Sandbox, path: str = "/") -> bool:
    reader, writer = await driver.connect(sandbox, PORT)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        return (await reader.read()).startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def first_200(driver: BaseDriver, sandbox: Sandbox, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await get_once(driver, sandbox):
                return
        except PortNotListening:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("no HTTP 200 within the timeout")
        await asyncio.sleep(0.002)


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


def host_get(port: int, path: str = "/") -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))


def host_baseline(app_file: Path, runs: int) -> tuple[Samples, int, Samples]:
    """python3 app.py on the host: start -> first 200, its PSS once idle, and syscall-heavy requests."""
    samples, app_pss, heavy = [], 0, []
    for run in range(runs):
        port = 18000 + run
        started = time.perf_counter()
        process = subprocess.Popen(["python3", str(app_file), str(port)], stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                        reply = b""
                        while chunk := sock.recv(4096):
                            reply += chunk
                        if reply.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                            break
                except OSError:
                    time.sleep(0.002)
            samples.append(time.perf_counter() - started)
            time.sleep(0.3)
            app_pss = pss(process.pid)
            started = time.perf_counter()
            host_get(port, "/syscalls")
            heavy.append(time.perf_counter() - started)
        finally:
            process.kill()
            process.wait()
    return samples, app_pss, heavy


async def wait_for_warm_sandbox(driver: BaseDriver, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in driver.sandboxes_dir.iterdir():
            loaded = driver.load(path.name) if path.name.startswith("pool-") else None
            if loaded is not None and record_of(loaded).state == "warm":
                return
        await asyncio.sleep(0.02)
    raise RuntimeError("the warm pool did not fill")


async def bench_driver(
    name: str, rootfs: Path, work: Path, runs: int, app_pss: int, options: dict[str, object], label: str
) -> dict[str, object]:
    cache = default_cache_dir()
    state = work / f"state-{label}"
    # Cold paths first: no warm pool, suspend straight to disk.
    cold = make_driver(name, state, cache, restore_pool_size=0, suspend_to_disk_after=0, **options)
    assert isinstance(cold, BaseDriver)
    spec = SandboxSpec(rootfs=rootfs, process=ProcessConfig(argv=["python3", "/app/app.py"], workdir="/app"))
    results: dict[str, object] = {}
    live: list[Sandbox] = []
    try:
        warm_up = await cold.start("bench-warm-up", spec)  # builds the helpers, fills the page cache
        await first_200(cold, warm_up)
        await cold.destroy(warm_up)

        samples: Samples = []
        for run in range(runs):

            async def start_and_serve(run: int = run) -> None:
                sandbox = await cold.start(f"bench-start-{run}", spec)
                live.append(sandbox)
                await first_200(cold, sandbox)

            samples.append(await timed(start_and_serve))
        results["start -> first 200"] = samples

        samples, sizes = [], []
        for run, sandbox in enumerate(list(live)):
            target = work / f"snap-{label}-{run}"
            infos: list[object] = []

            async def take(
                sandbox: Sandbox = sandbox, target: Path = target, infos: list[object] = infos
            ) -> None:
                infos.append(await cold.snapshot(sandbox, target))

            samples.append(await timed(take))
            live.remove(sandbox)
            sizes.append(infos[0].memory_bytes + infos[0].disk_bytes)  # type: ignore[attr-defined]
            if run:
                shutil.rmtree(target)
        results["snapshot"] = samples
        results["snapshot size"] = statistics.median(sizes)
        snapshot = work / f"snap-{label}-0"

        samples = []
        for run in range(runs):

            async def restore_and_serve(run: int = run) -> None:
                sandbox = await cold.restore(f"bench-restore-{run}", snapshot)
                live.append(sandbox)
                await first_200(cold, sandbox)

            samples.append(await timed(restore_and_serve))
        results["restore -> first 200 (cold)"] = samples

        results["one request to a warm sandbox"] = [
            await timed(lambda: get_once(cold, live[0])) for _ in range(runs * 5)
        ]
        results["20k stat() calls (one request)"] = [
            await timed(lambda: get_once(cold, live[0], "/syscalls")) for _ in range(runs)
        ]

        await asyncio.sleep(2)  # idle
        footprints = [sum(pss(pid) for pid in cold.cgroup_of(sandbox).pids()) for sandbox in live]
        cgroup_counts = [(await cold.stats(sandbox)).rss_bytes for sandbox in live]
        results["idle sandbox memory (PSS)"] = statistics.median(footprints)
        results["idle sandbox memory (cgroup)"] = statistics.median(cgroup_counts)
        results["overhead beyond the app (PSS)"] = statistics.median(footprints) - app_pss
        results["idle sandboxes in 8 GiB"] = int(8 * 1024 * MIB // max(footprints + cgroup_counts))

        if cold.capabilities.suspend_releases_memory:
            suspends, resumes = [], []
            for sandbox in live[:runs]:
                suspends.append(await timed(lambda sandbox=sandbox: cold.suspend(sandbox)))

                async def resume_and_serve(sandbox: Sandbox = sandbox) -> None:
                    await cold.resume(sandbox)
                    await first_200(cold, sandbox)

                resumes.append(await timed(resume_and_serve))
            results["suspend (to disk)"] = suspends
            results["resume -> first 200 (from disk)"] = resumes
        for sandbox in live:
            await cold.destroy(sandbox)
        live.clear()

        # Fast paths: a warm pool for hot snapshots, suspend frozen in memory first.
        fast = make_driver(name, state, cache, suspend_to_disk_after=3600, **options)
        assert isinstance(fast, BaseDriver)
        try:
            if fast.capabilities.memory_snapshot:
                for run in range(2):  # makes the snapshot hot
                    live.append(await fast.restore(f"bench-heat-{run}", snapshot))
                samples = []
                for run in range(runs):
                    await wait_for_warm_sandbox(fast)

                    async def warm_restore(run: int = run) -> None:
                        sandbox = await fast.restore(f"bench-warm-{run}", snapshot)
                        live.append(sandbox)
                        await first_200(fast, sandbox)

                    samples.append(await timed(warm_restore))
                results["restore -> first 200 (warm pool)"] = samples
            else:
                live.extend([await fast.restore(f"bench-restore-{run}", snapshot) for run in range(2)])
                for sandbox in live:
                    await first_200(fast, sandbox)
            suspends, resumes = [], []
            for run in range(runs):
                sandbox = live[run % len(live)]
                suspends.append(await timed(lambda sandbox=sandbox: fast.suspend(sandbox)))

                async def thaw_and_serve(sandbox: Sandbox = sandbox) -> None:
                    await fast.resume(sandbox)
                    await first_200(fast, sandbox)

                resumes.append(await timed(thaw_and_serve))
            results["suspend (frozen in memory)"] = suspends
            results["resume -> first 200 (from memory)"] = resumes
        finally:
            for sandbox in live:
                with contextlib.suppress(Exception):
                    await fast.destroy(sandbox)
            await fast.close()
    finally:
        for sandbox in live:
            with contextlib.suppress(Exception):
                await cold.destroy(sandbox)
        await cold.cleanup_strays(set())
    return results


def report(name: str, results: dict[str, object], baseline: Samples, heavy: Samples, describe: str) -> None:
    print(f"\n== {name} driver ({describe})")
    for key, value in results.items():
        if isinstance(value, list):
            samples = [v * 1000 for v in value]
            print(
                f"  {key:36s} {statistics.median(samples):8.1f} ms   (min {min(samples):.1f}, max {max(samples):.1f})"
            )
        elif "memory" in key or "overhead" in key or "size" in key:
            print(f"  {key:36s} {float(value) / MIB:8.1f} MiB")  # type: ignore[arg-type]
        else:
            print(f"  {key:36s} {value:8}")

    def best(prefix: str) -> float:
        values = [statistics.median(v) * 1000 for k, v in results.items() if k.startswith(prefix)]  # type: ignore[arg-type]
        return min(values)

    restore, resume = best("restore -> first 200"), best("resume -> first 200")
    slowdown = statistics.median(results["20k stat() calls (one request)"]) / statistics.median(heavy)  # type: ignore[arg-type]
    print(f"  {'syscall-heavy request vs host':36s} {slowdown:8.1f} x")
    overhead = float(results["overhead beyond the app (PSS)"]) / MIB  # type: ignore[arg-type]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"  goals (best path; plain host process start -> 200: {statistics.median(baseline) * 1000:.0f} ms):"
    )
    print(
        f"    restore -> 200 <= {GOAL_RESTORE_MS:.0f} ms: {verdict(restore <= GOAL_RESTORE_MS)} ({restore:.0f} ms)"
    )
    print(
        f"    resume -> 200  <= {GOAL_RESUME_MS:.0f} ms: {verdict(resume <= GOAL_RESUME_MS)} ({resume:.0f} ms)"
    )
    print(
        f"    overhead       <= {GOAL_OVERHEAD_MIB:.0f} MiB: {verdict(overhead <= GOAL_OVERHEAD_MIB)} ({overhead:.1f} MiB)"
    )


def variants(driver: str, runsc: str) -> list[dict[str, object]]:
    """The driver options to measure: one set, except for gvisor with several --runsc entries."""
    if driver != "gvisor":
        return [{}]
    options: list[dict[str, object]] = []
    for entry in runsc.split(","):
        path, _, platform = entry.partition(":")
        chosen: dict[str, object] = {}
        if path and path != "default":
            chosen["runsc"] = path
        if platform:
            chosen["runsc_platform"] = platform
        options.append(chosen)
    return options


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--drivers", default="gvisor,process")
    parser.add_argument(
        "--runsc",
        default="default",
        help="gvisor: comma-separated PATH[:PLATFORM] entries to compare (PATH 'default': the driver's choice)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: sandboxes need namespaces and cgroups")
    base = ensure_base_rootfs(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="omv-bench-") as temp:
        work = Path(temp)
        rootfs = work / "rootfs"
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)], check=True)
        (rootfs / "app").mkdir()
        (rootfs / "app" / "app.py").write_text(APP)
        baseline, app_pss, heavy = host_baseline(rootfs / "app" / "app.py", args.runs)
        print(f"medians of {args.runs} runs ({args.runs * 5} for single requests); {os.cpu_count()} CPUs")
        print("== baseline: python3 app.py as a plain host process")
        samples = [v * 1000 for v in baseline]
        print(
            f"  {'start -> first 200':36s} {statistics.median(samples):8.1f} ms   (min {min(samples):.1f}, max {max(samples):.1f})"
        )
        print(f"  {'app memory when idle (PSS)':36s} {app_pss / MIB:8.1f} MiB")
        samples = [v * 1000 for v in heavy]
        print(
            f"  {'20k stat() calls (one request)':36s} {statistics.median(samples):8.1f} ms   (min {min(samples):.1f}, max {max(samples):.1f})"
        )
        for name in args.drivers.split(","):
            problems = missing_for(name, default_cache_dir())
            if problems:
                print(f"\n== {name} driver: skipped ({'; '.join(problems)})")
                continue
            for number, options in enumerate(variants(name, args.runsc)):
                label = f"{name}-{number}"
                probe = make_driver(name, work / f"state-{label}", default_cache_dir(), **options)
                caps, title = probe.capabilities, name
                if isinstance(probe, GVisorDriver):
                    title = f"{name} ({probe.runsc.version}, {probe.platform})"
                results = asyncio.run(bench_driver(name, rootfs, work, args.runs, app_pss, options, label))
                report(
                    title,
                    results,
                    baseline,
                    heavy,
                    f"memory snapshots: {'yes' if caps.memory_snapshot else 'no, restore cold-starts'}; "
                    f"suspend: {'frozen, then memory to disk' if caps.suspend_releases_memory else 'frozen, RAM kept'}",
                )


if __name__ == "__main__":
    main()

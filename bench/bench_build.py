"""Build time of the sample app: cold, warm with a changed app, warm and unchanged; per stage.

    .venv/bin/python bench/bench_build.py [--driver auto|gvisor|process] [--warm-runs N] [--keep]

Cold = a fresh buildah storage (the managed base image is imported first); the Debian base
rootfs itself stays cached (it is shared by every cache dir and takes a minute of debootstrap).
Warm = the same storage again, once with app.py changed (a new version of the same app) and once
unchanged. The goal is a warm build of a small app in at most 10 s. With --warm-runs N the
changed-app build is repeated N times and the median and fastest are reported (a shared machine
is noisy). Every `buildah bud` runs contained (builder/build_network.py); the setup and teardown
of a build network alone is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openmicrovm.builder.base_rootfs import ensure_base_rootfs  # noqa: E402
from openmicrovm.builder.buildah import open_store  # noqa: E402
from openmicrovm.builder.maintenance import cleanup_build_strays  # noqa: E402
from openmicrovm.builder.outputs import delete_build_outputs  # noqa: E402
from openmicrovm.builder.pipeline import STAGES, BuildRequest, BuildResult, run_build  # noqa: E402
from openmicrovm.config import default_cache_dir  # noqa: E402

SAMPLE_APP = REPO / "examples" / "sample-app"
GOAL_WARM_SECONDS = 10.0
HOOKS = {
    "port": 8080,
    "microvmImageHooks": {
        "ready": "ENABLED",
        "readyTimeoutInSeconds": 60,
        "validate": "ENABLED",
        "validateTimeoutInSeconds": 60,
    },
}


def sample_zip(path: Path, marker: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(SAMPLE_APP / "Dockerfile", "Dockerfile")
        archive.writestr("app.py", (SAMPLE_APP / "app.py").read_text() + f"\n# {marker}\n")
    return path


async def one_build(driver: Any, root: Path, cache: Path, artifact: Path) -> tuple[float, BuildResult]:
    build_id = str(uuid.uuid4())
    request = BuildRequest(
        build_id=build_id,
        image_arn="arn:aws:lambda:us-east-1:000000000000:microvm-image:bench",
        image_name="bench",
        image_version="1.0",
        region="us-east-1",
        architecture="X86_64",
        code_uri=artifact.as_uri(),
        artifact_file_roots=(artifact.parent,),
        work_dir=root / "work" / build_id,
        output_dir=root / "builds" / build_id,
        hooks=HOOKS,
        memory_mib=512,
        cache_dir=cache,
    )
    started = time.monotonic()
    result = await run_build(request, driver, lambda _line: None, lambda _stage: None)
    return time.monotonic() - started, result


def print_table(runs: list[tuple[str, float, BuildResult]]) -> None:
    header = f"{'stage':<17}" + "".join(f"{name:>18}" for name, _, _ in runs)
    print(header)
    print("-" * len(header))
    for stage in (*STAGES[:3], "build.base", "build.dockerfile", "build.export", *STAGES[3:]):
        cells = "".join(f"{result.stage_seconds.get(stage, float('nan')):>17.2f}s" for _, _, result in runs)
        print(f"{stage:<17}{cells}")
    print(f"{'total':<17}" + "".join(f"{total:>17.2f}s" for _, total, _ in runs))
    print()
    for name, _, result in runs:
        print(
            f"{name}: memory snapshot {result.memory_snapshot_bytes / 1e6:.1f} MB, "
            f"disk snapshot {result.disk_snapshot_bytes / 1e6:.1f} MB, "
            f"root filesystem {result.code_install_bytes / 1e6:.1f} MB"
        )


async def network_cost(rounds: int = 5) -> float | None:
    """Median seconds to open and close one build network (None if builds are not contained)."""
    try:
        from openmicrovm.builder.build_jail import JailSpec  # noqa: F401 (contained builds only)
        from openmicrovm.builder.build_network import open_build_network
    except ImportError:
        return None
    times = []
    for _ in range(rounds):
        started = time.monotonic()
        network = await open_build_network()
        await network.close()
        times.append(time.monotonic() - started)
    return statistics.median(times)


async def main(driver_name: str, keep: bool, warm_runs: int) -> int:
    from openmicrovm.runtime import make_driver

    shared = default_cache_dir()
    await asyncio.to_thread(ensure_base_rootfs, shared, print)
    root = Path(tempfile.mkdtemp(prefix="openmicrovm-bench-"))
    cache = root / "cache"
    cache.mkdir()
    (cache / "base").symlink_to(shared / "base", target_is_directory=True)
    driver = make_driver(driver_name, root / "sandboxes", cache)
    print(f"driver {driver.name}; scratch {root}")
    runs: list[tuple[str, float, BuildResult]] = []
    try:
        store = await open_store(cache)
        print(f"buildah storage driver: {store.driver}")
        cold_total, cold = await one_build(driver, root, cache, sample_zip(root / "v1.zip", "version 1"))
        runs.append(("cold", cold_total, cold))
        changed_total, changed = await one_build(
            driver, root, cache, sample_zip(root / "v2.zip", "version 2")
        )
        runs.append(("warm, app changed", changed_total, changed))
        same_total, same = await one_build(driver, root, cache, sample_zip(root / "v3.zip", "version 2"))
        runs.append(("warm, unchanged", same_total, same))
        repeats = [(changed_total, changed)]
        for number in range(1, warm_runs):
            artifact = sample_zip(root / f"r{number}.zip", f"repeat {number}")
            repeats.append(await one_build(driver, root, cache, artifact))
        print()
        print_table(runs)
        if warm_runs > 1:
            totals = [total for total, _ in repeats]
            dockerfile = [result.stage_seconds.get("build.dockerfile", 0.0) for _, result in repeats]
            print(
                f"warm, app changed, {len(repeats)} runs: total median {statistics.median(totals):.2f} s "
                f"(fastest {min(totals):.2f} s); build.dockerfile median {statistics.median(dockerfile):.2f} s "
                f"(fastest {min(dockerfile):.2f} s)"
            )
        cost = await network_cost()
        if cost is not None:
            print(f"build network setup + teardown alone: median {cost * 1000:.0f} ms")
        freed = sum(delete_build_outputs(result.rootfs_path.parent) for _, _, result in runs[1:])
        for _, result in repeats[1:]:
            delete_build_outputs(result.rootfs_path.parent)
        print(f"disk freed by deleting the two warm versions: {freed / 1e6:.1f} MB")
        warm = min(changed_total, same_total)
        verdict = "meets" if changed_total <= GOAL_WARM_SECONDS else "misses"
        print(
            f"warm build {changed_total:.2f} s (fastest warm {warm:.2f} s) {verdict} the {GOAL_WARM_SECONDS:g} s goal"
        )
        return 0
    finally:
        await driver.cleanup_strays(set())
        await cleanup_build_strays(cache)
        if not keep:
            store = await open_store(cache)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(store.runroot, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--warm-runs", type=int, default=1, help="repeat the warm changed-app build")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.driver, arguments.keep, max(1, arguments.warm_runs))))

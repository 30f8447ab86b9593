"""vm-smoke: openmicrovm installed and exercised on a cgroup-v2 systemd Debian 12, booted under QEMU.

    tests/hosts/vm-smoke                        the whole smoke run (guest_steps.py)
    tests/hosts/vm-smoke --script FILE          boot the same image, run FILE as root in the guest
    tests/hosts/vm-smoke --script FILE --install      ... after ./install.sh
    --keep-output DIR                           console log, guest logs and step logs go there

Without --keep-output the logs go to /var/cache/openmicrovm-tests/last-run (replaced by each run).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import host_image
import qemu_run
from cleanup import remove_tree

DEFAULT_OUTPUT = Path("/var/cache/openmicrovm-tests/last-run")
# What the guest steps found out (guest_smoke.py writes them), printed after the steps.
REPORT_FILES = (
    "install-time.txt",
    "deploy-time.txt",
    "first-200.txt",
    "doctor.txt",
    "cgroup-facts.txt",
    "failures.txt",
)


class Report:
    """Steps of the host and of the guest, printed as they finish and counted at the end."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, float, str]] = []

    def add(self, name: str, ok: bool, seconds: float, detail: str = "") -> None:
        self.results.append((name, ok, seconds, detail))
        mark = "ok  " if ok else "FAIL"
        suffix = f"  {detail}" if detail else ""
        print(f"[{mark}] {name:<28} {seconds:7.1f} s{suffix}", flush=True)

    def guest_event(self, event: dict[str, object]) -> None:
        if event.get("event") == "start":
            print(f"       {event['name']} ...", flush=True)
        elif event.get("event") == "end":
            self.add(
                str(event["name"]),
                bool(event["ok"]),
                float(event["seconds"]),
                str(event.get("detail", "")),  # type: ignore[arg-type]
            )

    def failed(self) -> int:
        return sum(1 for _, ok, _, _ in self.results if not ok)

    def summary(self) -> int:
        failed = sum(1 for _, ok, _, _ in self.results if not ok)
        passed = len(self.results) - failed
        print(f"{passed} passed, {failed} failed", flush=True)
        return 1 if failed else 0


def _say(message: str) -> None:
    print(f"       {message}", flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, through every finally that stops QEMU and removes temp dirs.
    raise KeyboardInterrupt


def _output_dir(requested: Path | None) -> Path:
    if requested is None:
        remove_tree(DEFAULT_OUTPUT)
        DEFAULT_OUTPUT.mkdir(parents=True)
        return DEFAULT_OUTPUT
    requested.mkdir(parents=True, exist_ok=True)
    if any(requested.iterdir()):
        raise SystemExit(f"vm-smoke: {requested} is not empty; give an empty or new directory")
    return requested.resolve()


def _print_file(title: str, path: Path, tail: int | None = None) -> None:
    if not path.exists():
        print(f"--- {title}: {path} does not exist")
        return
    lines = path.read_text(errors="replace").splitlines()
    shown = lines if tail is None else lines[-tail:]
    print(f"--- {title} ({path}{'' if tail is None else f', last {len(shown)} lines'}) ---")
    print("\n".join(shown))
    print("---")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vm-smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--script", type=Path, help="run this shell script in the guest instead of the steps")
    parser.add_argument("--install", action="store_true", help="with --script: run ./install.sh first")
    parser.add_argument("--keep-output", type=Path, metavar="DIR", help="where the logs go")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds before QEMU is killed (default 3600)"
    )
    parser.add_argument("--memory", type=int, default=4096, metavar="MIB", help="guest memory")
    parser.add_argument("--rebuild", action="store_true", help="build the image again even if cached")
    args = parser.parse_args(argv)
    if args.install and args.script is None:
        parser.error("--install goes with --script")
    signal.signal(signal.SIGTERM, _terminate)
    report = Report()
    output = _output_dir(args.keep_output)
    print(f"vm-smoke: output in {output}", flush=True)
    try:
        return _run(args, report, output)
    except KeyboardInterrupt:
        print("vm-smoke: interrupted; QEMU stopped and temporary files removed", flush=True)
        return 130


def _run(args: argparse.Namespace, report: Report, output: Path) -> int:
    started = time.monotonic()
    try:
        host_image.ensure_host_packages(_say)
    except Exception as error:
        report.add("host packages", False, time.monotonic() - started, str(error))
        return report.summary()
    started = time.monotonic()
    try:
        if args.rebuild and (cached := host_image.cached_image()) is not None:
            remove_tree(cached.directory)
        cached_before = host_image.cached_image() is not None
        image = host_image.build_image(_say)
        detail = f"cached {image.directory}" if cached_before else f"built {image.directory}"
        report.add("image", True, time.monotonic() - started, detail)
    except Exception as error:
        report.add("image", False, time.monotonic() - started, str(error)[-2000:])
        return report.summary()
    job: dict[str, object] = {"mode": "steps"}
    extra: dict[str, Path] = {}
    if args.script is not None:
        job = {"mode": "script", "install": args.install}
        extra["script.sh"] = args.script
    result = qemu_run.boot(
        image,
        job,
        output,
        args.timeout,
        report.guest_event,
        _say,
        lambda seconds: report.add("boot (QEMU -> guest job)", True, seconds),
        memory_mib=args.memory,
        extra_files=extra,
    )
    if result.boot_seconds is None:
        report.add("boot (QEMU -> guest job)", False, result.total_seconds, "the guest job never started")
        _print_file("serial console", output / "console.log", tail=60)
    if result.boot_seconds is not None and result.exit_code != 0 and not report.failed():
        # The job failed (or never ended) without a failed step to show for it.
        why = (
            f"exited {result.exit_code}"
            if result.exit_code is not None
            else ("timed out" if result.timed_out else f"QEMU exited {result.qemu_status}")
        )
        report.add("guest job", False, result.total_seconds, why)
        _print_file("guest log", output / "guest.log", tail=60)
    elif result.exit_code is None and result.boot_seconds is not None:
        why = "timed out" if result.timed_out else f"QEMU exited {result.qemu_status}"
        report.add("guest job finished", False, result.total_seconds, why)
        _print_file("guest log", output / "guest.log", tail=60)
    if args.script is not None:
        _print_file("script output", output / "script.log")
    for name in REPORT_FILES:
        if (output / "report" / name).exists():
            _print_file(name, output / "report" / name, tail=250)
    print(f"vm-smoke: logs in {output} (console.log, guest.log, steps/)", flush=True)
    return report.summary()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The guest's side of vm-smoke (run as root by the image's omv-harness unit):
guest_steps.py JOB_JSON RESULTS_DIR COPY_STARTED (guest uptime when entry.sh began the copy)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from guest_runner import Log, StepFailed, Steps, run
from guest_smoke import Smoke, smoke

CHECKOUT = Path("/opt/openmicrovm")
ROOT_ENVIRONMENT = {
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


def script_job(steps: Steps, job: dict[str, object], results: Path) -> None:
    needs = ["copy checkout"]
    if job.get("install"):
        # The script runs even when the install failed: it is how one finds out why.
        steps.run("install.sh", Smoke(steps, results).install, needs=needs)

    def user_script(log: Log) -> str:
        with open(results / "script.log", "w") as out:
            result = run(log, ["sh", "/mnt/work/job/script.sh"], timeout=3600, check=False)
            out.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise StepFailed(f"the script exited {result.returncode}")
        return ""

    steps.run("script", user_script, needs=needs)


def main(job_file: Path, results: Path, copy_started: float) -> int:
    # A unit's environment is bare (no HOME, a short PATH); the steps act as root in a login shell.
    os.environ.update(ROOT_ENVIRONMENT)
    os.chdir(CHECKOUT)
    job = json.loads(job_file.read_text())
    steps = Steps(results)
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    files = sum(1 for path in CHECKOUT.rglob("*") if path.is_file())
    steps.record(
        "copy checkout", (CHECKOUT / "install.sh").is_file(), uptime - copy_started, f"{files} files"
    )
    if job.get("mode") == "script":
        script_job(steps, job, results)
    else:
        smoke(steps, results)
    return 1 if steps.failed() else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])))

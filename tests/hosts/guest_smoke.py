"""The smoke steps: install openmicrovm as the README says, run it as a systemd service, and drive
a MicroVM through its life as an unprivileged user, checking what the kernel shows at each turn.

Steps record what they saw in results/report/*.txt (install time, doctor, cgroup facts, evidence
of failures); the host prints those files at the end of the run.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import guest_probe as probe
from guest_runner import Log, StepFailed, Steps, run, wait_for
from guest_sampler import Sampler

CHECKOUT = Path("/opt/openmicrovm")
CLI = str(CHECKOUT / ".venv" / "bin" / "openmicrovm")
UNIT_FILE = CHECKOUT / "deploy" / "openmicrovm.service"
SYSTEM_CONFIG = Path("/etc/openmicrovm/openmicrovm.toml")
USER = "alice"
IMAGE = "sample-app"
HOOKS = json.dumps(
    {
        "port": 8080,
        "microvmImageHooks": {"ready": "ENABLED", "validate": "ENABLED"},
        "microvmHooks": {"run": "ENABLED", "suspend": "ENABLED", "resume": "ENABLED", "terminate": "ENABLED"},
    }
)
# The settings deploy/openmicrovm.service asks for "at least", in TOML.
SERVICE_SETTINGS = {
    "data_dir": '"/var/lib/openmicrovm"',
    "cache_dir": '"/var/cache/openmicrovm"',
    "artifact_file_roots": '["/var/lib/openmicrovm/artifacts", "/var/lib/openmicrovm-uploads"]',
}
# Small so that the test sees the disk tier within a minute. (min_idle_seconds cannot shorten the
# idle test: the CLI's botocore refuses maxIdleDurationSeconds below the API model's 60 itself.)
TEST_SETTINGS = {"suspend_to_disk_after_seconds": 15}
IDLE_SECONDS = 60
API = "http://127.0.0.1:4599"
# debootstrap's line per package: left out of the deploy's time line.
DEBOOTSTRAP_CHATTER = re.compile(
    r"\]\s+(Retrieving|Validating|Extracting|Unpacking|Configuring|Resolving|Found|Checking|Installing|Chosen|Setting up) "
)
# Only when deploy/openmicrovm.service is missing (it was being written when this harness was):
# the "service file" step fails then, and the later steps still run on this stand-in.
STAND_IN_UNIT = """[Unit]
Description=openmicrovm (vm-smoke STAND-IN for the missing deploy/openmicrovm.service)
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart=/opt/openmicrovm/.venv/bin/openmicrovm serve --data-dir /var/lib/openmicrovm
StateDirectory=openmicrovm
StateDirectoryMode=0700
KillMode=process
Delegate=yes
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


class Smoke:
    def __init__(self, steps: Steps, results: Path) -> None:
        self.steps = steps
        self.report = results / "report"
        self.report.mkdir(exist_ok=True)
        self.image_arn = ""
        self.first = ""  # the MicroVM of the run/endpoint/suspend/shell/terminate steps
        self.survivor = ""  # the MicroVM kept running through the restart and the crash
        self.counter = -1
        self.idler = ""  # the MicroVM left idle until it suspends itself
        self.idle_since = 0.0

    # -- helpers ---------------------------------------------------------------------------------
    def note(self, name: str, title: str, text: str) -> None:
        with open(self.report / f"{name}.txt", "a") as out:
            out.write(f"### {title}\n{text.rstrip()}\n\n")

    def cli(self, log: Log, *args: str, timeout: float = 300, stdin: str | None = None) -> str:
        return run(log, [CLI, *args], user=USER, timeout=timeout, stdin=stdin).stdout

    def evidence(self, log: Log, error: str) -> None:
        """Why the product failed, for the report: the error, the server's journal, doctor."""
        journal = run(log, "journalctl -u openmicrovm --no-pager -n 150 -o short-monotonic", check=False)
        doctor = run(log, [CLI, "doctor"], check=False, timeout=180)
        status = run(log, "systemctl status openmicrovm --no-pager -n 0", check=False)
        text = f"error: {error}\n\n--- systemctl status ---\n{status.stdout}\n--- journalctl -u openmicrovm (last 150) ---\n{journal.stdout}\n--- doctor ---\n{doctor.stdout}{doctor.stderr}"
        self.note("failures", f"evidence for: {error.splitlines()[0][:200]}", text)

    def wait_state(self, microvm_id: str, wanted: str, timeout: float) -> None:
        wait_for(f"{microvm_id} {wanted}", lambda: probe.state(microvm_id) == wanted, timeout)

    def wait_api(self, timeout: float = 180) -> None:
        wait_for("the API answers on 127.0.0.1:4599", probe.api_answers, timeout)

    def call(self, log: Log, microvm_id: str) -> dict[str, object]:
        """The sample app's GET / through the endpoint, checked to come from this MicroVM."""
        body = self.cli(log, "curl", microvm_id, "/", timeout=120)
        try:
            answer = json.loads(body)
        except json.JSONDecodeError:
            raise StepFailed(f"the endpoint of {microvm_id} answered no JSON: {body[:300]!r}") from None
        if answer.get("microvmId") != microvm_id:
            raise StepFailed(f"the endpoint of {microvm_id} answered for {answer.get('microvmId')}: {answer}")
        return answer  # type: ignore[no-any-return]

    def run_microvm(self, log: Log, *extra: str) -> str:
        output = self.cli(log, "run", IMAGE, "--output", "json", *extra, timeout=600)
        microvm = json.loads(output)
        if microvm.get("state") != "RUNNING":
            raise StepFailed(f"run answered state {microvm.get('state')}: {microvm}")
        return str(microvm["microvmId"])

    def sandbox_cgroups(self, microvm_id: str) -> list[Path]:
        key = str(probe.sandbox_record(microvm_id)["key"])
        return probe.cgroups_named(key)

    # -- steps -----------------------------------------------------------------------------------
    def install(self, log: Log) -> str:
        sampler = Sampler()
        try:
            with sampler:
                run(log, "./install.sh", timeout=1800, stdout_to_log=True)
        finally:
            self.note("install-time", "where ./install.sh spent its time (sampled)", sampler.summary())
        return sampler.summary()

    def service_file(self, log: Log) -> str:
        if not UNIT_FILE.is_file():
            raise StepFailed(f"{UNIT_FILE} does not exist; the service steps run on a STAND-IN unit")
        log.section(str(UNIT_FILE), UNIT_FILE.read_text())
        return ""

    def _write_settings(self, log: Log) -> None:
        """The system settings file with what deploy/openmicrovm.service says it needs at least,
        and the test's short timers."""
        lines = [f"{key} = {value}" for key, value in {**SERVICE_SETTINGS, **TEST_SETTINGS}.items()]
        SYSTEM_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONFIG.write_text("\n".join(lines) + "\n")
        SYSTEM_CONFIG.chmod(0o644)
        log.section(str(SYSTEM_CONFIG), SYSTEM_CONFIG.read_text())

    def service_up(self, log: Log) -> str:
        self._write_settings(log)
        target = Path("/etc/systemd/system/openmicrovm.service")
        if UNIT_FILE.is_file():
            run(log, f"cp {UNIT_FILE} /etc/systemd/system/")
        else:
            target.write_text(STAND_IN_UNIT)
        run(log, "systemctl daemon-reload && systemctl enable --now openmicrovm")
        started = time.monotonic()
        self.wait_api()
        pid = probe.main_pid()
        self.note(
            "cgroup-facts",
            "server main process",
            f"MainPID {pid}\n/proc/{pid}/cgroup: {probe.read(Path(f'/proc/{pid}/cgroup'))}\n"
            f"/sys/fs/cgroup/cgroup.subtree_control: {probe.read(probe.CGROUP_ROOT / 'cgroup.subtree_control')}",
        )
        return f"API answered {time.monotonic() - started:.1f} s after enable --now"

    def doctor(self, log: Log) -> str:
        result = run(log, [CLI, "doctor"], check=False, timeout=300)
        self.note(
            "doctor", f"openmicrovm doctor (as root), exit {result.returncode}", result.stdout + result.stderr
        )
        if result.returncode != 0:
            raise StepFailed(
                f"doctor exited {result.returncode}: {result.stdout[-1500:]}{result.stderr[-500:]}"
            )
        return ""

    def console(self, log: Log) -> str:
        """The web console and its terminal's xterm.js, as the service serves them: install.sh
        fetched xterm.js into root's cache dir before the settings named the service's own."""
        served = []
        for path in ("/console/", "/console/vendor/xterm/xterm.js", "/console/vendor/xterm/addon-fit.js"):
            with urllib.request.urlopen(f"{API}{path}", timeout=60) as answer:
                size = len(answer.read())
            log.section(path, f"{answer.status}, {size} bytes")
            served.append(f"{path} {size} B")
        return ", ".join(served)

    def deploy(self, log: Log) -> str:
        output = self.cli(
            log,
            "deploy",
            "examples/sample-app",
            "--name",
            IMAGE,
            "--hooks",
            HOOKS,
            "--output",
            "json",
            timeout=1800,
        )
        timeline = [
            line for line in log.path.read_text().splitlines() if not DEBOOTSTRAP_CHATTER.search(line)
        ]
        self.note("deploy-time", "openmicrovm deploy, seconds since it started", "\n".join(timeline))
        answer = json.loads(output)
        if answer.get("imageState") != "CREATED" or answer.get("versionState") != "SUCCESSFUL":
            raise StepFailed(
                f"deploy ended with image {answer.get('imageState')}, version {answer.get('versionState')}: {answer.get('stateReason')}"
            )
        self.image_arn = str(answer["imageArn"])
        return f"image {answer['imageState']}, version {answer['imageVersion']} {answer['versionState']}"

    def run_first(self, log: Log) -> str:
        self.first = self.run_microvm(log, "--payload", "first", "--shell")
        return self.first

    def endpoint(self, log: Log) -> str:
        answer = self.call(log, self.first)
        if answer.get("payload") != "first":
            raise StepFailed(f"the run hook payload did not arrive: {answer}")
        self.counter = int(answer.get("counter", -1))  # type: ignore[call-overload]
        return f"counter {self.counter}, hooks {answer.get('hooks')}"

    def cgroup_facts(self, log: Log) -> str:
        record = probe.sandbox_record(self.first)
        key = str(record["key"])
        cgroups = probe.cgroups_named(key)
        text = [f"sandbox {probe.sandbox_dir(self.first)} key {key}"]
        text += [probe.describe_cgroup(path) for path in cgroups]
        for path in cgroups:  # the controllers the parents hand down
            text.append(
                f"parent {path.parent}: subtree_control {probe.read(path.parent / 'cgroup.subtree_control')}"
            )
        text.append("runsc processes:\n" + "\n".join(probe.processes_naming(key)))
        self.note("cgroup-facts", f"MicroVM {self.first} RUNNING", "\n".join(text))
        log.write("\n".join(text))
        if not cgroups:
            raise StepFailed(f"no cgroup named after the sandbox key {key} under /sys/fs/cgroup")
        limits = [
            f"{path.relative_to(probe.CGROUP_ROOT)}: memory.max {probe.read(path / 'memory.max')}, cpu.max {probe.read(path / 'cpu.max')}, pids.max {probe.read(path / 'pids.max')}"
            for path in cgroups
        ]
        return "; ".join(limits)

    def suspend_memory(self, log: Log) -> str:
        self.cli(log, "suspend", self.first)
        record = probe.sandbox_record(self.first)
        cgroups = self.sandbox_cgroups(self.first)
        freezes = {str(path): probe.read(path / "cgroup.freeze") for path in cgroups}
        memory = {str(path): probe.read(path / "memory.current") for path in cgroups}
        self.note(
            "cgroup-facts",
            f"MicroVM {self.first} SUSPENDED (memory)",
            f"record state {record.get('state')} in {record.get('suspended_in')}\ncgroup.freeze: {freezes}\nmemory.current: {memory}",
        )
        if record.get("suspended_in") != "memory" or "1" not in freezes.values():
            raise StepFailed(
                f"expected a frozen cgroup and a record suspended in memory: {record.get('state')}/{record.get('suspended_in')}, cgroup.freeze {freezes}"
            )
        self.cli(log, "resume", self.first)
        answer = self.call(log, self.first)
        return f"cgroup.freeze {set(freezes.values())} while suspended; counter after resume {answer.get('counter')}"

    def suspend_disk(self, log: Log) -> str:
        self.cli(log, "suspend", self.first)
        key = str(probe.sandbox_record(self.first)["key"])

        def on_disk() -> bool:
            record = probe.sandbox_record(self.first)
            return record.get("state") == "suspended" and record.get("suspended_in") == "disk"

        started = time.monotonic()
        wait_for("the sandbox written to disk", on_disk, TEST_SETTINGS["suspend_to_disk_after_seconds"] + 180)
        directory = probe.sandbox_dir(self.first)
        assert directory is not None
        images = [
            f"{path.relative_to(directory)} {path.stat().st_size} bytes" for path in directory.rglob("*.img")
        ]
        processes = probe.processes_naming(key)
        cgroups = {str(path): probe.read(path / "memory.current") for path in probe.cgroups_named(key)}
        facts = f"after {time.monotonic() - started:.0f} s: images {images}; runsc processes {processes}; cgroups (memory.current) {cgroups}"
        self.note("cgroup-facts", f"MicroVM {self.first} SUSPENDED (disk)", facts)
        if not images or processes:
            raise StepFailed(f"not really on disk: {facts}")
        self.cli(log, "resume", self.first, timeout=600)
        answer = self.call(log, self.first)
        return f"{facts}; counter after resume {answer.get('counter')}"

    def shell(self, log: Log) -> str:
        output = self.cli(log, "shell", self.first, stdin="echo omv-shell-$((6*7))\nexit\n", timeout=180)
        if "omv-shell-42" not in output:
            raise StepFailed(f"the shell did not run the command: {output[-500:]!r}")
        return ""

    def terminate(self, log: Log) -> str:
        key = str(probe.sandbox_record(self.first)["key"])
        self.cli(log, "terminate", self.first)
        if probe.state(self.first) != "TERMINATED":
            raise StepFailed(f"state {probe.state(self.first)} after terminate")
        time.sleep(2)  # the runsc processes of a killed sandbox take a moment to be reaped
        left = probe.leftovers(key)
        if left:
            raise StepFailed(f"left behind after terminate: {left}")
        return f"no cgroup, netns or process named {key}"

    def first_200(self, log: Log) -> str:
        """RunMicrovm → first 200 beside `python3 app.py` → first 200, on this guest, as a user
        with boto3 (guest_first200.py). A figure for the report; only a failure to answer fails."""
        script = Path(__file__).resolve().parent / "guest_first200.py"
        output = run(
            log,
            [str(CHECKOUT / ".venv" / "bin" / "python"), str(script), self.image_arn],
            user=USER,
            timeout=900,
        ).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        self.note(
            "first-200",
            "RunMicrovm -> first 200 beside python3 app.py, in the guest",
            json.dumps(figures, indent=2),
        )
        return (
            f"RunMicrovm -> first 200 {figures['RunMicrovm -> first 200 (median ms)']} ms, "
            f"python3 app.py -> first 200 {figures['python3 app.py -> first 200 (median ms)']} ms "
            f"(ratio {figures['ratio']}, medians of {figures['runs']})"
        )

    def idle_start(self, log: Log) -> str:
        """A MicroVM left alone from here on: the idle check comes a few steps later, so that the
        idle minute passes while the other steps run."""
        self.idler = self.run_microvm(log, "--idle", str(IDLE_SECONDS))
        self.idle_since = time.monotonic()
        return self.idler

    def idle(self, log: Log) -> str:
        self.wait_state(self.idler, "SUSPENDED", IDLE_SECONDS + 180 - (time.monotonic() - self.idle_since))
        took = time.monotonic() - self.idle_since
        record = probe.sandbox_record(self.idler)
        self.cli(log, "terminate", self.idler)
        return f"SUSPENDED by itself {took:.0f} s after RUNNING (idle {IDLE_SECONDS} s); sandbox {record.get('state')} in {record.get('suspended_in')}"

    def restart(self, log: Log) -> str:
        self.survivor = self.run_microvm(log, "--payload", "survivor")
        self.call(log, self.survivor)
        key = str(probe.sandbox_record(self.survivor)["key"])
        before = len(probe.processes_naming(key))
        run(log, "systemctl restart openmicrovm")
        self.wait_api()
        self.wait_state(self.survivor, "RUNNING", 120)
        self.call(log, self.survivor)
        return f"{before} sandbox processes before; RUNNING and answering after the restart"

    def crash(self, log: Log) -> str:
        key = str(probe.sandbox_record(self.survivor)["key"])
        before = probe.processes_naming(key)
        run(log, "systemctl kill -s KILL openmicrovm")
        time.sleep(2)
        after = probe.processes_naming(key)
        killed = sorted(set(before) - set(after))
        self.note(
            "cgroup-facts",
            "systemctl kill -s KILL openmicrovm: the sandbox's processes",
            "before:\n" + "\n".join(before) + "\nkilled:\n" + ("\n".join(killed) or "none"),
        )
        run(log, "systemctl start openmicrovm")
        self.wait_api()
        microvm = probe.microvm(self.survivor)
        if microvm.get("state") != "RUNNING":
            raise StepFailed(
                f"after the crash: {microvm.get('state')} ({microvm.get('stateReason')}); killed with the server: {killed}"
            )
        self.call(log, self.survivor)
        if killed:  # the shim that parents them included: it lives in the sandbox's cgroup
            raise StepFailed(f"the kill of the server took processes of the sandbox with it: {killed}")
        return f"re-adopted; none of the {len(before)} processes naming the sandbox died with the server"

    def cleanup(self, log: Log) -> str:
        run(log, "systemctl stop openmicrovm")
        result = run(log, [CLI, "cleanup"], timeout=300, check=False)
        time.sleep(1)
        # An empty openmicrovm.slice is systemd's to collect; anything with a process is a leftover.
        left = [
            f"cgroup {path} (procs: {probe.read(path / 'cgroup.procs').split()})"
            for path in probe.cgroups_named("openmicrovm")
            if not (path.name.endswith(".slice") and not probe.read(path / "cgroup.procs"))
        ]
        left += [f"netns {name}" for name in probe.netns_named("omv-")]
        left += [f"process {line}" for line in probe.processes_naming("runsc")]
        left += [f"process {line}" for line in probe.processes_naming("omv-shim")]
        self.note("cgroup-facts", "after openmicrovm cleanup", "\n".join(left) or "nothing left")
        if result.returncode != 0:
            error = "\n".join(result.stderr.splitlines()[-3:])
            raise StepFailed(f"openmicrovm cleanup exited {result.returncode}: {error}; left: {left}")
        if left:
            raise StepFailed(f"left after cleanup: {left}")
        return result.stdout.strip()


def smoke(steps: Steps, results: Path) -> None:
    smoke = Smoke(steps, results)
    product = smoke.evidence  # a failure here most likely is the product's: keep its journal
    steps.run("install.sh", smoke.install, needs=["copy checkout"])
    steps.run("service file", smoke.service_file, needs=["copy checkout"])
    steps.run("service up", smoke.service_up, needs=["install.sh"], on_failure=product)
    steps.run("doctor", smoke.doctor, needs=["install.sh"])
    steps.run("console", smoke.console, needs=["service up"], on_failure=product)
    steps.run("deploy sample-app", smoke.deploy, needs=["service up"], on_failure=product)
    steps.run("run", smoke.run_first, needs=["deploy sample-app"], on_failure=product)
    steps.run("endpoint", smoke.endpoint, needs=["run"], on_failure=product)
    steps.run("cgroup facts", smoke.cgroup_facts, needs=["run"])
    steps.run("run idle MicroVM", smoke.idle_start, needs=["deploy sample-app"], on_failure=product)
    steps.run("suspend/resume memory", smoke.suspend_memory, needs=["endpoint"], on_failure=product)
    steps.run("suspend/resume disk", smoke.suspend_disk, needs=["endpoint"], on_failure=product)
    steps.run("shell", smoke.shell, needs=["run"], on_failure=product)
    steps.run("terminate", smoke.terminate, needs=["run"], on_failure=product)
    steps.run("first 200", smoke.first_200, needs=["deploy sample-app"], on_failure=product)
    steps.run("idle auto-suspend", smoke.idle, needs=["run idle MicroVM"], on_failure=product)
    steps.run("restart re-adopts", smoke.restart, needs=["deploy sample-app"], on_failure=product)
    steps.run("crash re-adopts", smoke.crash, needs=["restart re-adopts"], on_failure=product)
    steps.run("cleanup", smoke.cleanup, needs=["service up"], on_failure=product)

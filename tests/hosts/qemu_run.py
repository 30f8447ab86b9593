"""One boot of the guest: a throwaway overlay, the 9p shares, QEMU under a deadline, and the
guest's step reports relayed as they arrive."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cleanup import kill_group, remove_tree
from host_image import HERE, Image

CHECKOUT = HERE.parent.parent
KERNEL_COMMAND_LINE = (
    "console=ttyS0 root=/dev/vda rw systemd.unified_cgroup_hierarchy=1 net.ifnames=0 "
    "systemd.journald.forward_to_console=0"
)


@dataclass
class BootResult:
    exit_code: int | None  # the guest job's, None when it never finished
    boot_seconds: float | None  # QEMU start -> guest job start
    total_seconds: float
    timed_out: bool
    qemu_status: int | None
    steps: list[dict[str, object]] = field(default_factory=list)


def _checkout_files() -> list[str]:
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=CHECKOUT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listing.split("\0") if name and not name.startswith(".venv/")]


def pack_checkout(target: Path) -> int:
    """Tracked and untracked-but-not-ignored files, as they are now (others may be editing them)."""
    count = 0
    with tarfile.open(target, "w") as archive:
        for name in _checkout_files():
            source = CHECKOUT / name
            if not source.exists() and not source.is_symlink():
                continue  # deleted in the work tree, not yet in the index
            archive.add(source, arcname=name, recursive=False)
            count += 1
    return count


def _qemu_argv(image: Image, overlay: Path, work: Path, results: Path, memory_mib: int) -> list[str]:
    return [
        "qemu-system-x86_64",
        # KVM fails here (MSR assertion with -cpu host, a silent hang otherwise): TCG only.
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        str(memory_mib),
        "-smp",
        "2",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        KERNEL_COMMAND_LINE,
        "-drive",
        f"file={overlay},if=virtio,format=qcow2",
        "-virtfs",
        f"local,path={work},mount_tag=work,security_model=none,readonly=on",
        "-virtfs",
        f"local,path={results},mount_tag=results,security_model=none",
        "-nic",
        "user,model=virtio-net-pci",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{results / 'console.log'}",
        "-no-reboot",
    ]


class _StepRelay:
    """Prints the guest's step events from results/steps.jsonl as they are appended."""

    def __init__(self, path: Path, on_event: Callable[[dict[str, object]], None]) -> None:
        self.path = path
        self.on_event = on_event
        self.offset = 0
        self.events: list[dict[str, object]] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(event)
            self.on_event(event)


def boot(
    image: Image,
    job: dict[str, object],
    results: Path,
    timeout: float,
    on_event: Callable[[dict[str, object]], None],
    say: Callable[[str], None],
    on_boot: Callable[[float], None],
    memory_mib: int = 4096,
    extra_files: dict[str, Path] | None = None,
) -> BootResult:
    work = Path(tempfile.mkdtemp(prefix="omv-vm-run-", dir="/var/tmp"))
    qemu: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        count = pack_checkout(work / "checkout.tar")
        job_dir = work / "job"
        job_dir.mkdir()
        shutil.copy2(HERE / "guest_entry.sh", job_dir / "entry.sh")
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, job_dir / name)
        (job_dir / "job.json").write_text(json.dumps(job, indent=2) + "\n")
        overlay = work / "run.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.root), "-F", "raw", str(overlay)],
            check=True,
        )
        say(f"shared {count} files of the checkout; console log: {results / 'console.log'}")
        argv = _qemu_argv(image, overlay, work, results, memory_mib)
        with open(results / "qemu.log", "wb") as qemu_log:
            # A session of its own: Ctrl-C reaches us, not QEMU, and we end it ourselves below.
            qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log, start_new_session=True
            )
        relay = _StepRelay(results / "steps.jsonl", on_event)
        boot_seconds = None
        deadline = started + timeout
        timed_out = False
        while qemu.poll() is None:
            if boot_seconds is None and (results / "guest-started").exists():
                boot_seconds = time.monotonic() - started
                on_boot(boot_seconds)
            relay.poll()
            if time.monotonic() > deadline:
                timed_out = True
                say(f"timeout: the guest did not finish within {timeout:.0f} s; killing QEMU")
                break
            time.sleep(1)
        kill_group(qemu)
        relay.poll()
        exit_file = results / "exit-code"
        exit_code = int(exit_file.read_text().strip()) if exit_file.exists() else None
        return BootResult(
            exit_code, boot_seconds, time.monotonic() - started, timed_out, qemu.returncode, relay.events
        )
    finally:
        if qemu is not None:
            kill_group(qemu)
        remove_tree(work)

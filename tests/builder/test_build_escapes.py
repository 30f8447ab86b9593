"""A Dockerfile cannot reach the host: the known buildah escapes and other tricks, each tried for
real. The `RUN --mount` options behind CVE-2024-9675 and CVE-2024-1753 are refused before buildah
sees them; with that check switched off, the build jail (build_jail.py) still holds them: a path that
climbs out of the build ends in the jail's own root, and what the build runs as is no host user
that could write or read the host's files."""

from __future__ import annotations

import os
import re
import secrets
import struct
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.builder import container_build
from openmicrovm.builder.buildah import BuildahStore
from openmicrovm.builder.errors import CONTAINER_BUILD_FAILED, BuildFailed
from openmicrovm.idmap import ID_BASE
from tests.builder.conftest import assert_store_clean
from tests.builder.test_container_build import build, config_and_rootfs, make_context

BASE = "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"


class HostMarks:
    """A secret the build must never read (in a root-only dir, as the data dir's keys are) and
    paths on the host where no file may appear."""

    def __init__(self) -> None:
        token = secrets.token_hex(8)
        self.secret = f"host-secret-{secrets.token_hex(16)}"
        self.secret_dir = Path(f"/root/openmicrovm-test-secret-{token}")
        self.secret_dir.mkdir(mode=0o700)
        self.secret_file = self.secret_dir / "secret.txt"
        self.secret_file.write_text(self.secret)
        self.secret_file.chmod(0o600)
        self.world_readable = Path(f"/tmp/openmicrovm-test-public-{token}")
        self.world_readable.write_text(self.secret)
        self.world_readable.chmod(0o644)
        self.planted = [Path(f"/tmp/openmicrovm-escape-{token}"), Path(f"/var/tmp/openmicrovm-escape-{token}"),
                        Path(f"/root/openmicrovm-escape-{token}")]  # fmt: skip
        self.token = token

    def writes(self, inside: str) -> str:
        """Shell that tries to create the planted files under `inside` (the host's / if escaped)."""
        return "; ".join(f"touch {inside}{path} 2>/dev/null && echo WROTE {path}" for path in self.planted)

    def assert_untouched(self, log: list[str]) -> None:
        text = "\n".join(log)
        assert self.secret not in text, "the build read a host file"
        assert [path for path in self.planted if path.exists()] == [], "the build wrote to the host"
        assert self.secret_file.read_text() == self.secret

    def remove(self) -> None:
        for path in [*self.planted, self.world_readable, self.secret_file]:
            path.unlink(missing_ok=True)
        self.secret_dir.rmdir()


@pytest.fixture
def host() -> Iterator[HostMarks]:
    marks = HostMarks()
    try:
        yield marks
    finally:
        marks.remove()


@pytest.fixture
def without_mount_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let every RUN --mount reach buildah, to show the jail holds on its own."""
    monkeypatch.setattr(container_build, "unsafe_run_mount", lambda _dockerfile: None)


def try_build(store: BuildahStore, context: Path, log: list[str]) -> BuildFailed | None:
    try:
        build(store, context, log)
    except BuildFailed as failure:
        return failure
    return None


CACHE_ID_ESCAPE = (
    BASE
    + "COPY probe.sh /probe.sh\nRUN --mount=type=cache,id=../../../../../../../..,target=/h sh /probe.sh\n"
)
SYMLINK_ESCAPE = (
    "FROM public.ecr.aws/lambda/microvms:al2023-minimal AS linked\n"
    "RUN ln -s / /link\n"
    "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
    "COPY probe.sh /probe.sh\n"
    "RUN --mount=type=bind,from=linked,source=/link,target=/h,rw sh /probe.sh\n"
)


def escape_context(path: Path, dockerfile: str, host: HostMarks) -> Path:
    """A build whose RUN step, given the host's root at /h, lists it, reads and writes there."""
    probe = (
        "echo LISTING $(ls /h)\n"
        f"cat /h{host.secret_file} /h{host.world_readable} 2>&1\n"
        f"{host.writes('/h')}\n"
        "echo PROBE-RAN\n"
    )
    return make_context(path, {"Dockerfile": dockerfile, "probe.sh": probe})


@pytest.mark.parametrize(
    "dockerfile", [CACHE_ID_ESCAPE, SYMLINK_ESCAPE], ids=["cve-2024-9675", "cve-2024-1753"]
)
def test_run_mounts_that_name_host_paths_are_refused_naming_the_line(
    store: BuildahStore, tmp_path: Path, host: HostMarks, dockerfile: str
) -> None:
    context = escape_context(tmp_path / "ctx", dockerfile, host)
    log: list[str] = []
    failure = try_build(store, context, log)
    assert failure is not None and failure.code == CONTAINER_BUILD_FAILED
    line = 3 if dockerfile is CACHE_ID_ESCAPE else 5
    assert f"Line {line} of the Dockerfile" in failure.state_reason and "CVE-2024-" in failure.state_reason
    host.assert_untouched(log)
    assert_store_clean(store)


@pytest.mark.usefixtures("without_mount_check")
@pytest.mark.parametrize(
    "dockerfile", [CACHE_ID_ESCAPE, SYMLINK_ESCAPE], ids=["cve-2024-9675", "cve-2024-1753"]
)
def test_the_jail_holds_the_buildah_escapes_without_the_check(
    store: BuildahStore, tmp_path: Path, host: HostMarks, dockerfile: str
) -> None:
    context = escape_context(tmp_path / "ctx", dockerfile, host)
    log: list[str] = []
    failure = try_build(store, context, log)
    # buildah 1.28 makes the mount and the step runs: what it sees at /h is the jail's root.
    assert failure is None and "PROBE-RAN" in log, "\n".join(log[-20:])
    listing = next(line.split()[1:] for line in log if line.startswith("LISTING"))
    assert "storage" in listing and "usr" in listing, listing
    assert "home" not in listing and "boot" not in listing and "work" not in listing, listing
    host.assert_untouched(log)
    assert_store_clean(store)


@pytest.mark.parametrize("kind", ["secret", "ssh"])
def test_secret_and_ssh_mounts_are_refused(store: BuildahStore, tmp_path: Path, kind: str) -> None:
    context = make_context(tmp_path / "ctx", {"Dockerfile": BASE + f"RUN --mount=type={kind},id=x true\n"})
    failure = try_build(store, context, [])
    assert failure is not None and failure.code == CONTAINER_BUILD_FAILED
    assert "Line 2 of the Dockerfile" in failure.state_reason and f"type={kind}" in failure.state_reason


def test_add_and_copy_of_host_paths_and_stage_symlinks_stay_in_the_build(
    store: BuildahStore, tmp_path: Path, host: HostMarks
) -> None:
    dockerfile = BASE.replace("\n", " AS linked\n") + textwrap.dedent(
        f"""\
        RUN ln -s / /link && ln -s {host.world_readable} /public
        {BASE.strip()}
        COPY --from=linked /link{host.world_readable} /copied-through-link
        COPY --from=linked /public /copied-symlink
        ADD {host.world_readable} /added
        RUN cat /copied-through-link /copied-symlink /added 2>&1; true
        """
    )
    context = make_context(
        tmp_path / "ctx", {"Dockerfile": dockerfile, host.world_readable.name: "context copy"}
    )
    log: list[str] = []
    failure = try_build(store, context, log)
    host.assert_untouched(log)
    if failure is None:  # what was copied came from the build context or the stage, never the host
        image_id = (tmp_path / "iid").read_text().strip()
        _, export = config_and_rootfs(store, image_id, context)
        for name in ("copied-through-link", "copied-symlink", "added"):
            path = export.path / name
            assert not path.is_file() or host.secret not in path.read_text(errors="replace")
    assert_store_clean(store)


def test_run_steps_cannot_mount_mknod_chroot_or_enter_host_namespaces(
    store: BuildahStore, tmp_path: Path, host: HostMarks
) -> None:
    attempts = {
        "mount": "mount -t tmpfs none /mnt",
        "mount-proc-root": "mount --bind /proc/1/root /mnt",
        "mknod": "mknod /dev/sdz b 8 0",
        "chroot": "chroot / true",
        "nsenter": "nsenter --target 1 --mount --net true",
        "unshare-user": "unshare --user --map-root-user true",
        "proc1-root-read": f"cat /proc/1/root{host.secret_file}",
        "proc1-root-write": f"touch /proc/1/root{host.planted[0]}",
        "sys-write": "echo 1 > /proc/sys/kernel/sysrq",
    }
    # A subshell per attempt, so that even a failed redirection prints nothing but the verdict;
    # verdicts are searched anywhere in a line (buildah may interleave the step's stderr with it).
    script = "\n".join(
        f"if ( {command} ) >/dev/null 2>&1; then echo ATTEMPT {name} ok; else echo ATTEMPT {name} refused; fi"
        for name, command in attempts.items()
    )
    context = make_context(
        tmp_path / "ctx", {"Dockerfile": BASE + "COPY try.sh /try.sh\nRUN sh /try.sh\n", "try.sh": script}
    )
    log: list[str] = []
    assert try_build(store, context, log) is None, "\n".join(log[-20:])
    verdicts = (re.search(r"ATTEMPT (\S+) (ok|refused)", line) for line in log)
    results = {match.group(1): match.group(2) for match in verdicts if match}
    assert results.keys() == attempts.keys(), log[-20:]
    allowed = {name for name, outcome in results.items() if outcome == "ok"}
    assert allowed == set(), f"RUN steps could: {sorted(allowed)}"
    host.assert_untouched(log)
    assert_store_clean(store)


def test_what_a_build_writes_belongs_to_unprivileged_ids_with_no_device_nodes(
    store: BuildahStore, tmp_path: Path
) -> None:
    dockerfile = BASE + textwrap.dedent(
        """\
        RUN cp /bin/sh /suid-sh && chmod 4755 /suid-sh \\
            && (mknod /dev-node c 1 3 || echo no mknod) \\
            && python3 -c "{SET_CAPABILITY}"
        """
    ).replace("{SET_CAPABILITY}", SET_CAPABILITY)
    context = make_context(tmp_path / "ctx", {"Dockerfile": dockerfile})
    image_id = build(store, context)
    _, export = config_and_rootfs(store, image_id, context)
    for directory in (export.path, store.root):
        for parent, dirs, files in os.walk(directory):
            for name in [*dirs, *files]:
                status = os.lstat(os.path.join(parent, name))
                assert status.st_uid >= ID_BASE and status.st_gid >= ID_BASE, os.path.join(parent, name)
                assert not (status.st_mode & 0o170000 in (0o020000, 0o060000) and status.st_rdev != 0), (
                    f"device node on the host: {os.path.join(parent, name)}"
                )
    suid = os.lstat(export.path / "suid-sh")
    assert suid.st_mode & 0o4000 and suid.st_uid == ID_BASE  # setuid to an unprivileged host id
    # The kernel stored the capability as one of the build's user namespace (revision 3, with its
    # root's host id), which grants nothing to a process of the host's.
    stored = os.getxattr(export.path / "suid-sh", "security.capability", follow_symlinks=False)
    revision, *_, root_id = struct.unpack("<IIIIII", stored)
    assert revision & 0xFF000000 == 0x03000000 and root_id == ID_BASE
    assert_store_clean(store)


# What `setcap cap_sys_admin+ep /suid-sh` writes (revision 2, effective, CAP_SYS_ADMIN permitted).
SET_CAPABILITY = (
    "import os, struct; "
    "os.setxattr('/suid-sh', 'security.capability', struct.pack('<IIIII', 0x02000001, 1 << 21, 0, 0, 0))"
)

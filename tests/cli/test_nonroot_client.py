"""The CLI of a local user other than root against a server run as root with a data dir closed to
them (deploy/openmicrovm.service): `deploy` puts its zip in the shared upload directory, under a
name nobody can guess, readable by its owner and root only; the other verbs need only the API.

These run the CLI as `nobody`, with the settings a system service shares with its users in a
system-wide settings file (OPENMICROVM_SYSTEM_CONFIG stands in for /etc/openmicrovm/openmicrovm.toml).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from openmicrovm.cli import packaging
from openmicrovm.cli.connection import CliError
from openmicrovm.cli.packaging import artifact_dir, package
from tests.cli.helpers import BUILD_TIMEOUT, SAMPLE_APP, SAMPLE_HOOKS, command, terminate_all
from tests.support import unprivileged
from tests.support.images import build_failure, image_request, wait_image_settled, zip_dir
from tests.support.server import DatabaseBackend, ServerProcess, write_settings

PRIVATE_ZIP = re.compile(r"(?P<name>.+)-[0-9a-f]{32}\.zip")


@dataclass
class Host:
    """What a system service sets up: its data dir (root's, 0700), the shared upload directory
    (1733) and the system-wide settings file that lists both (0644)."""

    data_dir: Path
    uploads: Path
    system_config: Path

    @property
    def roots(self) -> list[str]:
        return [str(self.data_dir / "artifacts"), str(self.uploads)]

    def user_environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return unprivileged.environment(
            {"OPENMICROVM_SYSTEM_CONFIG": str(self.system_config), **(extra or {})}
        )


def make_host(top: Path, data_dir: Path) -> Host:
    data_dir.mkdir(mode=0o700, exist_ok=True)
    data_dir.chmod(0o700)
    uploads = top / "uploads"
    uploads.mkdir()
    uploads.chmod(0o1733)  # mkdir's mode passes through the umask; chmod does not
    host = Host(data_dir, uploads, top / "openmicrovm.toml")
    write_settings(host.system_config, {"data_dir": str(data_dir), "artifact_file_roots": host.roots})
    host.system_config.chmod(0o644)
    return host


@pytest.fixture
def host() -> Iterator[Host]:
    unprivileged.require_root()
    with unprivileged.reachable_dir() as top:
        yield make_host(top, top / "data")


def as_user(host: Host, code: str) -> str:
    """Python `code` run as `nobody`; what it printed."""
    result = unprivileged.run([sys.executable, "-c", code], host.user_environment())
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


CHOOSE = (
    "from openmicrovm.cli.connection import CliError\n"
    "from openmicrovm.cli.packaging import artifact_dir\n"
    "try:\n"
    "    print(artifact_dir(None))\n"
    "except CliError as error:\n"
    "    print('error', error.message)\n"
)


def test_a_user_gets_the_upload_directory_and_root_its_own(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nobody cannot enter the data dir, so not its artifacts/ either: the next root it can write.
    assert as_user(host, CHOOSE) == str(host.uploads)
    # root keeps the first root, made on demand, as before there was an upload directory.
    for name in ("OPENMICROVM_ARTIFACT_DIR", "OPENMICROVM_ARTIFACT_FILE_ROOTS", "OPENMICROVM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENMICROVM_DATA_DIR", str(host.data_dir))
    monkeypatch.setenv("OPENMICROVM_SYSTEM_CONFIG", str(host.system_config))
    assert artifact_dir(None) == host.data_dir / "artifacts"


def test_no_directory_a_user_can_write_says_what_to_do(host: Host) -> None:
    host.uploads.chmod(0o755)
    answer = as_user(host, CHOOSE)
    assert answer.startswith("error this user can write to none of the directories"), answer
    for hint in (str(host.uploads), str(host.system_config), "1733", "--artifact-dir", "--bucket"):
        assert hint in answer, answer


def test_a_first_root_that_does_not_exist_yet_is_made_only_when_it_is_the_first(host: Host) -> None:
    # Listed second, a missing directory is not made: the CLI writes only where the server was
    # set up to read, and a user must not create directories the admin did not.
    missing = host.uploads.parent / "later"
    write_settings(host.system_config, {"artifact_file_roots": [str(host.data_dir / "x"), str(missing)]})
    assert as_user(host, CHOOSE).startswith("error this user can write to none")
    write_settings(host.system_config, {"artifact_file_roots": [str(host.uploads / "mine" / "zips")]})
    assert as_user(host, CHOOSE) == str(host.uploads / "mine" / "zips")


PACKAGE = (
    "import sys\n"
    "from pathlib import Path\n"
    "from openmicrovm.cli.packaging import package\n"
    "print(package(Path(sys.argv[1]), 'sample', None, None, None).uri)\n"
)


def path_of(uri: str) -> Path:
    assert uri.startswith("file:///"), uri
    return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))


def test_a_users_zip_is_private_and_unguessable(host: Host) -> None:
    uris = []
    for _ in range(2):
        result = unprivileged.run(
            [sys.executable, "-c", PACKAGE, str(SAMPLE_APP)], host.user_environment(), timeout=60
        )
        assert result.returncode == 0, result.stderr
        uris.append(result.stdout.strip())
    first, second = map(path_of, uris)
    # The same folder twice: two files, as a content-addressed name would be known in advance.
    assert first != second and first.parent == second.parent == host.uploads
    for path in (first, second):
        match = PRIVATE_ZIP.fullmatch(path.name)
        assert match and match["name"] == "sample", path.name
        info = path.stat()
        assert info.st_uid == unprivileged.ids()[0] and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_nlink == 1
    assert first.read_bytes() == second.read_bytes()


def test_roots_own_directory_keeps_content_addressed_shared_zips(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OPENMICROVM_ARTIFACT_DIR", "OPENMICROVM_ARTIFACT_FILE_ROOTS", "OPENMICROVM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENMICROVM_SYSTEM_CONFIG", str(host.system_config))
    monkeypatch.setenv("OPENMICROVM_DATA_DIR", str(host.data_dir))
    previous = os.umask(0o022)  # root's usual: artifacts/ is made 0755, its own alone
    try:
        stored = package(SAMPLE_APP, "sample", None, None, None)
        again = package(SAMPLE_APP, "sample", None, None, None)
    finally:
        os.umask(previous)
    path = path_of(stored.uri)
    assert stored == again and path.parent == host.data_dir / "artifacts"
    assert stored.one_off is None  # content-addressed and shared by redeploys: never removed
    assert re.fullmatch(r"sample-[0-9a-f]{16}\.zip", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_nothing_planted_under_the_name_is_reused(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user who guessed the name (here: made it known) and put a symlink or a file there
    first gets the deploy refused, and their file is left as it was."""
    monkeypatch.setattr(packaging.secrets, "token_hex", lambda size: "0" * (2 * size))
    planted = host.uploads / f"sample-{'0' * 32}.zip"
    target = host.uploads.parent / "victim"
    target.write_text("untouched")
    planted.symlink_to(target)
    with pytest.raises(CliError, match=re.escape(f"cannot store the artifact in {host.uploads}")):
        package(SAMPLE_APP, "sample", None, None, host.uploads)
    assert target.read_text() == "untouched" and planted.is_symlink()
    planted.unlink()
    planted.write_text("theirs")
    with pytest.raises(CliError, match="File exists"):
        package(SAMPLE_APP, "sample", None, None, host.uploads)
    assert planted.read_text() == "theirs"


def test_an_image_name_cannot_lead_the_zip_out_of_its_directory(host: Host, tmp_path: Path) -> None:
    # The zip is stored before the server validates the name: a `/` or `..` in it stays a file name.
    for directory in (host.uploads, tmp_path / "own"):
        path = path_of(package(SAMPLE_APP, "../../escape/x", None, None, directory).uri)
        assert path.parent == directory and path.name.startswith("_.._escape_x-"), path


# ------------------------------------------------------------------ a real server, a real build


@pytest.fixture
def root_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Host]]:
    """A server run by root whose data dir nobody can reach (pytest's temp dir), reading zips from
    its artifacts/ and a shared upload directory, as deploy/openmicrovm.service sets it up."""
    unprivileged.require_root()
    with unprivileged.reachable_dir() as top:
        host = make_host(top, tmp_path / "server")
        settings = {"artifact_file_roots": host.roots}
        with DatabaseBackend("sqlite").server(host.data_dir, settings) as server:
            server.start()
            yield server, host


def user_cli(
    server: ServerProcess, host: Host, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return unprivileged.run(
        command(*args), host.user_environment({"OPENMICROVM_ENDPOINT": server.url}), timeout=timeout
    )


def test_a_user_other_than_root_deploys_and_runs_through_the_cli(
    root_server: tuple[ServerProcess, Host],
) -> None:
    server, host = root_server
    name = f"nonroot-{uuid.uuid4().hex[:8]}"
    deployed = user_cli(
        server,
        host,
        *("deploy", str(SAMPLE_APP), "--name", name, "--hooks", json.dumps(SAMPLE_HOOKS)),
        "--output",
        "json",
        timeout=BUILD_TIMEOUT,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    report = json.loads(deployed.stdout)
    assert report["imageState"] == "CREATED" and report["versionState"] == "SUCCESSFUL", report
    zip_path = path_of(report["codeArtifact"]["uri"])
    assert zip_path.parent == host.uploads and PRIVATE_ZIP.fullmatch(zip_path.name)
    # Its build has ended, so the one-off copy is gone: the upload directory does not grow.
    assert list(host.uploads.iterdir()) == []

    client = server.client()
    microvms: list[str] = []
    try:
        listed = user_cli(server, host, "images", "--output", "json")
        assert listed.returncode == 0, listed.stderr
        assert any(image["name"] == name for image in json.loads(listed.stdout))
        versions = user_cli(server, host, "versions", name)
        assert versions.returncode == 0 and "SUCCESSFUL" in versions.stdout, versions.stderr

        run = user_cli(server, host, "run", name, "--payload", "from nobody", "--shell")
        assert run.returncode == 0, run.stderr
        microvm_id, state = run.stdout.splitlines()[0].split()
        microvms.append(microvm_id)
        assert state == "RUNNING"
        ps = user_cli(server, host, "ps")
        assert ps.returncode == 0 and microvm_id in ps.stdout, ps.stderr
        answer = user_cli(server, host, "curl", microvm_id, "/")
        assert answer.returncode == 0, answer.stderr
        app = json.loads(answer.stdout)
        assert (app["microvmId"], app["payload"]) == (microvm_id, "from nobody"), app
        for verb, expected in (("suspend", "SUSPENDED"), ("resume", "RUNNING"), ("terminate", "TERMINATED")):
            done = user_cli(server, host, verb, microvm_id)
            assert done.returncode == 0 and done.stdout.split() == [microvm_id, expected], done.stderr
        logs = user_cli(server, host, "logs", microvm_id)
        assert logs.returncode == 0 and "state: TERMINATED" in logs.stdout, logs.stderr
        # The local verbs that read the server's data dir say what to do rather than crash.
        doctor = user_cli(server, host, "doctor", "--data-dir", str(host.data_dir))
        assert "Traceback" not in doctor.stderr, doctor.stderr
        assert "not readable by this user" in doctor.stdout, doctor.stdout
        ca = user_cli(server, host, "tls", "ca", "--data-dir", str(host.data_dir))
        assert ca.returncode == 1 and "ask the server's administrator" in ca.stderr, ca.stderr
    finally:
        terminate_all(client, microvms)


def test_a_deploy_leaves_its_upload_only_while_a_build_may_still_read_it(
    root_server: tuple[ServerProcess, Host],
) -> None:
    """A refused request removes the one-off zip at once; --no-wait leaves it to the build, which
    reads it after the CLI has exited."""
    server, host = root_server
    name = f"nowait-{uuid.uuid4().hex[:8]}"
    refused = user_cli(server, host, "deploy", str(SAMPLE_APP), "--name", name, "--memory", "999")
    assert refused.returncode != 0 and "999 MiB is not supported" in refused.stderr, refused.stderr
    assert list(host.uploads.iterdir()) == []
    queued = user_cli(
        server, host, "deploy", str(SAMPLE_APP), "--name", name, "--no-wait", "--output", "json"
    )
    assert queued.returncode == 0, queued.stderr
    (left,) = host.uploads.iterdir()
    assert PRIVATE_ZIP.fullmatch(left.name)
    arn = json.loads(queued.stdout)["imageArn"]
    assert wait_image_settled(server.client(), arn, timeout=BUILD_TIMEOUT)["state"] == "CREATED"


def test_a_hard_link_in_the_uploads_fails_the_build_with_access_denied(
    root_server: tuple[ServerProcess, Host],
) -> None:
    """What a user could do where fs.protected_hardlinks is off (root stands in for them, the
    kernel lets root link anything): give a second name in the upload directory to a file only
    root may read. The build fails as for an S3 object the build role may not read."""
    server, host = root_server
    private = host.uploads.parent / "private"
    private.mkdir(mode=0o700)
    secret = private / "secret.zip"
    secret.write_bytes(zip_dir(SAMPLE_APP))
    secret.chmod(0o600)
    linked = host.uploads / "linked.zip"
    os.link(secret, linked)
    symlinked = host.uploads / "symlinked.zip"
    symlinked.symlink_to(secret)
    client = server.client()
    for path, why in ((linked, "more than one hard link"), (symlinked, "it is a symlink")):
        name = f"link-{uuid.uuid4().hex[:8]}"
        arn = client.create_microvm_image(**image_request(name, path.as_uri()))["imageArn"]
        assert wait_image_settled(client, arn, timeout=120)["state"] == "CREATE_FAILED"
        reason = build_failure(client, arn)
        assert reason.startswith("S3_ACCESS_DENIED: "), reason
        assert why in reason and "artifact_file_roots" in reason, reason
        assert str(private) not in reason

"""The CLI's answers to mistakes: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

from tests.cli.helpers import REPO, cli, cli_environment, command
from tests.support.server import ServerProcess, free_port


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_an_unknown_image_name_is_named_in_the_error(server: ServerProcess, tmp_path: Path) -> None:
    name = f"no-such-image-{uuid.uuid4().hex[:8]}"
    for verb in (["versions", name], ["run", name]):
        result = cli(server.url, tmp_path, *verb)
        assert result.returncode == 1, result
        assert f"no image named {name!r}" in result.stderr
        _no_traceback(result)


def test_deploy_without_a_dockerfile_says_so(server: ServerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "app.py").write_text("print('hello')\n")
    result = cli(server.url, tmp_path, "deploy", str(folder), "--name", "no-dockerfile")
    assert result.returncode == 2
    assert "no Dockerfile in" in result.stderr
    _no_traceback(result)
    missing = cli(server.url, tmp_path, "deploy", str(tmp_path / "nowhere"), "--name", "x")
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_listings_parse_as_json(server: ServerProcess, tmp_path: Path) -> None:
    for verb in (["images"], ["ps"], ["ps", "--all"]):
        result = cli(server.url, tmp_path, *verb, "--output", "json")
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), list)


def test_logs_of_an_unknown_id(server: ServerProcess, tmp_path: Path) -> None:
    microvm = cli(server.url, tmp_path, "logs", f"microvm-{uuid.uuid4()}")
    assert microvm.returncode == 1 and "no MicroVM with id" in microvm.stderr
    build = cli(server.url, tmp_path, "logs", str(uuid.uuid4()))
    assert build.returncode == 1 and "no build with id" in build.stderr
    _no_traceback(build)


def test_a_server_that_is_not_there(tmp_path: Path) -> None:
    result = cli(f"http://127.0.0.1:{free_port()}", tmp_path, "ps")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "openmicrovm serve" in result.stderr
    _no_traceback(result)


def test_bad_flags_are_refused_before_anything_is_sent(server: ServerProcess, tmp_path: Path) -> None:
    auto_resume = cli(server.url, tmp_path, "run", "some-image", "--auto-resume")
    assert auto_resume.returncode == 2 and "--idle" in auto_resume.stderr
    logging = cli(
        server.url,
        tmp_path,
        "run",
        "arn:aws:lambda:us-east-1:000000000000:microvm-image:x",
        "--logging",
        "syslog",
    )
    assert logging.returncode == 2 and "--logging must be" in logging.stderr
    env = cli(
        server.url,
        tmp_path,
        "deploy",
        str(REPO / "examples" / "sample-app"),
        "--name",
        "x",
        "--env",
        "NOVALUE",
    )
    assert env.returncode == 2 and "NAME=VALUE" in env.stderr


def test_doctor_says_what_to_install(tmp_path: Path) -> None:
    """A PATH without buildah: doctor fails and names the package to install."""
    path = tmp_path / "bin"
    path.mkdir()
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name != "buildah" and not (path / name).exists():
                (path / name).symlink_to(os.path.join(folder, name))
    env = cli_environment(f"http://127.0.0.1:{free_port()}", tmp_path, {"PATH": str(path)})
    result = subprocess.run(command("doctor"), env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout
    assert "apt-get install buildah" in result.stdout
    assert "not reachable" in result.stdout  # reported, with how to start it
    as_json = subprocess.run(
        command("doctor", "--output", "json"), env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["install"] == "apt-get install buildah"
    buildah = next(check for check in report["checks"] if check["name"] == "buildah")
    assert buildah["status"] == "FAIL" and buildah["install"] == ["buildah"]
    # The build jail is started for real (it needs no buildah to run `true`).
    jail = next(check for check in report["checks"] if check["name"] == "build jail")
    assert jail["status"] == "ok" and "user namespace" in jail["detail"], jail

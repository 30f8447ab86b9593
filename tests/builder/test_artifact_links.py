"""file:// artifacts in a shared upload directory (mode 1733, deploy/openmicrovm.service): a second
name for another file, made with a hard link or a symlink, must not get that file read by the
server (root) and built into an image, whoever may read the file itself."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from openmicrovm.builder.artifact import fetch_artifact
from openmicrovm.builder.errors import S3_ACCESS_DENIED, BuildFailed

ZIP_BYTES = b"PK\x05\x06" + bytes(18)  # an empty zip: fetching does not look inside


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    directory = tmp_path / "uploads"
    directory.mkdir()
    directory.chmod(0o1733)
    return directory


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file only root may read, on the same file system as the uploads (a hard link needs that)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "secret.zip"
    path.write_bytes(ZIP_BYTES)
    path.chmod(0o600)
    return path


def fetch(path: Path, tmp_path: Path, roots: list[Path]) -> int:
    destination = tmp_path / "build" / "artifact.zip"
    return asyncio.run(
        fetch_artifact(path.as_uri(), destination, region="us-east-1", max_bytes=1 << 20, file_roots=roots)
    )


def refusal(path: Path, tmp_path: Path, roots: list[Path]) -> str:
    with pytest.raises(BuildFailed) as caught:
        fetch(path, tmp_path, roots)
    error = caught.value
    assert error.code == S3_ACCESS_DENIED, error.state_reason
    # The same words as every other file:// refusal: what is allowed, and what to do.
    assert "artifact_file_roots" in error.state_reason and "s3:// URI" in error.state_reason
    assert not (tmp_path / "build" / "artifact.zip").exists()
    return error.state_reason


def test_a_hard_link_to_a_file_elsewhere_is_refused(tmp_path: Path, uploads: Path, secret: Path) -> None:
    # Root may link any file (fs.protected_hardlinks stops others only where it is on): this is
    # what a user could do on a host where it is off.
    link = uploads / "app.zip"
    os.link(secret, link)
    reason = refusal(link, tmp_path, [uploads])
    assert "more than one hard link" in reason, reason
    assert str(secret.parent) not in reason


def test_two_names_inside_the_uploads_are_refused_too(tmp_path: Path, uploads: Path) -> None:
    """Which name came first cannot be told, so no file with two names is read; once one of
    them is gone the file is an ordinary upload again."""
    first = uploads / "first.zip"
    first.write_bytes(ZIP_BYTES)
    os.link(first, uploads / "second.zip")
    assert "more than one hard link" in refusal(first, tmp_path, [uploads])
    (uploads / "second.zip").unlink()
    assert fetch(first, tmp_path, [uploads]) == len(ZIP_BYTES)


def test_a_symlink_in_the_uploads_is_refused(tmp_path: Path, uploads: Path, secret: Path) -> None:
    link = uploads / "app.zip"
    link.symlink_to(secret)
    assert "it is a symlink" in refusal(link, tmp_path, [uploads])
    # Even to a file inside the allowed directories: the file read must be the one named.
    inside = uploads / "real.zip"
    inside.write_bytes(ZIP_BYTES)
    alias = uploads / "alias.zip"
    alias.symlink_to(inside)
    assert "it is a symlink" in refusal(alias, tmp_path, [uploads])


def test_an_ordinary_upload_of_another_user_is_read(tmp_path: Path, uploads: Path) -> None:
    # What `openmicrovm deploy` leaves there: one name, mode 0600, owned by the user; root reads it.
    upload = uploads / "sample-0123456789abcdef0123456789abcdef.zip"
    upload.write_bytes(ZIP_BYTES)
    upload.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(upload, 65534, 65534)
    assert fetch(upload, tmp_path, [uploads]) == len(ZIP_BYTES)

"""A folder with a Dockerfile → a code artifact zip → somewhere the server can fetch it from.

The zip is reproducible (sorted entries, fixed dates), so deploying an unchanged folder stores
the same bytes under the same content-addressed name. It goes to S3 when a bucket is given,
else to a local folder whose file:// URI the server, running on the same machine, may read: one
of its setting artifact_file_roots (by default <data dir>/artifacts).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from openmicrovm.cli.connection import CliError
from openmicrovm.config import load_settings

_SKIPPED_DIRECTORIES = {".git", ".hg", ".svn"}
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def _files(folder: Path) -> list[Path]:
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES)
        for name in sorted(names):
            path = Path(directory, name)
            if path.is_file():  # follows symlinks; dangling ones and sockets are left out
                found.append(path)
    return found


def check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder", 2)
    if not (folder / "Dockerfile").is_file():
        raise CliError(
            f"no Dockerfile in {folder}: the build runs the Dockerfile at the root of the folder you deploy",
            2,
        )


def zip_folder(folder: Path, destination: Path) -> None:
    check_folder(folder)
    try:
        with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in _files(folder):
                entry = zipfile.ZipInfo(path.relative_to(folder).as_posix(), _FIXED_DATE)
                entry.compress_type = zipfile.ZIP_DEFLATED
                # Keep the execute bit: entrypoint scripts must stay runnable.
                mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
                entry.external_attr = (stat.S_IFREG | mode) << 16
                archive.writestr(entry, path.read_bytes())
    except OSError as error:
        raise CliError(f"cannot pack {folder}: {error}", 2) from None


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_dir(explicit: Path | None) -> Path:
    """--artifact-dir, $OPENMICROVM_ARTIFACT_DIR, else the first directory the server reads file://
    artifacts from: the setting artifact_file_roots, by default <data dir>/artifacts (read the same
    way the server reads them: $OPENMICROVM_CONFIG, <data dir>/settings.toml, the environment)."""
    if explicit is not None:
        return explicit
    if os.environ.get("OPENMICROVM_ARTIFACT_DIR"):
        return Path(os.environ["OPENMICROVM_ARTIFACT_DIR"])
    try:
        settings = load_settings()
    except ValueError as error:
        raise CliError(f"cannot read the server's settings to find its artifact dir: {error}", 2) from None
    if settings.artifact_file_roots:
        return settings.artifact_file_roots[0]  # configured on purpose: deploy may create it
    data_dir = settings.data_dir
    if data_dir.is_dir() and os.access(data_dir, os.W_OK):
        return data_dir / "artifacts"
    # No temp-dir fallback: the server would refuse a zip from there (and /tmp is shared).
    raise CliError(
        f"no server data dir at {data_dir}, so there is no artifact dir the server reads zips from. "
        "Start `openmicrovm serve` first (or set OPENMICROVM_DATA_DIR to its data dir), or pass "
        "--artifact-dir DIR and add DIR to the server's setting artifact_file_roots "
        "(OPENMICROVM_ARTIFACT_FILE_ROOTS), or deploy through S3 with --bucket.",
        2,
    )


def package(folder: Path, name: str, bucket: str | None, s3: Any | None, local_dir: Path | None) -> str:
    """Zip `folder` and store it; the codeArtifact URI to build from."""
    with tempfile.TemporaryDirectory(prefix="openmicrovm-deploy-") as scratch:
        archive = Path(scratch) / "artifact.zip"
        zip_folder(folder, archive)
        file_name = f"{name}-{_digest(archive)[:16]}.zip"
        if bucket is not None:
            assert s3 is not None
            key = f"openmicrovm/{name}/{file_name}"
            try:
                s3.upload_file(str(archive), bucket, key)
            except ClientError as error:
                details = error.response.get("Error", {})
                raise CliError(
                    f"cannot upload to s3://{bucket}/{key}: {details.get('Code')}: {details.get('Message')}"
                ) from None
            return f"s3://{bucket}/{key}"
        target_dir = artifact_dir(local_dir)
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            target = target_dir / file_name
            shutil.copyfile(archive, target)
            target.chmod(0o644)  # the server may run as another user
        except OSError as error:
            raise CliError(
                f"cannot store the artifact in {target_dir}: {error}; try --artifact-dir with a "
                "directory listed in the server's setting artifact_file_roots"
            ) from None
        return f"file://{target.resolve()}"

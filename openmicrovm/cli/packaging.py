"""A folder with a Dockerfile → a code artifact zip → somewhere the server can fetch it from.

The zip is reproducible (sorted entries, fixed dates), so deploying an unchanged folder stores
the same bytes under the same content-addressed name. It goes to S3 when a bucket is given,
else to a local folder whose file:// URI the server, running on the same machine, may read: one
of its setting artifact_file_roots (by default <data dir>/artifacts).

A server run as a system service keeps its data dir to itself, so a user other than root writes
into a shared upload directory among those roots instead (root-owned, mode 1733: anyone may add a
file, nobody but root may list or delete others'). There the zip gets an unguessable name,
created with O_EXCL and mode 0600: another user can neither read it, nor swap it between the
upload and the build, nor plant a file or a symlink under the name beforehand. Such a copy serves
one build only, so `deploy` removes it once that build has ended (its owner may, in a sticky
directory); otherwise the directory would only ever grow.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from openmicrovm.cli.connection import CliError
from openmicrovm.config import load_settings, system_config_file

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


def _writable_dir(path: Path) -> bool:
    """Whether this user can create files in `path`, an existing directory. A directory it may not
    even look at (below a data dir of mode 0700) counts as not writable, not as an error."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False
    return is_dir and os.access(path, os.W_OK | os.X_OK)


def _creatable(path: Path, any_depth: bool) -> bool:
    """Whether `path` is missing and this user could make it: its nearest existing ancestor is
    writable (only its parent when not `any_depth`)."""
    if os.path.lexists(path):
        return False
    ancestor = path.parent
    while any_depth and not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return _writable_dir(ancestor)


def artifact_dir(explicit: Path | None) -> Path:
    """--artifact-dir, $OPENMICROVM_ARTIFACT_DIR, else the first directory the server reads file://
    artifacts from that this user can write into: one of the setting artifact_file_roots, by
    default <data dir>/artifacts (read the way the server reads them: $OPENMICROVM_CONFIG,
    <data dir>/settings.toml, /etc/openmicrovm/openmicrovm.toml, the environment). A missing
    directory is made only when it is the first of them, as the place meant for the CLI's zips."""
    if explicit is not None:
        return explicit
    if os.environ.get("OPENMICROVM_ARTIFACT_DIR"):
        return Path(os.environ["OPENMICROVM_ARTIFACT_DIR"])
    try:
        settings = load_settings()
    except ValueError as error:
        raise CliError(f"cannot read the server's settings to find its artifact dir: {error}", 2) from None
    roots = settings.effective_artifact_file_roots
    # A configured first root may be made with its parents; the default one only inside an
    # existing data dir (a missing data dir means no server has run with it).
    configured = bool(settings.artifact_file_roots)
    for index, root in enumerate(roots):
        if _writable_dir(root) or (index == 0 and _creatable(root, any_depth=configured)):
            return root
    # No temp-dir fallback: the server would refuse a zip from there (and /tmp is shared).
    if not configured and not os.path.lexists(settings.data_dir):
        raise CliError(
            f"no server data dir at {settings.data_dir}, so there is no artifact dir the server reads "
            "zips from. Start `openmicrovm serve` first (or set OPENMICROVM_DATA_DIR to its data dir), "
            "or pass --artifact-dir DIR and add DIR to the server's setting artifact_file_roots "
            "(OPENMICROVM_ARTIFACT_FILE_ROOTS), or deploy through S3 with --bucket.",
            2,
        )
    listed = ", ".join(str(root) for root in roots)
    raise CliError(
        f"this user can write to none of the directories the server reads zips from ({listed}). "
        "A server run as a system service needs a shared upload directory among its "
        "artifact_file_roots (root-owned, mode 1733; README: Run it as a system service) in "
        f"{system_config_file()}, which every user's CLI reads; or pass --artifact-dir DIR for a "
        "directory of those you can write to, or deploy through S3 with --bucket.",
        2,
    )


def _shared(directory: Path) -> bool:
    """Whether others may create files in `directory` too (a shared upload directory): it is
    not this user's own, or its group or everyone may write to it."""
    info = os.stat(directory)
    return info.st_uid != os.geteuid() or bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _file_stem(name: str) -> str:
    """The image name as the start of a file name: the zip is stored before the server sees (and
    validates) the name, so a `/` or a leading dot in it must not lead out of the directory."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "artifact"


def _store_private(archive: Path, directory: Path, name: str) -> Path:
    """Copy the zip into a shared directory under a fresh unguessable name, readable by its owner
    (and root, the server) only. O_EXCL|O_NOFOLLOW: nothing another user put there is reused."""
    target = directory / f"{_file_stem(name)}-{secrets.token_hex(16)}.zip"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    handle = os.open(target, flags, 0o600)
    try:
        with os.fdopen(handle, "wb") as out, open(archive, "rb") as source:
            shutil.copyfileobj(source, out)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


@dataclass(frozen=True)
class StoredArtifact:
    uri: str
    """The codeArtifact URI to build from."""
    one_off: Path | None = None
    """The private copy made in a shared upload directory for this deploy alone, else None."""

    def discard(self) -> None:
        """Remove the one-off copy (its build has ended); anything else stays."""
        if self.one_off is not None:
            with contextlib.suppress(OSError):
                self.one_off.unlink()


def package(
    folder: Path, name: str, bucket: str | None, s3: Any | None, local_dir: Path | None
) -> StoredArtifact:
    """Zip `folder` and store it: in S3, or in a directory the server reads zips from."""
    with tempfile.TemporaryDirectory(prefix="openmicrovm-deploy-") as scratch:
        archive = Path(scratch) / "artifact.zip"
        zip_folder(folder, archive)
        digest = _digest(archive)
        if bucket is not None:
            assert s3 is not None
            key = f"openmicrovm/{name}/{name}-{digest[:16]}.zip"
            try:
                s3.upload_file(str(archive), bucket, key)
            except ClientError as error:
                details = error.response.get("Error", {})
                raise CliError(
                    f"cannot upload to s3://{bucket}/{key}: {details.get('Code')}: {details.get('Message')}"
                ) from None
            return StoredArtifact(f"s3://{bucket}/{key}")
        target_dir = artifact_dir(local_dir)
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            one_off = None
            if _shared(target_dir):
                target = one_off = _store_private(archive, target_dir, name)
            else:
                # This user's own directory: a content-addressed name, so that redeploying an
                # unchanged folder stores nothing new.
                target = target_dir / f"{_file_stem(name)}-{digest[:16]}.zip"
                shutil.copyfile(archive, target)
                target.chmod(0o644)  # the server may run as another user
        except OSError as error:
            raise CliError(
                f"cannot store the artifact in {target_dir}: {error}; try --artifact-dir with a "
                "directory listed in the server's setting artifact_file_roots"
            ) from None
        return StoredArtifact(f"file://{target.resolve()}", one_off)

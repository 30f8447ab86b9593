"""Turning a built image into a plain root filesystem directory: the sandboxes' read-only lower layer.

A straight copy of a 225 MB Debian tree costs about 5 s of disk writes per version here. Instead,
every regular file is hard-linked to the file in buildah's overlay layer that provides it, so a
version costs only its directories plus any file we cannot prove identical; unchanged base
files are shared by all versions and by the build cache. Layer files are never modified in place
(layers are immutable, copy-up writes a new file), and removing an image from the build cache
later leaves our links intact. A file is linked only when the layer file is provably the one the
merged view shows (same inode number, size and mode); otherwise, and on a storage driver without
layers (vfs) or across file systems, it is copied.

Consequence for drivers: the exported tree must be treated as read-only (bind it read-only or use
it as an overlay lower layer); chmod/chown on it would change the build cache too.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from openmicrovm.builder import build_jail
from openmicrovm.builder.buildah import BuildahError, BuildahProcess, BuildahStore
from openmicrovm.builder.cleanup import Aborted, in_thread, run_to_completion

# Overlay's own bookkeeping and host-specific labels do not belong in an image.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "security.selinux")


@dataclass(frozen=True)
class RootfsExport:
    path: Path
    size_bytes: int  # apparent size: regular files counted once per inode, plus symlinks
    files: int
    linked_files: int  # shared with the build cache
    copied_files: int


def _unescape_mountinfo(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as 3-digit octal escapes.
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def overlay_layers(
    mount_point: Path,
    storage_root: Path,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    jail_storage: str = "",
) -> list[Path]:
    """The upper and lower directories of the overlay mounted at `mount_point`, top first, as host
    paths; empty when it is not an overlay mount (vfs) or cannot be read. With `jail_storage`, the
    mount is one seen in `mountinfo` of a build jail, where `storage_root` appears at that path."""
    wanted = str(mount_point) if jail_storage else os.path.realpath(mount_point)
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    for line in reversed(lines):  # the latest mount on that point is the visible one
        fields = line.split(" ")
        if len(fields) < 10 or _unescape_mountinfo(fields[4]) != wanted:
            continue
        separator = fields.index("-")
        if fields[separator + 1] != "overlay":
            return []
        options = _unescape_mountinfo(fields[separator + 3]).split(",")
        upper = [value.partition("=")[2] for value in options if value.startswith("upperdir=")]
        lower = [value.partition("=")[2] for value in options if value.startswith("lowerdir=")]
        entries = [*upper, *(lower[0].split(":") if lower else [])]
        if jail_storage:
            entries = [_host_path(entry, jail_storage, storage_root) for entry in entries]
        # containers/storage mounts with paths relative to <root>/overlay when they get long.
        return [Path(os.path.realpath(storage_root / "overlay" / entry)) for entry in entries if entry]
    return []


def _host_path(entry: str, jail_storage: str, storage_root: Path) -> str:
    if entry == jail_storage or entry.startswith(jail_storage + "/"):
        return str(storage_root) + entry[len(jail_storage) :]
    return entry


@dataclass
class _Counts:
    size: int = 0
    files: int = 0
    linked: int = 0
    copied: int = 0


class _Materialiser:
    # Plain strings rather than Path objects: pathlib's parsing was a third of the run time.
    def __init__(self, source: Path, destination: Path, layers: list[Path]) -> None:
        self.source = str(source)
        self.destination = str(destination)
        self.layers = [str(layer) for layer in layers]
        self.can_link = bool(layers)
        self.seen: dict[int, str] = {}  # source inode -> first destination path (hard links)
        self.counts = _Counts()
        # Set from the event loop when the build is cancelled; checked once per directory.
        self.abort = threading.Event()

    def _provider(self, relative: str, source_stat: os.stat_result) -> str | None:
        for layer in self.layers:
            candidate = os.path.join(layer, relative)
            try:
                found = os.lstat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            # The topmost layer holding the name provides it; link only if it is provably that file.
            same = (
                stat.S_ISREG(found.st_mode)
                and found.st_ino == source_stat.st_ino
                and found.st_size == source_stat.st_size
                and found.st_mode == source_stat.st_mode
            )
            return candidate if same else None
        return None

    def _copy_regular(self, source: str, target: str, source_stat: os.stat_result) -> None:
        shutil.copyfile(source, target, follow_symlinks=False)
        os.chown(target, source_stat.st_uid, source_stat.st_gid)
        _copy_xattrs(source, target)
        os.chmod(target, stat.S_IMODE(source_stat.st_mode))  # after chown, which clears setuid
        os.utime(target, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))

    def _regular(self, source: str, target: str, relative: str, source_stat: os.stat_result) -> None:
        self.counts.files += 1
        earlier = self.seen.get(source_stat.st_ino)
        if earlier is not None:
            os.link(earlier, target)
            return
        self.seen[source_stat.st_ino] = target
        self.counts.size += source_stat.st_size
        provider = self._provider(relative, source_stat) if self.can_link else None
        if provider is not None:
            try:
                os.link(provider, target)
                self.counts.linked += 1
                return
            except OSError as error:
                if error.errno == errno.EXDEV:
                    self.can_link = False  # output on another file system: copy from now on
                elif error.errno not in (errno.EMLINK, errno.EPERM):
                    raise
        self._copy_regular(source, target, source_stat)
        self.counts.copied += 1

    def _special(self, source: str, target: str, source_stat: os.stat_result) -> None:
        mode = source_stat.st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(source), target)
            self.counts.size += source_stat.st_size
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(target, mode, source_stat.st_rdev)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(target, stat.S_IMODE(mode))
        else:
            return  # sockets are runtime objects, not image content
        os.chown(target, source_stat.st_uid, source_stat.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(target, stat.S_IMODE(mode))
        os.utime(target, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns), follow_symlinks=False)

    def run(self) -> _Counts:
        directories: list[tuple[str, str, os.stat_result]] = []
        os.mkdir(self.destination, 0o700)
        directories.append((self.source, self.destination, os.lstat(self.source)))
        pending = [("", self.source, self.destination)]
        while pending:
            if self.abort.is_set():
                raise Aborted("root filesystem export cancelled")
            relative_dir, source_dir, target_dir = pending.pop()
            with os.scandir(source_dir) as entries:
                for entry in entries:
                    source = entry.path
                    target = os.path.join(target_dir, entry.name)
                    relative = f"{relative_dir}{entry.name}"
                    entry_stat = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(entry_stat.st_mode):
                        os.mkdir(target, 0o700)
                        directories.append((source, target, entry_stat))
                        pending.append((f"{relative}/", source, target))
                    elif stat.S_ISREG(entry_stat.st_mode):
                        self._regular(source, target, relative, entry_stat)
                    else:
                        self._special(source, target, entry_stat)
        # Directory metadata last, deepest first, so creating children does not change it again.
        for source, target, directory_stat in reversed(directories):
            os.chown(target, directory_stat.st_uid, directory_stat.st_gid)
            _copy_xattrs(source, target)
            os.chmod(target, stat.S_IMODE(directory_stat.st_mode))
            os.utime(target, ns=(directory_stat.st_atime_ns, directory_stat.st_mtime_ns))
        return self.counts


def _copy_xattrs(source: str, target: str) -> None:
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        try:
            os.setxattr(target, name, os.getxattr(source, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as error:
            if error.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def materialise_rootfs(
    source: Path, destination: Path, layers: list[Path], abort: threading.Event | None = None
) -> RootfsExport:
    """Recreate the tree at `source` (an image mount) at `destination` (must not exist)."""
    materialiser = _Materialiser(source, destination, layers)
    if abort is not None:
        materialiser.abort = abort
    counts = materialiser.run()
    return RootfsExport(destination, counts.size, counts.files, counts.linked, counts.copied)


# Runs in the build jail: mounts the image and holds the mount (which lives in the jail's mount
# namespace) until told to let go on stdin, while the host reads it through /proc/<pid>/root.
_EXPORT_SCRIPT = """\
set -e
buildah rm "$1" >/dev/null 2>&1 || true
buildah from --pull=false --name "$1" "$2" >/dev/null
trap 'buildah rm "$1" >/dev/null 2>&1 || true' EXIT
echo "mounted $(buildah mount "$1")"
read -r _done || true
"""
_MOUNTED = "mounted "


async def _held_mount(process: asyncio.subprocess.Process) -> str:
    """The jail path of the image mount the export script printed; BuildahError if it failed."""
    assert process.stdout is not None
    lines: list[str] = []
    while line := (await process.stdout.readline()).decode(errors="replace"):
        if line.startswith(_MOUNTED):
            return line[len(_MOUNTED) :].strip()
        lines.append(line.rstrip("\n"))
    await process.wait()
    raise BuildahError(f"could not mount the built image: {' '.join(lines[-5:])}", lines)


async def export_rootfs(
    store: BuildahStore, image_id: str, destination: Path, container_name: str
) -> RootfsExport:
    """Write the root filesystem of `image_id` to `destination` (replaced if it exists). Files keep
    their owners as the build jail made them (openmicrovm.idmap)."""
    partial = destination.with_name(destination.name + ".partial")
    await asyncio.to_thread(shutil.rmtree, partial, True)
    process = await asyncio.create_subprocess_exec(
        *store.shell_command(_EXPORT_SCRIPT, container_name, image_id),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    holder = BuildahProcess(process)
    try:
        jail_mount = await _held_mount(process)
        jail_pid = holder.jail_init_pid()
        if jail_pid is None:
            raise BuildahError(f"the build jail holding {image_id} ended early")
        mount_point = Path(f"/proc/{jail_pid}/root{jail_mount}")
        layers = overlay_layers(
            Path(jail_mount), store.root, Path(f"/proc/{jail_pid}/mountinfo"), build_jail.STORAGE
        )
        try:
            # in_thread lets a cancelled export finish its current directory before the image is
            # unmounted under it and its output removed.
            export = await in_thread(lambda abort: materialise_rootfs(mount_point, partial, layers, abort))
        except BaseException:
            await run_to_completion(asyncio.to_thread(shutil.rmtree, partial, True))
            raise
        assert process.stdin is not None
        process.stdin.write(b"done\n")
        await process.stdin.drain()
        await process.wait()
    finally:
        await run_to_completion(holder.stop())
    await asyncio.to_thread(shutil.rmtree, destination, True)
    partial.rename(destination)
    return RootfsExport(
        destination, export.size_bytes, export.files, export.linked_files, export.copied_files
    )

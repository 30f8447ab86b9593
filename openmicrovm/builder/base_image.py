"""The managed container base image, imported once into our buildah storage.

AWS's documented Dockerfiles start `FROM public.ecr.aws/lambda/microvms:al2023-minimal`. No registry
is needed for that here: the Debian root filesystem of `base_rootfs` is imported as a local image
and tagged under that public name too, and a local image under a name is used without a pull.
It is honest about what it is: Debian bookworm with `python3` (3.11), not Amazon Linux with
python3.12; `CMD ["python3", "app.py"]` works on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from openmicrovm.builder.base_rootfs import ROOTFS_NAME, ensure_base_rootfs_async
from openmicrovm.builder.buildah import BuildahError, BuildahStore, run_buildah, run_in_jail

PUBLIC_BASE_IMAGE = "public.ecr.aws/lambda/microvms:al2023-minimal"
INTERNAL_BASE_IMAGE = "localhost/openmicrovm/base:debian-bookworm-python3"
BASE_LABEL = "org.openmicrovm.base-rootfs"
_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[str], None]


async def _image_label(store: BuildahStore, image: str) -> str | None:
    """The base-rootfs label of `image`, or None when the image is not in the store."""
    result = await run_buildah(
        store,
        [
            "inspect",
            "--type",
            "image",
            "--format",
            f'{{{{index .OCIv1.Config.Labels "{BASE_LABEL}"}}}}',
            image,
        ],
    )
    return result.text.strip() if result.returncode == 0 else None


async def _is_current(store: BuildahStore) -> bool:
    labels = await asyncio.gather(
        _image_label(store, INTERNAL_BASE_IMAGE), _image_label(store, PUBLIC_BASE_IMAGE)
    )
    return all(label == ROOTFS_NAME for label in labels)


async def _checked(store: BuildahStore, args: list[str], what: str) -> str:
    result = await run_buildah(store, args)
    if result.returncode != 0:
        raise BuildahError(f"{what} failed: {result.text}", result.tail)
    return result.text.strip()


# Runs in the build jail, the base root filesystem arriving as a tar stream on stdin: unpacked there
# by the jail's root, its files belong to the mapped ids like every layer a build makes. Device
# nodes are left out (the jail cannot make them, and sandboxes get their own /dev).
_IMPORT_SCRIPT = """\
set -e
buildah rm "$1" >/dev/null 2>&1 || true
buildah from --name "$1" scratch >/dev/null
trap 'buildah rm "$1" >/dev/null 2>&1 || true' EXIT
mount_point=$(buildah mount "$1")
tar -x -p --numeric-owner --xattrs --xattrs-include='*' -C "$mount_point" -f -
buildah config --env "$2" --cmd /bin/bash --label "$3" "$1"
buildah commit --format docker --quiet "$1" "$4"
"""


async def _import(store: BuildahStore, rootfs: Path, progress: Progress) -> None:
    name = f"openmicrovm-base-import-{os.getpid()}"
    progress(f"copying the base root filesystem ({rootfs}) into the build storage")
    read_end, write_end = os.pipe()
    try:
        packer = await asyncio.create_subprocess_exec(
            "tar", "-c", "-C", str(rootfs), "--numeric-owner", "--xattrs", "--xattrs-include=*",
            "--no-wildcards-match-slash", "--exclude=./dev/*", "-f", "-", ".",
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        os.close(write_end)
        write_end = -1
        script = store.shell_command(_IMPORT_SCRIPT, name, _DEFAULT_PATH, f"{BASE_LABEL}={ROOTFS_NAME}",
                                     INTERNAL_BASE_IMAGE)  # fmt: skip
        result = await run_in_jail(script, stdin=read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    _, packer_errors = await packer.communicate()
    # The jail's failure first: it also makes tar fail, with a mere broken pipe.
    if result.returncode != 0:
        raise BuildahError(f"importing the base image failed: {result.text}", result.tail)
    if packer.returncode != 0:
        raise BuildahError(
            f"reading the base root filesystem failed: {packer_errors.decode(errors='replace')}"
        )


async def ensure_base_image(
    store: BuildahStore, cache_dir: Path, progress: Progress | None = None, mirror: str = ""
) -> None:
    """Make sure both base image names exist in `store`; imports the base rootfs the first time
    (about 10 s, plus about a minute for debootstrap from `mirror` if the rootfs is not cached
    either; base_rootfs.ensure_base_rootfs)."""
    report = progress or (lambda _message: None)
    if await _is_current(store):
        return
    lock_path = store.root.parent / "base-image.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        # A separate open file per caller, so the lock also serialises builds within one process.
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        try:
            if await _is_current(store):
                return
            if await _image_label(store, INTERNAL_BASE_IMAGE) != ROOTFS_NAME:
                report("importing the managed base image into the build storage (once per cache)")
                loop = asyncio.get_running_loop()
                # debootstrap reports from a worker thread; hand its lines to the loop's thread.
                rootfs = await ensure_base_rootfs_async(
                    cache_dir, lambda line: loop.call_soon_threadsafe(report, line), mirror
                )
                await _import(store, rootfs, report)
            await _checked(store, ["tag", INTERNAL_BASE_IMAGE, PUBLIC_BASE_IMAGE], "tagging the base image")
            report(f"base image ready as {PUBLIC_BASE_IMAGE}")
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)

"""Real buildah builds in the session's own storage: instructions, config, failures, cache, cleanup."""

from __future__ import annotations

import asyncio
import io
import os
import random
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.builder.buildah import BuildahStore
from openmicrovm.builder.container_build import build_image
from openmicrovm.builder.errors import CONTAINER_BUILD_FAILED, BuildFailed
from openmicrovm.builder.image_config import ImageConfig, read_image_config
from openmicrovm.builder.rootfs_export import RootfsExport, export_rootfs
from openmicrovm.idmap import ID_BASE
from tests.builder.conftest import assert_store_clean
from tests.builder.fake_internet import fake_internet
from tests.support.host import processes_naming
from tests.support.images import SAMPLE_APP

EVERY_INSTRUCTION = """\
ARG BASE=public.ecr.aws/lambda/microvms:al2023-minimal
FROM ${BASE} AS builder
ARG GREETING=hello
RUN mkdir -p /out && echo "$GREETING from builder" > /out/greeting.txt

FROM ${BASE}
ARG VERSION=1.2.3
LABEL org.example.version="${VERSION}" org.example.team="builders"
ENV APP_HOME=/srv/app MODE=test
SHELL ["/bin/bash", "-c"]
WORKDIR $APP_HOME
COPY app.py ./
COPY --from=builder /out/greeting.txt ./greeting.txt
ADD data.tar ./unpacked/
ADD notes.txt /srv/notes.txt
RUN useradd --system --uid 1234 --home-dir /srv/app appuser \\
    && echo "shell=$0 mode=$MODE" > /srv/app/shell.txt \\
    && chown -R appuser /srv/app
USER appuser
EXPOSE 9000 8080/tcp
ENTRYPOINT ["python3", "app.py"]
CMD ["--port", "8080"]
"""


def make_context(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def tar_with(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def build(store: BuildahStore, context: Path, log: list[str] | None = None, **options: float) -> str:
    lines = log if log is not None else []
    return asyncio.run(build_image(store, context, context.parent / "iid", lines.append, **options))


def config_and_rootfs(store: BuildahStore, image_id: str, context: Path) -> tuple[ImageConfig, RootfsExport]:
    async def read() -> tuple[ImageConfig, RootfsExport]:
        config = await read_image_config(store, image_id, (context / "Dockerfile").read_text())
        export = await export_rootfs(
            store, image_id, context.parent / "rootfs", f"test-export-{uuid.uuid4().hex[:8]}"
        )
        return config, export

    return asyncio.run(read())


def test_every_instruction_builds_and_the_config_reads_back(store: BuildahStore, tmp_path: Path) -> None:
    context = make_context(
        tmp_path / "context",
        {
            "Dockerfile": EVERY_INSTRUCTION,
            "app.py": "print('app')\n",
            "data.tar": tar_with("inner.txt", b"from the tar"),
            "notes.txt": "notes",
        },
    )
    log: list[str] = []
    image_id = build(store, context, log)
    config, export = config_and_rootfs(store, image_id, context)

    assert config.argv == ["python3", "app.py", "--port", "8080"]
    assert config.entrypoint == ["python3", "app.py"] and config.cmd == ["--port", "8080"]
    assert config.env["APP_HOME"] == "/srv/app" and config.env["MODE"] == "test" and "PATH" in config.env
    assert "VERSION" not in config.env  # ARG is build-time only
    assert config.workdir == "/srv/app"
    assert config.user == "appuser"
    assert config.exposed_ports == ["9000/tcp", "8080/tcp"] and config.tcp_ports == [9000, 8080]
    assert config.labels["org.example.version"] == "1.2.3" and config.labels["org.example.team"] == "builders"
    assert config.shell == ["/bin/bash", "-c"]

    rootfs = export.path
    assert (rootfs / "srv/app/app.py").read_text() == "print('app')\n"
    assert (rootfs / "srv/app/greeting.txt").read_text() == "hello from builder\n"  # COPY --from
    assert (rootfs / "srv/app/unpacked/inner.txt").read_text() == "from the tar"  # ADD extracts tars
    assert (rootfs / "srv/notes.txt").read_text() == "notes"
    assert (rootfs / "srv/app/shell.txt").read_text() == "shell=/bin/bash mode=test\n"  # SHELL for RUN
    # Built in the jail's user namespace: container uid 1234 is stored as ID_BASE + 1234.
    assert (rootfs / "srv/app/app.py").stat().st_uid == ID_BASE + 1234
    assert "appuser" in (rootfs / "etc/passwd").read_text()
    assert (rootfs / "usr/bin/python3").exists()
    # Unchanged base files are shared with the build cache, not copied.
    assert export.linked_files > 5000, export
    steps = [line for line in log if "STEP " in line]
    assert steps[0] == "[1/2] STEP 1/3: FROM public.ecr.aws/lambda/microvms:al2023-minimal AS builder"
    assert len(steps) == 18, steps
    assert_store_clean(store)


def test_shell_forms_use_the_shell_docker_would(store: BuildahStore, tmp_path: Path) -> None:
    base = "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
    cases = {
        "cmd": (base + 'SHELL ["/bin/bash", "-c"]\nCMD echo $HOME\n', ["/bin/bash", "-c", "echo $HOME"]),
        # A shell-form ENTRYPOINT ignores CMD (it becomes the shell's $0).
        "entrypoint": (
            base + "ENTRYPOINT exec python3 -m http.server\n",
            ["/bin/sh", "-c", "exec python3 -m http.server"],
        ),
        "exec": (
            base + 'SHELL ["/bin/bash", "-c"]\nCMD ["/bin/sh", "-c", "echo hi"]\n',
            ["/bin/sh", "-c", "echo hi"],
        ),
    }
    for name, (dockerfile, argv) in cases.items():
        context = make_context(tmp_path / name / "context", {"Dockerfile": dockerfile})
        image_id = build(store, context)
        config, _ = config_and_rootfs(store, image_id, context)
        assert config.argv == argv, name
    # ENTRYPOINT in the Dockerfile resets the base image's CMD, as in Docker.
    assert config_and_rootfs(
        store,
        build(store, make_context(tmp_path / "reset", {"Dockerfile": base + 'ENTRYPOINT ["python3"]\n'})),
        tmp_path / "reset",
    )[0].argv == ["python3"]


def test_a_failing_run_is_container_build_failed_with_the_last_output_lines(
    store: BuildahStore, tmp_path: Path
) -> None:
    dockerfile = (
        "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
        "RUN echo preparing && echo 'step output before the failure' && exit 3\n"
    )
    context = make_context(tmp_path / "context", {"Dockerfile": dockerfile})
    with pytest.raises(BuildFailed) as caught:
        build(store, context)
    reason = caught.value.state_reason
    assert caught.value.code == CONTAINER_BUILD_FAILED
    assert reason.startswith("CONTAINER_BUILD_FAILED: The container image build failed.")
    assert "step output before the failure" in reason
    assert "exit status 3" in reason
    print(reason)
    assert_store_clean(store)


def test_from_an_unreachable_registry_fails_naming_the_image(store: BuildahStore, tmp_path: Path) -> None:
    image = "registry.openmicrovm-test.invalid/team/app:1.0"
    context = make_context(tmp_path / "context", {"Dockerfile": f"FROM {image}\nRUN true\n"})
    started = time.monotonic()
    with pytest.raises(BuildFailed) as caught:
        build(store, context)
    print(f"unreachable registry failed after {time.monotonic() - started:.1f} s")
    assert caught.value.code == CONTAINER_BUILD_FAILED
    assert caught.value.state_reason.startswith("CONTAINER_BUILD_FAILED: The container image build failed.")
    assert f"Could not get the image {image}" in caught.value.state_reason


@pytest.fixture
def silent_registry() -> Iterator[str]:
    """A registry address that accepts connections and never answers, like a black-holed registry.
    It lives in a namespace standing in for the internet: builds cannot reach the host itself."""
    with fake_internet() as internet:
        yield f"{internet.address}:{internet.silent_port()}"


def test_a_registry_that_never_answers_is_given_up_after_the_pull_timeout(
    store: BuildahStore, tmp_path: Path, silent_registry: str
) -> None:
    image = f"{silent_registry}/team/app:1.0"
    context = make_context(tmp_path / "context", {"Dockerfile": f"FROM {image}\nRUN true\n"})
    with pytest.raises(BuildFailed) as caught:
        build(store, context, pull_timeout=2.0)
    assert caught.value.code == CONTAINER_BUILD_FAILED
    assert f"Could not get the image {image}" in caught.value.state_reason
    assert_store_clean(store)


def test_a_run_step_that_never_ends_is_stopped_at_the_build_time_limit(
    store: BuildahStore, tmp_path: Path
) -> None:
    marker = f"never-ends-{uuid.uuid4().hex[:8]}"
    sleep = f"sleep {random.randrange(1000, 9999)}"  # this test's own, to find what outlives the build
    dockerfile = (
        "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
        # Ignores SIGTERM, as a careless server might: the limit must still hold.
        f"RUN trap '' TERM; echo {marker}; {sleep} & wait; {sleep}\n"
    )
    context = make_context(tmp_path / "context", {"Dockerfile": dockerfile})
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(BuildFailed) as caught:
        build(store, context, lines, build_timeout=4.0)
    assert time.monotonic() - started < 60
    assert marker in lines  # the step did run before it was stopped
    assert caught.value.code == CONTAINER_BUILD_FAILED
    assert "ran longer than the limit of 4 seconds" in caught.value.state_reason
    # The build's PID namespace is being torn down: give the kernel a moment to reap what was in it.
    deadline = time.monotonic() + 15
    while processes_naming(sleep) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(sleep) == {}
    assert_store_clean(store)


def test_output_streams_while_the_build_runs(store: BuildahStore, tmp_path: Path) -> None:
    dockerfile = (
        "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
        f"RUN echo first-marker-{uuid.uuid4().hex[:6]} && sleep 1\n"
        "RUN echo second-marker\n"
    )
    context = make_context(tmp_path / "context", {"Dockerfile": dockerfile})
    iid_file = context.parent / "iid"
    seen_while_running: list[bool] = []

    def on_line(line: str) -> None:
        if line.startswith("first-marker-"):
            # buildah writes the image id only at the very end: no id yet means still building.
            seen_while_running.append(not iid_file.exists())

    asyncio.run(build_image(store, context, iid_file, on_line))
    assert seen_while_running == [True]


def test_a_second_version_on_the_same_base_reuses_the_layer_cache(
    store: BuildahStore, tmp_path: Path
) -> None:
    dockerfile = (
        (SAMPLE_APP / "Dockerfile")
        .read_text()
        .replace(
            "COPY app.py .",
            "RUN python3 -c 'import json, http.server' && echo deps > /deps.txt\nCOPY app.py .",
        )
    )
    timings = []
    logs: list[list[str]] = []
    for version in (1, 2):
        app = (SAMPLE_APP / "app.py").read_text() + f"\n# version {version}\n"
        context = make_context(
            tmp_path / f"v{version}" / "context", {"Dockerfile": dockerfile, "app.py": app}
        )
        log: list[str] = []
        started = time.monotonic()
        build(store, context, log)
        timings.append(time.monotonic() - started)
        logs.append(log)
    print(f"first build {timings[0]:.2f} s, second build (same base, changed app) {timings[1]:.2f} s")
    assert any(line.startswith("--> Using cache") for line in logs[1])


def test_cancelling_a_build_stops_buildah_and_its_run_step(store: BuildahStore, tmp_path: Path) -> None:
    duration = f"57.{uuid.uuid4().int % 10**6:06d}"  # a unique argv to find the RUN process by
    dockerfile = f"FROM public.ecr.aws/lambda/microvms:al2023-minimal\nRUN sleep {duration}\n"
    context = make_context(tmp_path / "context", {"Dockerfile": dockerfile})

    async def start_then_cancel() -> None:
        running = asyncio.Event()

        def on_line(line: str) -> None:
            if line.startswith("STEP 2/2"):
                running.set()

        task = asyncio.ensure_future(build_image(store, context, context.parent / "iid", on_line))
        await asyncio.wait_for(running.wait(), 60)
        await asyncio.sleep(1.0)  # let the RUN step start its process
        assert _processes_with(duration), "the RUN step should be running"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(start_then_cancel())
    assert _processes_with(duration) == []
    assert_store_clean(store)


def _processes_with(argument: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv:
            found.append(int(entry))
    return found

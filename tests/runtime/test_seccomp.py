"""The process driver's seccomp filter, decided call by call by a classic-BPF interpreter.

The interpreter below runs the generated program on a struct seccomp_data, the way the kernel
does, so every decision is checked without loading the filter (the sandbox tests load it for real).
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from openmicrovm.runtime import seccomp
from openmicrovm.runtime.driver import DriverError

ALLOW = seccomp.RET_ALLOW
EPERM = seccomp.RET_ERRNO | errno.EPERM
ENOSYS = seccomp.RET_ERRNO | errno.ENOSYS
X86_64, AARCH64, I386 = 0xC000003E, 0xC00000B7, 0x40000003


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """What the kernel would return for this call (only the opcodes a seccomp filter may use)."""
    full_args = list(args) + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0x1000, *full_args)
    insns = [struct.unpack_from("=HBBI", program, offset) for offset in range(0, len(program), 8)]
    assert len(insns) <= 4096
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x15:  # jeq
            pc += jt if acc == k else jf
        elif code == 0x35:  # jge
            pc += jt if acc >= k else jf
        elif code == 0x45:  # jset
            pc += jt if acc & k else jf
        elif code == 0x06:  # ret
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.fixture(params=["x86_64", "aarch64"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def audit_arch(arch: str) -> int:
    return X86_64 if arch == "x86_64" else AARCH64


def decide(arch: str, name: str, *args: int) -> int:
    return run_filter(seccomp.program(arch), seccomp.SYSCALLS[arch][name], audit_arch(arch), args)


def test_every_denied_call_is_refused_with_eperm(arch: str) -> None:
    numbers = seccomp.SYSCALLS[arch]
    for name in seccomp.DENIED:
        if name in numbers:
            assert decide(arch, name) == EPERM, name


def test_ordinary_calls_are_allowed(arch: str) -> None:
    program = seccomp.program(arch)
    denied = {seccomp.SYSCALLS[arch][name] for name in seccomp.DENIED if name in seccomp.SYSCALLS[arch]}
    special = {seccomp.SYSCALLS[arch][name] for name in ("clone3", "clone", "personality", "socket")}
    allowed = [nr for nr in range(0, 470) if nr not in denied | special]
    assert len(allowed) > 350
    for nr in allowed:
        assert run_filter(program, nr, audit_arch(arch)) == ALLOW, nr


def test_clone_is_allowed_without_namespace_flags_only(arch: str) -> None:
    fork_flags = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD, as glibc's fork
    thread_flags = 0x003D0F00  # pthread_create's
    assert decide(arch, "clone", fork_flags) == ALLOW
    assert decide(arch, "clone", thread_flags) == ALLOW
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert decide(arch, "clone", fork_flags | flag) == EPERM, hex(flag)
    # The high half of the argument is ignored by the kernel, and so by the filter.
    assert decide(arch, "clone", (0xFFFF << 32) | fork_flags) == ALLOW


def test_clone3_says_enosys_so_that_libc_falls_back_to_clone(arch: str) -> None:
    assert decide(arch, "clone3") == ENOSYS


def test_personality_only_takes_dockers_values(arch: str) -> None:
    for value in seccomp.PERSONALITIES:
        assert decide(arch, "personality", value) == ALLOW
    assert decide(arch, "personality", 0x0040000) == EPERM  # ADDR_NO_RANDOMIZE


def test_vsock_sockets_are_refused(arch: str) -> None:
    assert decide(arch, "socket", 2, 1, 0) == ALLOW  # AF_INET
    assert decide(arch, "socket", 1, 1, 0) == ALLOW  # AF_UNIX
    assert decide(arch, "socket", 40, 1, 0) == EPERM  # AF_VSOCK


def test_other_architectures_and_x32_are_refused() -> None:
    program = seccomp.program("x86_64")
    getpid = 39
    assert run_filter(program, getpid, X86_64) == ALLOW
    assert run_filter(program, 20, I386) == EPERM  # getpid through int 0x80
    assert run_filter(program, getpid, AARCH64) == EPERM
    assert run_filter(program, seccomp.X32_SYSCALL_BIT | getpid, X86_64) == EPERM
    assert run_filter(program, seccomp.X32_SYSCALL_BIT | 512, X86_64) == EPERM
    assert run_filter(seccomp.program("aarch64"), 172, 0x40000028) == EPERM  # 32-bit ARM


def test_an_unknown_architecture_is_an_error() -> None:
    with pytest.raises(DriverError, match="no seccomp filter for riscv64"):
        seccomp.program("riscv64")


def _header_numbers(path: Path, prefix: str = "__NR_") -> dict[str, int]:
    numbers: dict[str, int] = {}
    for match in re.finditer(r"#define (__NR3264_|__NR_)(\w+)\s+(\d+)\b", path.read_text()):
        numbers.setdefault(match.group(2), int(match.group(3)))
    return numbers


@pytest.mark.parametrize(
    ("arch", "header"),
    [
        ("x86_64", Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")),
        ("aarch64", Path("/usr/include/asm-generic/unistd.h")),
    ],
)
def test_the_tables_match_the_kernel_headers(arch: str, header: Path) -> None:
    if not header.is_file():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    known = _header_numbers(header)
    checked = 0
    for name, number in seccomp.SYSCALLS[arch].items():
        if name in known:  # calls newer than the headers (open_tree_attr) are not there to compare
            assert known[name] == number, name
            checked += 1
    assert checked >= len(seccomp.SYSCALLS[arch]) - 1
    # Nothing the headers have that the filter names is missing from the table.
    for name in (*seccomp.DENIED, *seccomp.NOT_IMPLEMENTED):
        if name in known:
            assert name in seccomp.SYSCALLS[arch], name

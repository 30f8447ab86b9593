"""The system call filter of the process driver's sandboxes: a classic BPF program for bwrap --seccomp.

The process driver runs apps on the host's kernel, so every system call an app makes is kernel
attack surface. The user namespace already turns most privileged calls into EPERM (capabilities
there are worth nothing in the host's namespace); this filter is the second wall, modelled on
Docker's default profile: it refuses the calls that only exist to administer the machine or that
have a history of kernel bugs reachable from user namespaces (mount APIs, namespaces, keyrings,
BPF, io_uring, userfaultfd, perf, module loading), and every call made through another ABI than
the host's native one (x32, 32-bit compat), whose numbers this filter does not check.

    program()          # the filter for this machine, as bytes for bwrap --seccomp FD

A refused call returns EPERM, as it would without the capability, so programs that probe (`unshare
-U` to test for namespaces, `mount` in an init script) fail politely instead of being killed. clone3
returns ENOSYS instead: its flags are in memory a filter cannot read, and glibc falls back to clone,
whose flags the filter does check.
"""

from __future__ import annotations

import errno
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .driver import DriverError

# <linux/seccomp.h> return values and <linux/audit.h> architectures.
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (little endian).
_NR, _ARCH, _ARG0_LOW = 0, 4, 16

# Classic BPF opcodes (<linux/bpf_common.h>).
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

# What no app needs and a host must not let it do (Docker's default profile refuses each of these,
# most of them unless the container has CAP_SYS_ADMIN, which our apps never have in the host's
# user namespace; io_uring is refused by Docker since 25.0).
DENIED = (
    # mounts and the new mount API: a new view of the filesystem, a way round the sandbox's /
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "mount_setattr",
    # namespaces: a fresh user namespace grants every capability again over what it creates
    "unshare",
    "setns",
    # the kernel itself: modules, kexec, reboot, swap, accounting, kernel log, quotas
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    "vhangup",
    "lookup_dcookie",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    # large kernel attack surface reachable without privilege
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "fanotify_init",
    # file handles open any inode of a filesystem, whatever the mount shows (the "shocker" escape)
    "open_by_handle_at",
    "name_to_handle_at",
    # hardware and the clock: the host's, not the sandbox's
    "iopl",
    "ioperm",
    "modify_ldt",
    "clock_settime",
    "clock_adjtime",
    "settimeofday",
    "adjtimex",
    # other processes' memory placement
    "migrate_pages",
    "move_pages",
)

# Calls answered ENOSYS: callers fall back to a call the filter can judge.
NOT_IMPLEMENTED = ("clone3",)

# clone() flags that make namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
CLONE_NAMESPACE_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
)
# personality() values Docker allows: PER_LINUX, PER_LINUX32, UNAME26 with either, and the query.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# socket() families refused: AF_VSOCK is not network-namespaced; it reaches the hypervisor or host.
SOCKET_FAMILIES_DENIED = (40,)

# The numbers of every call named above, per architecture (x86_64: asm/unistd_64.h; aarch64 uses
# asm-generic/unistd.h). A call an architecture lacks is simply absent.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "acct": 163,
        "add_key": 248,
        "adjtimex": 159,
        "bpf": 321,
        "clock_adjtime": 305,
        "clock_settime": 227,
        "clone": 56,
        "clone3": 435,
        "create_module": 174,
        "delete_module": 176,
        "fanotify_init": 300,
        "finit_module": 313,
        "fsconfig": 431,
        "fsmount": 432,
        "fsopen": 430,
        "fspick": 433,
        "get_kernel_syms": 177,
        "init_module": 175,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "io_uring_setup": 425,
        "ioperm": 173,
        "iopl": 172,
        "kexec_file_load": 320,
        "kexec_load": 246,
        "keyctl": 250,
        "lookup_dcookie": 212,
        "migrate_pages": 256,
        "modify_ldt": 154,
        "mount": 165,
        "mount_setattr": 442,
        "move_mount": 429,
        "move_pages": 279,
        "name_to_handle_at": 303,
        "nfsservctl": 180,
        "open_by_handle_at": 304,
        "open_tree": 428,
        "open_tree_attr": 467,
        "perf_event_open": 298,
        "personality": 135,
        "pivot_root": 155,
        "query_module": 178,
        "quotactl": 179,
        "quotactl_fd": 443,
        "reboot": 169,
        "request_key": 249,
        "setns": 308,
        "settimeofday": 164,
        "socket": 41,
        "swapoff": 168,
        "swapon": 167,
        "syslog": 103,
        "_sysctl": 156,
        "sysfs": 139,
        "umount2": 166,
        "unshare": 272,
        "uselib": 134,
        "userfaultfd": 323,
        "ustat": 136,
        "vhangup": 153,
    },
    "aarch64": {
        "acct": 89,
        "add_key": 217,
        "adjtimex": 171,
        "bpf": 280,
        "clock_adjtime": 266,
        "clock_settime": 112,
        "clone": 220,
        "clone3": 435,
        "delete_module": 106,
        "fanotify_init": 262,
        "finit_module": 273,
        "fsconfig": 431,
        "fsmount": 432,
        "fsopen": 430,
        "fspick": 433,
        "init_module": 105,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "io_uring_setup": 425,
        "kexec_file_load": 294,
        "kexec_load": 104,
        "keyctl": 219,
        "lookup_dcookie": 18,
        "migrate_pages": 238,
        "mount": 40,
        "mount_setattr": 442,
        "move_mount": 429,
        "move_pages": 239,
        "name_to_handle_at": 264,
        "nfsservctl": 42,
        "open_by_handle_at": 265,
        "open_tree": 428,
        "open_tree_attr": 467,
        "perf_event_open": 241,
        "personality": 92,
        "pivot_root": 41,
        "quotactl": 60,
        "quotactl_fd": 443,
        "reboot": 142,
        "request_key": 218,
        "setns": 268,
        "settimeofday": 170,
        "socket": 198,
        "swapoff": 225,
        "swapon": 224,
        "syslog": 116,
        "umount2": 39,
        "unshare": 97,
        "userfaultfd": 282,
        "vhangup": 58,
    },
}


@dataclass(frozen=True)
class _Insn:
    code: int
    k: int
    # Jump targets as labels, resolved by _assemble (conditional jumps only).
    true: str | None = None
    false: str | None = None


def _ret(value: int) -> _Insn:
    return _Insn(_RET_K, value)


def _assemble(items: Iterable[_Insn | str]) -> bytes:
    """struct sock_filter[] from instructions and label strings (a label names the next instruction).
    Conditional jumps are relative and 8-bit: every target here is at most a few instructions ahead."""
    listing: list[_Insn] = []
    labels: dict[str, int] = {}
    for item in items:
        if isinstance(item, str):
            labels[item] = len(listing)
        else:
            listing.append(item)
    out = bytearray()
    for index, insn in enumerate(listing):
        jt = jf = 0
        if insn.true is not None or insn.false is not None:
            jt = labels[insn.true] - index - 1 if insn.true is not None else 0
            jf = labels[insn.false] - index - 1 if insn.false is not None else 0
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise ValueError(f"jump out of range at instruction {index}")
        out += struct.pack("=HBBI", insn.code, jt, jf, insn.k)
    return bytes(out)


def machine() -> str:
    """This host's architecture as the tables name it."""
    name = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def program(arch: str | None = None) -> bytes:
    """The filter for `arch` (default: this machine). Raises DriverError on an architecture the
    tables do not cover: running apps without the filter would be silently weaker."""
    arch = arch or machine()
    if arch not in SYSCALLS:
        raise DriverError(
            f"the process driver has no seccomp filter for {arch} (it knows {', '.join(SYSCALLS)})"
        )
    numbers = SYSCALLS[arch]
    eperm, enosys = _ret(RET_ERRNO | errno.EPERM), _ret(RET_ERRNO | errno.ENOSYS)
    items: list[_Insn | str] = [
        _Insn(_LD_W_ABS, _ARCH),
        _Insn(_JEQ_K, AUDIT_ARCH[arch], true="native", false="deny"),
        "native",
        _Insn(_LD_W_ABS, _NR),
    ]
    if arch == "x86_64":
        # x32 calls are x86_64 calls with bit 30 set: same arch value, other numbers. nr -1 is what
        # a tracer sets to skip a call; it does nothing, so it passes.
        items += [
            _Insn(_JGE_K, X32_SYSCALL_BIT, true="high", false="low"),
            "high",
            _Insn(_JEQ_K, 0xFFFFFFFF, true="allow", false="deny"),
            "low",
        ]
    for index, name in enumerate(name for name in DENIED if name in numbers):
        items += [_Insn(_JEQ_K, numbers[name], true="deny", false=f"d{index}"), f"d{index}"]
    for index, name in enumerate(NOT_IMPLEMENTED):
        items += [_Insn(_JEQ_K, numbers[name], true=f"n{index}", false=f"m{index}"), f"n{index}", enosys]
        items.append(f"m{index}")
    # clone(flags, ...): the flags are the first argument on both architectures.
    items += [
        _Insn(_JEQ_K, numbers["clone"], true="clone", false="not_clone"),
        "clone",
        _Insn(_LD_W_ABS, _ARG0_LOW),
        _Insn(_JSET_K, CLONE_NAMESPACE_FLAGS, true="deny", false="allow"),
        "not_clone",
        _Insn(_JEQ_K, numbers["personality"], true="personality", false="not_personality"),
        "personality",
        _Insn(_LD_W_ABS, _ARG0_LOW),
    ]
    for index, value in enumerate(PERSONALITIES):
        items += [_Insn(_JEQ_K, value, true="allow", false=f"p{index}"), f"p{index}"]
    items += [_ret(RET_ERRNO | errno.EPERM), "not_personality"]
    items += [
        _Insn(_JEQ_K, numbers["socket"], true="socket", false="allow"),
        "socket",
        _Insn(_LD_W_ABS, _ARG0_LOW),
    ]
    for index, family in enumerate(SOCKET_FAMILIES_DENIED):
        items += [_Insn(_JEQ_K, family, true="deny", false=f"s{index}"), f"s{index}"]
    items += ["allow", _ret(RET_ALLOW), "deny", eperm]
    return _assemble(items)

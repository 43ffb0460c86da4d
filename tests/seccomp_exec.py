"""Run a command under a seccomp filter that kills the process on the named system calls.

    python -m tests.seccomp_exec setpriority,sched_setscheduler -- python -m appliance run ...

The kernel's own seccomp (a classic BPF program, installed with prctl after
PR_SET_NO_NEW_PRIVS, then exec) answers each named call with SECCOMP_RET_KILL_PROCESS:
SIGSYS, as systemd's `SystemCallFilter=~@resources` does when no `SystemCallErrorNumber=`
is set. The filter is inherited by every child (the forkserver, the codec workers), so
this is the shipped unit's filter as the daemon's processes meet it, without systemd.
x86_64 and aarch64 only; on another architecture it refuses to run.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

# syscall numbers (from the kernel's unistd tables) of @resources calls the appliance
# could make to change its priority or limits
SYSCALLS = {
    "x86_64": {"setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144,
               "setrlimit": 160, "sched_setaffinity": 203, "ioprio_set": 251,
               "prlimit64": 302, "sched_setattr": 314},
    "aarch64": {"setpriority": 140, "sched_setparam": 118, "sched_setscheduler": 119,
                "setrlimit": 164, "sched_setaffinity": 122, "ioprio_set": 30,
                "prlimit64": 261, "sched_setattr": 274},
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_RET_ALLOW, _RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program(arch: str, names: list[str]) -> bytes:
    """BPF: a foreign architecture is killed; each named call is killed; the rest allowed."""
    numbers = [SYSCALLS[arch][n] for n in names]
    insns = [_insn(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
             _insn(_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
             _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
             _insn(_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    for i, nr in enumerate(numbers):
        to_kill = len(numbers) - i  # the jumps left after this one, then the allow
        insns.append(_insn(_JEQ_K, to_kill, 0, nr))
    insns += [_insn(_RET_K, 0, 0, _RET_ALLOW), _insn(_RET_K, 0, 0, _RET_KILL_PROCESS)]
    return b"".join(insns)


def install(names: list[str]) -> None:
    arch = platform.machine()
    if arch not in SYSCALLS:
        raise SystemExit(f"seccomp_exec: no syscall table for {arch}")
    code = program(arch, names)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m tests.seccomp_exec CALL[,CALL...] -- COMMAND...")
    install(argv[0].split(","))
    os.execvp(argv[2], argv[2:])  # noqa: S606 - the command line given, as given


if __name__ == "__main__":
    main(sys.argv[1:])

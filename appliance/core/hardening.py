"""What the daemon does to its own process so that its memory never lands on disk.

The daemon and its codec workers hold decrypted images and the spool key in memory; a
core dump would write them to disk in the clear (and systemd-coredump would keep it).
`forbid_core_dumps` is called first thing in `Daemon.run`:
- RLIMIT_CORE = 0, soft and hard: no core file from this process, and, because rlimits
  survive exec, none from the forkserver and codec workers it starts either (the unit's
  `LimitCORE=0` says the same; this covers `appliance run` outside systemd);
- PR_SET_DUMPABLE = 0: no core dump even if the limit were raised, and no ptrace or
  /proc/PID/mem by other processes of the same user. The kernel resets this flag at
  exec, so it protects the daemon process itself; the workers rely on the rlimit.

How it fails: each step that the platform refuses (not Linux, a seccomp filter answering
EPERM) is skipped and reported in the returned list, never raised: a box that cannot
harden itself must still receive images. The daemon logs the list.
"""

from __future__ import annotations

import ctypes
import resource
import sys

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> list[str]:
    """Turn core dumps off for this process and its children; the steps that failed."""
    failed = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        failed.append("RLIMIT_CORE")
    if not sys.platform.startswith("linux"):
        return [*failed, "PR_SET_DUMPABLE"]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        failed.append("PR_SET_DUMPABLE")
    return failed

"""The update lock: a reboot into an updated slot waits while an association is being
received or a bundle delivered.

Two files in the state dir and flock(2). Work (an association, a delivery) holds a
shared lock on `update.lock` (its own open file) for as long as it lasts. `work()`
never waits: while an update holds or waits for the exclusive lock, new work is refused
(`UpdatePending`) and the caller treats it as transient (the scanner retries, the
bundle stays queued). `exclusive()` first takes `update.pending` exclusively (from then
on new work is refused, so a busy scanner cannot starve the update), then polls for the
exclusive lock on `update.lock` until its deadline, i.e. until the work in progress has
ended; both stay held until the process exits (the reboot). flock locks belong to the
open file and die with the process: no stale lock survives a crash or the reboot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

FILE_NAME = "update.lock"
PENDING_NAME = "update.pending"


class UpdatePending(Exception):
    """An update holds the lock: it reboots the box as soon as the work in progress ends."""


def path_in(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def pending(path: Path) -> bool:
    """Does an update hold or wait for the lock (so new work would be refused)?"""
    try:
        fd = _open(path.with_name(PENDING_NAME))
    except OSError:
        return False
    try:
        return not _try(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


@contextlib.contextmanager
def work(path: Path) -> Iterator[None]:
    """Hold a shared lock while the body runs; UpdatePending at once if an update holds
    or waits for the lock. A lock file that cannot be opened (a read-only state dir)
    does not stop the work."""
    try:
        pending, fd = _open(path.with_name(PENDING_NAME)), _open(path)
    except OSError:
        yield
        return
    try:
        # An update waiting for the lock holds `pending`: new work must not starve it.
        if not _try(pending, fcntl.LOCK_SH) or not _try(fd, fcntl.LOCK_SH):
            raise UpdatePending("an update is about to reboot the appliance")
        os.close(pending)
        pending = -1
        yield
    finally:
        if pending >= 0:
            os.close(pending)
        os.close(fd)


def exclusive(path: Path, timeout_s: float, poll_s: float = 0.5) -> tuple[int, int] | None:
    """The exclusive lock, once the work in progress has ended (new work is refused from
    the first call): its two file descriptors, to keep open until the reboot; or None
    when work still held it at the deadline (then nothing is held)."""
    fds = (_open(path.with_name(PENDING_NAME)), _open(path))
    deadline = time.monotonic() + timeout_s
    got_pending = False
    try:
        while True:
            got_pending = got_pending or _try(fds[0], fcntl.LOCK_EX)
            if got_pending and _try(fds[1], fcntl.LOCK_EX):
                return fds
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds:
        os.close(fd)
    return None

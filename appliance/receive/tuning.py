"""Tuning of the receive process: malloc thresholds and pynetdicom's polling sleeps.

Both measured on the receive path (docs/benchmarks.md, "Changes made after the first
measurement"); both process-wide, set once by `receive.scp.Receiver`. Nothing here
touches data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any

from appliance.core import pynetdicom_compat as compat

# glibc malloc serves every allocation >= 128 KiB with a fresh mmap() and gives it back
# with munmap() (and trims the heap top above 128 KiB): each PDU, data set and sealed
# copy of a 0.5 MB CT slice then costs ~130 page faults plus zeroing, ~0.8 ms of system
# CPU per image on the bench machine. Serving such buffers from the heap and keeping
# freed memory for reuse cut the receiver's CPU by ~16 % and raised single-association
# throughput by ~30 % with no change in peak RSS (docs/benchmarks.md).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MALLOC_MMAP_THRESHOLD = 4 << 20   # below this, buffers come from the heap (CT/MR slices)
MALLOC_TRIM_THRESHOLD = 64 << 20  # free heap kept for reuse before it goes back to the OS


def tune_malloc() -> bool:
    """Apply the thresholds above with mallopt(3); False where that is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


# pynetdicom's reactors poll: the DUL thread sleeps `_run_loop_delay` (1 ms) whenever it
# finds nothing to do, and the association thread sleeps a fixed 1 ms per loop. C-STORE is
# one request in flight at a time, so each image waits for several of these sleeps (~2 ms,
# more than the rest of our handler). While images are arriving (a C-STORE answered in the
# last BUSY_WINDOW_S) both sleep POLL_BUSY_S instead; otherwise they keep pynetdicom's 1 ms,
# so an association a scanner keeps open between studies costs no more CPU than before.
# The same sleeps serve the forwarder's associations in this process.
POLL_BUSY_S = 0.00005
POLL_IDLE_S = 0.001
BUSY_WINDOW_S = 0.05
_last_activity = 0.0  # time.monotonic() of the last C-STORE answered (any association)
_busy_sleep_s = POLL_BUSY_S  # what a reactor sleeps within BUSY_WINDOW_S of _last_activity
_senders: dict[int, float] = {}  # id(association) -> time.monotonic() of its last C-STORE


def mark_activity(assoc: object = None) -> None:
    """A C-STORE was answered on `assoc`: poll fast for a while, unless several are sending.

    With two or more associations sending at once the CPUs are already busy with their
    images, so a reactor that sleeps its 1 ms loses no time, while a fast-polling one
    would only take CPU from them (measured: 4 associations at 50 us reached 0.77x the
    single association's rate; bench/receive_bench.py).
    """
    global _last_activity, _busy_sleep_s
    now = time.monotonic()
    _last_activity = now
    _senders[id(assoc)] = now
    for key, seen in list(_senders.items()):
        if now - seen >= BUSY_WINDOW_S:
            _senders.pop(key, None)
    _busy_sleep_s = POLL_BUSY_S if len(_senders) <= 1 else POLL_IDLE_S


class _AdaptiveSleepTime:
    """Stands in for the `time` module inside pynetdicom's reactors: shortens their sleeps."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        busy = time.monotonic() - _last_activity < BUSY_WINDOW_S
        time.sleep(min(seconds, _busy_sleep_s if busy else POLL_IDLE_S))


def shorten_polling() -> None:
    compat.replace_reactor_sleep(_AdaptiveSleepTime())

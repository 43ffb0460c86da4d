"""The window: how many codec results the packer holds in memory at once, all the
segments it packs side by side together (pack/packer.py, `Packer.pack_pending`).

Several sealed segments are packed at once so that the codec workers are not idle while
one segment's last jobs finish and its bundle is synced and committed; memory stays what
one segment held, because their jobs share this one window, and a job's result is
written into its bundle and dropped before another takes its place. A place goes to the
first segment in rank (stat, then oldest) that still has jobs to submit, so a later one
only fills the cores the earlier one leaves free (its tail: the last results, the sync
and commit), and a study's small first segment is not slowed down.

Thread-safe (one condition variable); `acquire` waits at most its timeout.
"""

from __future__ import annotations

import threading
from typing import Any


class Window:
    """The window: how many codec results (each up to an in-memory instance,
    `pack.stream_threshold_mb`) may be in flight or waiting to be written, all segments
    together, so that packing several segments at once holds no more in memory than
    packing one did. A place goes only to the segment first in rank (lowest key:
    stat, then oldest) among those still submitting jobs (`feeding` .. `fed`)."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._cv = threading.Condition()
        self._feeding: dict[str, tuple[Any, ...]] = {}

    def feeding(self, seg: str, rank: tuple[Any, ...]) -> None:
        with self._cv:
            self._feeding[seg] = rank

    def fed(self, seg: str) -> None:
        with self._cv:
            if self._feeding.pop(seg, None) is not None:
                self._cv.notify_all()

    def acquire(self, seg: str, timeout: float) -> bool:
        def first_with_room() -> bool:
            mine = self._feeding.get(seg)
            return self._free > 0 and (mine is None or mine == min(self._feeding.values()))
        with self._cv:
            if not self._cv.wait_for(first_with_room, timeout):
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        with self._cv:
            self._free += 1
            self._cv.notify_all()

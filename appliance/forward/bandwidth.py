"""A bandwidth cap per destination, optionally for some hours of the day only.

For shared and metered links (a hospital's one uplink, a truck's LTE): `max_kbit_s` on a
[[destinations]] entry caps what the appliance sends there, all lanes together (one
`Cap` per destination, shared by its transport's sends); `cap_hours = "07:00-19:00"`
applies it only in those hours, local time (a range may wrap midnight: "22:00-06:00"),
and outside them nothing is capped. 0 (the default) is no cap.

How: virtual scheduling (the GCRA form of a token bucket). Each `take(n)` reserves the
next n bytes' slot on the link at the cap's rate and sleeps until at most `BURST_S`
before its slot starts: a cap costs nothing to a link that is idle most of the time, a
short burst goes at once, and over seconds the average holds the cap to within a PDU or
a chunk.
Senders call `take` per chunk they are about to write (the dicom transport per PDU, in
its socket; file copies per chunk), in pieces of at most `MAX_STEP_S` of sleep, so a
cancelled attempt stops within that. The clock is monotonic; the time of day comes from
the wall clock only to choose whether the cap applies.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.core.config import Destination

BURST_S = 0.25  # unused link time that may be saved up (at the cap's rate)
MAX_STEP_S = 0.5  # longest single sleep: a cancelled send notices within this

_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_hours(text: str) -> tuple[int, int]:
    """"HH:MM-HH:MM" -> (start, end) in minutes after midnight; ValueError if malformed
    or empty (start == end)."""
    m = _HOURS.match(text)
    if not m:
        raise ValueError("must be HH:MM-HH:MM, like 07:00-19:00")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise ValueError("starts and ends at the same time; leave cap_hours out to cap always")
    return start, end


def in_hours(minute: int, hours: tuple[int, int] | None) -> bool:
    """Whether `minute` (after midnight) is within the range (pure; wraps midnight)."""
    if hours is None:
        return True
    start, end = hours
    return start <= minute < end if start < end else minute >= start or minute < end


def _local_minute() -> int:
    t = time.localtime()
    return t.tm_hour * 60 + t.tm_min


@dataclass
class Cap:
    kbit_s: float  # 0: no cap
    hours: tuple[int, int] | None = None
    clock: Callable[[], float] = time.monotonic
    minute: Callable[[], int] = _local_minute
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._free = 0.0  # when the link is free again, at the cap's rate

    @property
    def capped(self) -> bool:
        return self.kbit_s > 0 and in_hours(self.minute(), self.hours)

    def take(self, n: int, cancelled: threading.Event | None = None) -> None:
        """Wait until `n` more bytes may go; returns at once when not capped now, and
        early (without sending being allowed any sooner later) when `cancelled` is set."""
        if n <= 0 or not self.capped:
            return
        rate = self.kbit_s * 1000 / 8  # bytes per second
        with self._lock:
            now = self.clock()
            free = max(self._free, now)  # when the link is free at the cap's rate
            wait = max(0.0, free - BURST_S - now)  # up to BURST_S ahead may go at once
            self._free = free + n / rate
        while wait > 0:
            if cancelled is not None and cancelled.is_set():
                return
            step = min(wait, MAX_STEP_S)
            self.sleep(step)
            wait -= step


def for_destination(dest: Destination) -> Cap:
    """The cap a [[destinations]] entry asks for (`max_kbit_s`, `cap_hours`)."""
    return Cap(dest.max_kbit_s, parse_hours(dest.cap_hours) if dest.cap_hours else None)

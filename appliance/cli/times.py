"""How `appliance` commands show times to people: local ISO-8601 with the UTC offset, and
an age ("3m ago", "in 2.0h"). Pure formatting; nothing read or written."""

from __future__ import annotations

import datetime
from typing import Any

# Fields of a queue item or bundle header that hold a time (epoch seconds; 0 or None: unset).
TIME_FIELDS = ("created", "updated", "next_attempt", "sealed", "delivered")


def with_iso_times(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[k] = v
        if k in TIME_FIELDS:
            out[f"{k}_iso"] = local_time(v) if v else None
    return out


def local_time(t: float) -> str:
    """ISO-8601 in the box's local time, with its UTC offset: 2026-12-05T14:03:07+01:00."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).astimezone().isoformat(timespec="seconds")


def when(t: float | None, now: float) -> str:
    """A time for people: ISO-8601 local, and how long ago (or how soon); "-" when unset."""
    if not t:
        return "-"
    ago = now - t
    return f"{local_time(t)} ({age(ago)} ago)" if ago >= 0 else f"{local_time(t)} (in {age(-ago)})"


def age(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 2 * 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"

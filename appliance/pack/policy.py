"""The packer's pure policy: when a segment is sealed, what is packed while a scanner
sends a burst, how long one instance's codec job may run, how far a deflated instance
may inflate, and what to do with a segment whose pack failed. Functions of the config,
a few times and an exception; nothing here reads, writes or logs (pack/packer.py does).

Sealing policy (`due_for_sealing`): a `receiving` segment is sealed when its study
has been quiet for `pack.study_quiet_s`, or when it has been open for
`pack.segment_max_age_s` while the study is still arriving (so forwarding overlaps
receiving); count and size limits are applied by the spool as instances arrive (a
study's first segment is small: `pack.first_segment_instances`). While a scanner sends a
burst, what is packed is decided by `may_pack_now` (`pack.during_burst`).

Failure table (`after_failure`): a segment that fails as a whole is tried again after a
back-off, PACK_ATTEMPTS times in all, then held; a full disk or a busy index is waited
out instead, never counted.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass

from appliance.core.config import Pack

PACK_ATTEMPTS = 3  # tries of a whole segment before it is held
PACK_RETRY_S = 5.0  # back-off after the first failed try; doubles after each
PACK_RETRY_MAX_S = 300.0
PACK_WAIT_S = 30.0  # between tries while the disk is full
# errors of the box, not of the segment: waited out, never counted towards holding it
_WAIT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class SegmentTimes:
    created: float
    updated: float
    stat: bool = False  # a stat study (queue.store.PRIORITY_STAT, from the routing rules)


@dataclass(frozen=True)
class Burst:
    """What the packer knows about a sealed segment while a scanner sends a burst."""

    first: bool = False  # its study's first segment (no earlier segment of the study)
    link_waits: bool = False  # no packed bundle is waiting for the link (none `ready`)


def may_pack_now(sealed_at: float, receiving_burst: bool, cfg: Pack, now: float,
                 stat: bool = False, burst: Burst = Burst()) -> bool:
    """Whether to start packing a sealed segment now.

    While a scanner is sending a burst (images back to back), packing takes CPU and GIL
    time from the receiver and keeps the scanner waiting for each C-STORE response. So
    with `pack.during_burst = "never"` (the default) nothing is packed during a burst
    but what has waited `pack.segment_max_age_s`. "first" packs a study's first segment
    (small, `pack.first_segment_instances`: the study's first bytes leave within seconds
    of its first C-STORE); "link-waits" also any segment while no packed bundle is
    waiting to be sent (the link would wait for it); "always" ignores bursts
    (docs/benchmarks.md, "Keeping a thin link full", has the figures).
    Whatever the policy, a segment waits at most `pack.segment_max_age_s` after it was
    sealed, and a stat study's is packed at once.
    """
    if stat or not receiving_burst or now - sealed_at >= cfg.segment_max_age_s:
        return True
    if cfg.during_burst == "always":
        return True
    if cfg.during_burst == "never":
        return False
    if cfg.during_burst == "first":
        return burst.first
    return burst.first or burst.link_waits


def inflate_cap(cfg: Pack, max_instance_bytes: int) -> int:
    """Most bytes a deflated instance may inflate to in a codec worker before it is
    passed through as it came ("inflated-too-large"): the configured maximum instance
    size, and no more than the in-memory path takes (`pack.stream_threshold_mb`; larger
    instances are packed streaming precisely so that no worker holds one whole, and a
    deflated one is compressed already)."""
    return min(max_instance_bytes, cfg.stream_threshold_mb << 20)


def due_for_sealing(seg: SegmentTimes, cfg: Pack, now: float) -> str | None:
    """Why a receiving segment should be sealed now ("quiet", "age"), or None. A stat
    study's segment is sealed every `pack.stat_segment_max_age_s` (when shorter), so that
    its first images are on their way within seconds while the rest still arrives."""
    if now - seg.updated >= cfg.study_quiet_s:
        return "quiet"
    max_age = min(cfg.segment_max_age_s, cfg.stat_segment_max_age_s) if seg.stat else cfg.segment_max_age_s
    if now - seg.created >= max_age:
        return "age"
    return None


def job_limit(size: int, cfg: Pack) -> float:
    """Seconds one instance's codec job may run: `pack.job_timeout_s` plus
    `pack.job_timeout_s_per_mb` per MiB (a 1 GiB multi-frame object needs minutes)."""
    return cfg.job_timeout_s + cfg.job_timeout_s_per_mb * size / (1 << 20)


@dataclass(frozen=True)
class AfterFailure:
    """What to do with a segment whose pack just failed (see `after_failure`)."""

    hold: bool
    delay_s: float  # before the next try (when not held)
    attempts: int  # counted failures so far
    reason: str  # a class, never a message (messages can quote patient data)


def failure_reason(e: BaseException) -> str:
    """The exception's class, with the errno name for an OSError ("OSError ENOSPC")."""
    name = type(e).__name__
    if isinstance(e, OSError) and e.errno is not None and e.errno in errno.errorcode:
        return f"{name} {errno.errorcode[e.errno]}"
    return name


def after_failure(e: BaseException, attempts: int) -> AfterFailure:
    """Pure: a segment failed to pack after `attempts` earlier counted failures.

    A full disk or a busy index is the box's trouble, not the segment's: wait with the
    back-off, count nothing. Anything else counts; at PACK_ATTEMPTS the segment is held.
    """
    waited = (isinstance(e, OSError) and e.errno in _WAIT_ERRNOS) or isinstance(
        e, sqlite3.OperationalError)
    if waited:
        return AfterFailure(hold=False, delay_s=PACK_WAIT_S, attempts=attempts,
                            reason=failure_reason(e))
    n = attempts + 1
    delay = min(PACK_RETRY_MAX_S, PACK_RETRY_S * 2 ** (n - 1))
    return AfterFailure(hold=n >= PACK_ATTEMPTS, delay_s=delay, attempts=n,
                        reason=failure_reason(e))

"""Pace: which codec keeps a destination's link busy when the packer is the bottleneck.

Pure (issue 11 item 8). Compression saves link time only while the link is the slower
stage. Delivering R raw bytes through codec c takes about R / min(pack_c, link * ratio_c)
once packing and sending overlap: the packer consumes raw bytes at pack_c, the link
carries raw bytes at its own rate times the codec's compression ratio. On a fast link
with a slow packer (100 Mbit/s, J2K with verification at ~34 slices/s on 2 cores) a
faster codec (JPEG-LS: ~4x the speed, about the same ratio here) or none at all delivers
sooner; on a thin link the best ratio wins.

`choose_codec` compares the configured codec with the faster ones after it in `BY_SPEED`
(never a slower one: an operator who chose "jpeg-ls" or "none" keeps it), from what was
measured here (`Recent`: the pack rate and ratio of the configured codec, the send rate
of the destination) and `PRIORS` for the codecs not measured. It switches only when the
other codec is faster by `margin` (no flapping on noise) and keeps the configured codec
while either rate is unknown. Every codec is lossless: the choice changes bytes on the
wire and time, never a pixel.

Wired in (`pack.adaptive`): the forwarder measures each destination's send rate with a
`Throughput` (bytes over the time at least one send to it was in flight, so two lanes
sharing a link are not counted at half its rate each); the packer measures its own pack
rate the same way (as the configured codec's equivalent, `equivalent_bytes`) and the
configured codec's ratio (`Recent`), and asks `choose_codec` as each instance's job goes
to the codec pool, with the rate of the destination the segment goes to (pack/packer.py).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Fastest last. Only a codec at or after the configured one is ever chosen.
BY_SPEED = ("jpeg2000", "jpeg-ls", "none")

# Relative pack speed (raw bytes/s, jpeg2000 = 1) and relative bundle size (jpeg2000 = 1;
# "none" is the raw size whatever the ratio) with verification on, 2 cores, CT slices
# (docs/benchmarks.md, "Pack": 33.5 slices/s J2K, 141.4 JPEG-LS; pass-through is
# spool read + AES only, taken as 10x, which only matters on a link faster than ~4x
# the J2K pack rate).
PRIORS: dict[str, tuple[float, float]] = {"jpeg2000": (1.0, 1.0), "jpeg-ls": (4.2, 1.05),
                                          "none": (10.0, 0.0)}


@dataclass(frozen=True)
class Rates:
    """What was measured: None while unknown (no recent delivery or pack)."""

    send_bps: float | None  # bundle bytes/s the destination took in recent deliveries
    pack_bps: float | None  # raw bytes/s the packer consumed with the configured codec
    ratio: float | None  # raw bytes / bundle bytes of those packs (>= 1 when compressing)


def delivery_rate(codec: str, configured: str, r: Rates) -> float:
    """Raw bytes/s delivered through `codec`, estimated from rates measured with
    `configured`: the slower of the packer and the link (times the codec's ratio)."""
    assert r.send_bps is not None and r.pack_bps is not None and r.ratio is not None
    speed0, size0 = PRIORS[configured]
    speed, size = PRIORS[codec]
    pack = r.pack_bps * speed / speed0
    # "none" sends raw bytes; a configured "none" is only ever compared with itself
    ratio = 1.0 if codec == "none" else max(1.0, r.ratio * size0 / size)
    return min(pack, r.send_bps * ratio)


def equivalent_bytes(raw_by_codec: Mapping[str, float], configured: str) -> float:
    """Raw bytes packed with several codecs, counted as the bytes the configured codec
    would have packed in the same time (by their relative speed in `PRIORS`): the pack
    rate `choose_codec` is asked with stays that of the configured codec after a switch."""
    speed0 = PRIORS[configured][0] if configured in PRIORS else 1.0
    return sum(n * speed0 / PRIORS[c][0] for c, n in raw_by_codec.items() if c in PRIORS)


def choose_codec(configured: str, r: Rates, margin: float = 1.2) -> str:
    """The codec to pack the next segment for this link with (see the module docstring)."""
    if configured not in BY_SPEED or None in (r.send_bps, r.pack_bps, r.ratio):
        return configured
    best, best_rate = configured, delivery_rate(configured, configured, r)
    for codec in BY_SPEED[BY_SPEED.index(configured) + 1:]:
        rate = delivery_rate(codec, configured, r)
        if rate > best_rate * margin:
            best, best_rate = codec, rate
    return best


class Recent:
    """Bytes per second over the last `keep` samples (deliveries or packs): the sum of
    their bytes over the sum of their seconds, so a long transfer weighs more than a
    short one. Not thread-safe: one owner."""

    def __init__(self, keep: int = 8) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=keep)

    def add(self, nbytes: float, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self._samples.append((nbytes, seconds))

    def add_to_last(self, nbytes: float) -> None:
        """More bytes for the last sample's time (transfers that ended together)."""
        if self._samples and nbytes > 0:
            b, s = self._samples[-1]
            self._samples[-1] = (b + nbytes, s)

    def rate(self) -> float | None:
        if not self._samples:
            return None
        return sum(b for b, _ in self._samples) / sum(s for _, s in self._samples)


class Throughput:
    """Bytes per second of a stage that may run several transfers at once (lanes to one
    destination, segments packed side by side): each finished transfer counts its bytes
    and the busy time since the previous one finished (or since the stage became busy),
    so the figure is what the stage as a whole moved while it was busy, not per transfer
    (two sends sharing a 20 Mbit/s link each see 10). Idle time never counts.
    Thread-safe: lanes and the packer call it from their own threads."""

    def __init__(self, keep: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        self._recent = Recent(keep)
        self._clock = clock
        self._lock = threading.Lock()
        self._busy = 0  # transfers in flight
        self._mark = 0.0  # when the time not yet counted began

    def begin(self) -> None:
        with self._lock:
            if self._busy == 0:
                self._mark = self._clock()
            self._busy += 1

    def end(self, nbytes: float) -> None:
        """A transfer begun with `begin` finished; `nbytes` 0 for one that failed (its
        time is dropped, not counted against the rate)."""
        with self._lock:
            now = self._clock()
            self._busy = max(0, self._busy - 1)
            if now > self._mark:
                self._recent.add(nbytes, now - self._mark)
            else:  # ended with the one before: its time is counted already
                self._recent.add_to_last(nbytes)
            self._mark = now

    def rate(self) -> float | None:
        with self._lock:
            return self._recent.rate()

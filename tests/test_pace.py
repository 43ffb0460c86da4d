"""Which codec keeps a link busy (appliance/pack/pace.py): the best ratio on a thin link,
a faster codec when the link would wait for the packer."""

from __future__ import annotations

import pytest

from appliance.pack.pace import Rates, Recent, Throughput, choose_codec, delivery_rate

MB = 1e6
J2K_PACK = 17.6 * MB  # 33.5 slices/s of 0.526 MB (verify on, 2 cores)
RATIO = 2.98  # 157.7 MB of CT -> 52.9 MB of bundles


def link(mbit: float) -> Rates:
    """Goodput of a link of `mbit` Mbit/s (bundle bytes/s) with the J2K pack figures."""
    return Rates(send_bps=mbit * 1e6 / 8, pack_bps=J2K_PACK, ratio=RATIO)


def test_thin_link_keeps_the_best_ratio() -> None:
    assert choose_codec("jpeg2000", link(20)) == "jpeg2000"


def test_link_waiting_for_the_packer_gets_a_faster_codec() -> None:
    assert choose_codec("jpeg2000", link(100)) == "jpeg-ls"


def test_link_faster_than_any_compression_gets_pass_through() -> None:
    assert choose_codec("jpeg2000", link(1000)) == "none"


def test_unknown_rates_keep_the_configured_codec() -> None:
    assert choose_codec("jpeg2000", Rates(send_bps=None, pack_bps=J2K_PACK, ratio=RATIO)) == "jpeg2000"
    assert choose_codec("jpeg2000", Rates(send_bps=100e6, pack_bps=None, ratio=None)) == "jpeg2000"


def test_a_faster_configured_codec_is_never_traded_for_a_slower_one() -> None:
    thin = Rates(send_bps=0.1 * MB, pack_bps=74 * MB, ratio=2.84)
    assert choose_codec("jpeg-ls", thin) == "jpeg-ls"
    assert choose_codec("none", Rates(send_bps=0.1 * MB, pack_bps=176 * MB, ratio=1.0)) == "none"


def test_a_gain_within_the_margin_keeps_the_configured_codec() -> None:
    # the link just keeps up with J2K: JPEG-LS would deliver ~10 % more, not worth a switch
    r = Rates(send_bps=J2K_PACK / RATIO * 1.1 * 1.05, pack_bps=J2K_PACK, ratio=RATIO)
    assert delivery_rate("jpeg-ls", "jpeg2000", r) > delivery_rate("jpeg2000", "jpeg2000", r)
    assert choose_codec("jpeg2000", r) == "jpeg2000"


def test_delivery_rate_is_the_slower_of_packer_and_link() -> None:
    assert delivery_rate("jpeg2000", "jpeg2000", link(20)) == pytest.approx(2.5 * MB * RATIO)
    assert delivery_rate("jpeg2000", "jpeg2000", link(100)) == pytest.approx(J2K_PACK)


def test_recent_rate_weighs_samples_by_their_duration() -> None:
    r = Recent(keep=3)
    assert r.rate() is None
    r.add(10 * MB, 1.0)
    r.add(10 * MB, 9.0)
    assert r.rate() == pytest.approx(2 * MB)


def test_recent_rate_forgets_old_samples_and_ignores_empty_ones() -> None:
    r = Recent(keep=2)
    r.add(100 * MB, 1.0)
    r.add(1 * MB, 1.0)
    r.add(1 * MB, 1.0)
    r.add(5 * MB, 0.0)
    assert r.rate() == pytest.approx(1 * MB)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_counts_overlapping_transfers_as_one_busy_stage() -> None:
    clock = Clock()
    t = Throughput(clock=clock)
    t.begin()
    t.begin()  # two lanes sharing one link: 10 MB each over the same 4 s
    clock.now += 4.0
    t.end(10 * MB)
    t.end(10 * MB)
    assert t.rate() == pytest.approx(5 * MB)


def test_throughput_leaves_idle_time_out() -> None:
    clock = Clock()
    t = Throughput(clock=clock)
    t.begin()
    clock.now += 1.0
    t.end(2 * MB)
    clock.now += 60.0  # nothing to send for a minute
    t.begin()
    clock.now += 1.0
    t.end(2 * MB)
    assert t.rate() == pytest.approx(2 * MB)


def test_throughput_drops_the_time_of_a_failed_transfer() -> None:
    clock = Clock()
    t = Throughput(clock=clock)
    t.begin()
    clock.now += 30.0
    t.end(0)  # failed: neither its bytes nor its time say anything about the rate
    assert t.rate() is None
    t.begin()
    clock.now += 2.0
    t.end(4 * MB)
    assert t.rate() == pytest.approx(2 * MB)

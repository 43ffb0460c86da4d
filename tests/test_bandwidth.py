"""The bandwidth cap (forward/bandwidth.py): pure schedule, the token bucket on a fake
clock, and the dicom transport held to its cap against a real Orthanc."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core import config
from appliance.core.config import Destination
from appliance.core.errors import ConfigError
from appliance.forward import Plan, Transport, bandwidth
from appliance.forward.bandwidth import Cap
from appliance.forward.dicom import DicomTransport
from appliance.forward.directory import DirectoryTransport
from tests.orthanc import Orthanc
from tests.test_transport_contract import CT, KEY, make_bundle


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        assert s <= bandwidth.MAX_STEP_S + 1e-9
        self.t += s


def cap(kbit_s: float, hours: tuple[int, int] | None = None, minute: int = 600) -> tuple[Cap, Clock]:
    clock = Clock()
    return Cap(kbit_s, hours, clock=clock, minute=lambda: minute, sleep=clock.sleep), clock


@pytest.mark.parametrize(("text", "hours"), [("07:00-19:00", (420, 1140)), ("22:30-06:00", (1350, 360))])
def test_cap_hours_parse(text: str, hours: tuple[int, int]) -> None:
    assert bandwidth.parse_hours(text) == hours


@pytest.mark.parametrize("text", ["7:00-19:00", "07:00-24:00", "07:00", "07:00-07:00", ""])
def test_malformed_cap_hours_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        bandwidth.parse_hours(text)


@pytest.mark.parametrize(("minute", "inside"), [(419, False), (420, True), (1139, True), (1140, False)])
def test_a_day_range(minute: int, inside: bool) -> None:
    assert bandwidth.in_hours(minute, (420, 1140)) is inside


@pytest.mark.parametrize(("minute", "inside"),
                         [(1349, False), (1350, True), (0, True), (359, True), (360, False)])
def test_a_range_over_midnight(minute: int, inside: bool) -> None:
    assert bandwidth.in_hours(minute, (1350, 360)) is inside


def test_a_steady_sender_is_held_to_the_cap() -> None:
    c, clock = cap(8000)  # 1 MB/s
    t0 = clock.t
    for _ in range(101):
        c.take(100_000)  # the 101st may go once the first 10 MB had their 10 s
    assert clock.t - t0 == pytest.approx(10 - bandwidth.BURST_S)


def test_an_idle_link_lets_a_short_burst_go_at_once() -> None:
    c, clock = cap(8000)
    t0 = clock.t
    c.take(200_000)  # 0.2 s of link time
    c.take(1_000_000)  # the link is 0.2 s ahead, within the 0.25 s allowance: at once
    assert clock.t == t0
    c.take(1)  # 1.2 s ahead now: waits until 0.25 s before that
    assert clock.t - t0 == pytest.approx(1.2 - bandwidth.BURST_S)


def test_outside_its_hours_nothing_is_capped() -> None:
    c, clock = cap(8, hours=(420, 1140), minute=1200)
    t0 = clock.t
    c.take(10_000_000)
    c.take(10_000_000)
    assert clock.t == t0


def test_no_cap_by_default() -> None:
    c, clock = cap(0)
    c.take(10**9)
    c.take(10**9)
    assert not c.capped


def test_a_cancelled_send_stops_waiting_within_a_step() -> None:
    c, clock = cap(8)  # 1 kB/s
    c.take(1000)
    cancelled = threading.Event()
    cancelled.set()
    t0 = clock.t
    c.take(1_000_000, cancelled)  # 1000 s of link time
    assert clock.t - t0 <= bandwidth.MAX_STEP_S


def test_lanes_share_one_cap() -> None:
    """Two threads sending to one destination get the cap between them, not each."""
    c = Cap(8000 * 4)  # 4 MB/s, real clock
    import time
    t0 = time.monotonic()

    def send() -> None:
        for _ in range(10):
            c.take(100_000)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0  # the 20th of 0.025 s each waits for the 19 before it
    assert took >= 19 * 0.025 - bandwidth.BURST_S - 0.005


# --- transports held to their cap ----------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["directory", "dicom"])
def test_a_capped_destination_gets_no_more_than_its_cap(kind: str, tmp_path: Path) -> None:
    """8 CT slices (4.2 MB) to a destination capped at 16 Mbit/s take at least the time the
    cap allows (less the burst allowance); the same uncapped take far less (the control)."""
    import time

    bundle, _ = make_bundle(tmp_path / "b.bundle", 8)
    slices = sum(p.stat().st_size for p in sorted(CT.iterdir())[:8])
    wire = slices if kind == "dicom" else bundle.stat().st_size
    kbit = 16_000.0
    floor = wire * 8 / (kbit * 1000) - bandwidth.BURST_S

    def timed(cap_kbit: float, sub: str) -> float:
        with _transport(kind, tmp_path / sub, cap_kbit) as t:
            t0 = time.monotonic()
            t.send("b", bundle, lambda n: None, Plan())
            return time.monotonic() - t0

    capped = timed(kbit, "capped")
    free = timed(0, "free")
    assert capped >= 0.95 * floor, f"{capped:.2f} s for {wire} bytes at {kbit:g} kbit/s"
    assert capped <= floor + 5  # and not throttled far below it either
    assert free < capped / 2


@contextlib.contextmanager
def _transport(kind: str, root: Path, kbit: float) -> Iterator[Transport]:
    root.mkdir()
    if kind == "directory":
        (root / "nas").mkdir()
        yield DirectoryTransport("nas", root / "nas", KEY, Cap(kbit))
        return
    with Orthanc(root / "orthanc") as pacs:
        t = DicomTransport(Destination(name="pacs", transport="dicom", host="127.0.0.1",
                                       port=pacs.dicom_port, ae_title="ORTHANC", plaintext=True,
                                       max_kbit_s=kbit), KEY)
        try:
            yield t
        finally:
            t.close()


# --- config ----------------------------------------------------------------------------------


def _dest(**kw: object) -> dict[str, object]:
    return {"name": "nas", "transport": "directory", "path": "/srv/nas", **kw}


def _parse(dest: dict[str, object]) -> config.Config:
    return config.parse({"receive": {"accept_any_caller": True}, "destinations": [dest]}, {},
                        Path("/etc/a.toml"))


def test_a_cap_with_hours_parses_and_builds_its_cap() -> None:
    d = _parse(_dest(max_kbit_s=2000, cap_hours="22:00-06:00")).destinations[0]
    made = bandwidth.for_destination(d)
    assert (made.kbit_s, made.hours) == (2000, (1320, 360))


@pytest.mark.parametrize(("kw", "problem"), [
    ({"cap_hours": "07:00-19:00"}, "destinations[0].cap_hours: is set but max_kbit_s is not"),
    ({"max_kbit_s": 100, "cap_hours": "7-19"}, "destinations[0].cap_hours: must be HH:MM-HH:MM"),
    ({"max_kbit_s": 100}, "destinations[0].max_kbit_s: is below queue.min_rate_kbit_s (256)"),
    ({"max_kbit_s": -1}, "destinations[0].max_kbit_s: must be 0..1e+08"),
])
def test_a_bad_cap_is_refused_naming_its_key(kw: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse(_dest(**kw))
    assert any(problem in p for p in e.value.problems), e.value.problems

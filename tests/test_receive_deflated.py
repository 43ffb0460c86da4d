"""A deflated data set is identified by inflating only a bounded prefix of it
(receive.identify.identify), in the daemon and in crash recovery; never inflated whole."""

from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path

import pytest

from appliance.receive.identify import (
    DEFLATED_PREFIXES,
    Rejected,
    identify,
    identify_stored,
    inflated_prefix,
    part10_header,
)
from tests.hostile import MiB, write_deflate_bomb
from tests.test_dicomscan import CLASS, el, ids

DEFLATED = "1.2.840.10008.1.2.1.99"


def deflate(data: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def deflated_instance(body: bytes) -> bytes:
    return part10_header(CLASS, "1.2.3.4.5", DEFLATED, "SCU") + deflate(body)


@pytest.fixture(autouse=True)
def as_the_daemon_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)


def test_inflated_prefix_stops_at_its_limit() -> None:
    """64 MiB of zeros deflate to 64 KiB; asked for 1 MiB, 1 MiB comes out, and the
    inflater never held more."""
    bomb = deflate(bytes(64 * MiB))
    head = b"x" * 100
    parts: list[bytes | memoryview] = [head + bomb[:1000], memoryview(bomb[1000:])]
    tracemalloc.start()
    try:
        out, whole = inflated_prefix(parts, len(head), MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == bytes(MiB) and not whole
    assert peak < 4 * MiB


def test_inflated_prefix_of_a_short_stream_is_whole() -> None:
    data = b"0123456789" * 100
    out, whole = inflated_prefix([b"head", deflate(data)], 4, MiB)
    assert out == data and whole


def test_inflated_prefix_stops_at_the_end_of_the_stream_before_a_pad_byte() -> None:
    """DCMTK pads an odd-length deflated data set with a byte after the stream's end."""
    data = b"0123456789" * 100
    out, whole = inflated_prefix([b"head", deflate(data) + b"\x00"], 4, MiB)
    assert out == data and whole


def test_deflated_instance_is_identified() -> None:
    meta = identify([deflated_instance(ids(False, el(0x00080060, b"CS", b"CT")))], "1.2.3.4.5", "SCU")
    assert (meta.study_uid, meta.sop_instance_uid) == ("1.2.3.4.6", "1.2.3.4.5")
    assert (meta.transfer_syntax, meta.sop_class) == (DEFLATED, CLASS)


def test_uids_behind_a_long_element_are_found_in_the_longer_prefix() -> None:
    big = el(0x00091010, b"OB", b"\x01" * (DEFLATED_PREFIXES[0] * 2))  # a private blob first
    meta = identify([deflated_instance(ids(False, big))], "1.2.3.4.5", "SCU")
    assert meta.study_uid == "1.2.3.4.6"


def test_uids_beyond_the_longest_prefix_are_refused_not_inflated() -> None:
    big = el(0x00091010, b"OB", bytes(DEFLATED_PREFIXES[-1] + MiB))
    with pytest.raises(Rejected) as e:
        identify([deflated_instance(ids(False, big))], "1.2.3.4.5", "SCU")
    assert e.value.outcome == "unparseable"


def test_corrupt_deflate_stream_is_unparseable() -> None:
    data = part10_header(CLASS, "1.2.3.4.5", DEFLATED, "SCU") + b"\xff\xff\xff not deflate"
    with pytest.raises(Rejected) as e:
        identify([data], "1.2.3.4.5", "SCU")
    assert e.value.outcome == "unparseable"


def test_deflate_bomb_is_identified_in_bounded_memory(tmp_path: Path) -> None:
    """A 64 MiB-inflating bomb (64 KiB on the wire) is identified, received or recovered
    from the spool, with a few MiB of memory, not its inflated size."""
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", inflated=64 * MiB, rows=4096).read_bytes()
    import pydicom

    sop = str(pydicom.dcmread(tmp_path / "bomb.dcm", stop_before_pixels=True).SOPInstanceUID)
    tracemalloc.start()
    try:
        received = identify([bomb], sop, "MODALITY")
        recovered = identify_stored(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received.sop_instance_uid == recovered.sop_instance_uid == sop
    assert received.transfer_syntax == DEFLATED
    assert peak < 16 * MiB, f"identify held {peak / MiB:.0f} MiB"

"""The fast UID scanner agrees with pydicom on every sample, or steps aside."""

from __future__ import annotations

import io
import struct
from collections import Counter

import pytest

from appliance.core import dicomscan
from appliance.receive.identify import IDENTIFY_PREFIX, _read_identifiers, part10_header
from tests.peers import SAMPLES

UIDS = (dicomscan.STUDY_INSTANCE_UID, dicomscan.SERIES_INSTANCE_UID, dicomscan.SOP_INSTANCE_UID)


def norm(v: object) -> str | None:
    return None if v is None else str(v).strip("\x00 ")


def by_pydicom(data: bytes) -> tuple[object, ...] | None:
    try:
        ds, _ = _read_identifiers(io.BytesIO(data))
        return (*(norm(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")),
                str(ds.file_meta.TransferSyntaxUID), str(ds.file_meta.MediaStorageSOPClassUID))
    except Exception:
        return None


def by_scan(data: bytes) -> tuple[object, ...] | None:
    out = dicomscan.scan_identifiers(data[:IDENTIFY_PREFIX])
    if out is None:
        return None
    return (*(norm(out.get(t)) for t in UIDS), out[dicomscan.TRANSFER_SYNTAX], out[dicomscan.MEDIA_SOP_CLASS])


@pytest.fixture(autouse=True)
def as_the_daemon_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon tells pydicom not to judge values (receive.Receiver); so does the reference."""
    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)


def test_scanner_agrees_with_pydicom_on_every_sample() -> None:
    files = sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.name != "MANIFEST")
    assert len(files) > 300
    seen: Counter[str] = Counter()
    wrong = []
    for f in files:
        data = f.read_bytes()
        fast = by_scan(data)
        if fast is None:
            seen["left to pydicom"] += 1
            continue
        seen["scanned"] += 1
        if fast != by_pydicom(data):
            wrong.append(f"{f.relative_to(SAMPLES)}: scanner {fast} != pydicom {by_pydicom(data)}")
    print(f"\n{dict(seen)}")
    assert not wrong, "\n".join(wrong)
    # The fast path must be the common one (the rest here: sequences of undefined length
    # before the UIDs, which storescu re-encodes with explicit lengths on the wire anyway).
    assert seen["scanned"] > len(files) * 0.6, seen


def el(tag: int, vr: bytes, value: bytes, implicit: bool = False) -> bytes:
    g, e = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", g, e, len(value)) + value
    if vr in (b"SQ", b"OB", b"UN"):
        return struct.pack("<HH2sHI", g, e, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", g, e, vr, len(value)) + value


SOP, STUDY, SERIES = b"1.2.3.4.5\x00", b"1.2.3.4.6\x00", b"1.2.3.4.7\x00"
CLASS = "1.2.840.10008.5.1.4.1.1.2"


def instance(ts: str, body: bytes) -> bytes:
    return part10_header(CLASS, "1.2.3.4.5", ts, "SCU") + body


def ids(implicit: bool, before: bytes = b"") -> bytes:
    return (before + el(0x00080018, b"UI", SOP, implicit) + el(0x0020000D, b"UI", STUDY, implicit)
            + el(0x0020000E, b"UI", SERIES, implicit) + el(0x00200013, b"IS", b"1 ", implicit))


@pytest.mark.parametrize("ts,implicit", [("1.2.840.10008.1.2.1", False), ("1.2.840.10008.1.2", True),
                                         ("1.2.840.10008.1.2.4.90", False)])
def test_scanner_reads_the_uids(ts: str, implicit: bool) -> None:
    data = instance(ts, ids(implicit, el(0x00080060, b"CS", b"CT", implicit)))
    assert by_scan(data) == ("1.2.3.4.6", "1.2.3.4.7", "1.2.3.4.5", ts, CLASS) == by_pydicom(data)


@pytest.mark.parametrize("why,data", [
    ("big endian", instance("1.2.840.10008.1.2.2", b"\x00\x08\x00\x18UI\x00\x0a1.2.3.4.5\x00")),
    ("deflated", instance("1.2.840.10008.1.2.1.99", b"\x00")),
    ("sequence of undefined length first",
     instance("1.2.840.10008.1.2.1", struct.pack("<HH2sHI", 8, 0x1140, b"SQ", 0, 0xFFFFFFFF)
              + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + ids(False))),
    ("ends before (0020,000E) is passed", instance("1.2.840.10008.1.2.1", ids(False)[:-12])),
    ("implicit declared, explicit found", instance("1.2.840.10008.1.2", ids(False))),
    ("unknown VR", instance("1.2.840.10008.1.2.1", el(0x00080060, b"ZZ", b"CT") + ids(False))),
    ("non-ASCII UID",
     instance("1.2.840.10008.1.2.1", el(0x00080018, b"UI", b"1.2.\xe9\x00") + ids(False)[28:])),
    ("no DICM", b"\x00" * 200),
])
def test_scanner_steps_aside(why: str, data: bytes) -> None:
    assert dicomscan.scan_identifiers(data) is None, why


def test_scanner_stops_at_the_first_tag_past_series_uid_like_pydicom() -> None:
    """An out-of-order data set: both stop at the first tag above (0020,000E) and so both
    miss a Study Instance UID placed after it (the instance is then refused)."""
    body = (el(0x00080018, b"UI", SOP) + el(0x00200010, b"SH", b"1 ")
            + el(0x0020000D, b"UI", STUDY) + el(0x0020000E, b"UI", SERIES)
            + el(0x00280010, b"US", b"\x00\x02"))
    data = instance("1.2.840.10008.1.2.1", body)
    assert by_scan(data) == (None, None, "1.2.3.4.5", "1.2.840.10008.1.2.1", CLASS) == by_pydicom(data)


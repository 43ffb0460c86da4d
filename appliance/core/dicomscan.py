"""A minimal scanner for the identifying UIDs at the start of a Part-10 instance.

The receiver needs three UIDs per image (Study, Series, SOP Instance) and the file meta's
SOP Class and Transfer Syntax. pydicom builds a FileDataset to give them, ~0.25 ms per CT
slice; this reads the few top-level element headers before (0020,000E) directly, ~20 us.

It answers only the easy, common case and returns None for everything else, so that the
caller asks pydicom, whose answer is the reference: big endian or deflated data sets, an
element of undefined length (a sequence) before the UIDs, a VR that is not a known one
(pydicom then guesses the encoding), an implicit VR element whose length bytes read like
a VR (pydicom would take the data set for explicit VR), a non-ASCII or multi-valued UID,
or data that ends before parsing has passed (0020,000E). Like the pydicom path it
replaces (`read_partial` with a stop condition), it stops at the first top-level tag
above (0020,000E).
tests/test_dicomscan.py checks it against pydicom on every sample file.
"""

from __future__ import annotations

import struct

SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x00080018, 0x0020000D, 0x0020000E
MEDIA_SOP_CLASS, TRANSFER_SYNTAX, SOURCE_AE = 0x00020002, 0x00020010, 0x00020016

_IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_NOT_SCANNED = frozenset({"1.2.840.10008.1.2.2", DEFLATED})  # big endian, deflated
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _elements(buf: bytes, pos: int, implicit: bool, wanted: frozenset[int], stop: int,
              out: dict[int, str]) -> int | None:
    """Scan top-level elements from `pos` until a tag above `stop`; collect `wanted` values.

    Returns the position of the first element past `stop` (or the end of `buf` if that is
    exactly where the elements end), or None if the caller must use pydicom instead.
    """
    n = len(buf)
    while pos + 8 <= n:
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag > stop:
            return pos
        vr = buf[pos + 4:pos + 6]
        if implicit:
            if vr in _LONG_VRS or vr in _SHORT_VRS:
                return None  # looks explicit after all: pydicom detects and handles that
            length, hdr = _U32.unpack_from(buf, pos + 4)[0], 8
        elif vr in _LONG_VRS:
            if pos + 12 > n:
                return None
            length, hdr = _U32.unpack_from(buf, pos + 8)[0], 12
        elif vr in _SHORT_VRS:
            length, hdr = _U16.unpack_from(buf, pos + 6)[0], 8
        else:
            return None
        if length == 0xFFFFFFFF or pos + hdr + length > n:
            return None
        if tag in wanted:
            value = buf[pos + hdr:pos + hdr + length]
            if b"\\" in value:
                return None  # several values: pydicom's MultiValue is the reference
            try:
                out[tag] = value.decode("ascii").rstrip("\x00 ")
            except UnicodeDecodeError:
                return None
        pos += hdr + length
    return pos if pos == n else None


def file_meta(part10: bytes) -> tuple[int, dict[int, str]] | None:
    """(where the data set starts, {tag: value} of the meta SOP Class and Transfer Syntax,
    and Source AE Title if present), or None when the file meta cannot be scanned here or
    lacks SOP Class or Transfer Syntax."""
    if len(part10) < 132 + 12 or part10[128:132] != b"DICM":
        return None
    out: dict[int, str] = {}
    # The file meta group: explicit VR little endian, always; it ends where group 2 does.
    meta_end = _elements(part10, 132, False, frozenset({MEDIA_SOP_CLASS, TRANSFER_SYNTAX, SOURCE_AE}),
                         0x0002FFFF, out)
    if meta_end is None or TRANSFER_SYNTAX not in out or MEDIA_SOP_CLASS not in out:
        return None
    return meta_end, out


def scan_identifiers(part10: bytes) -> dict[int, str] | None:
    """{tag: value} for the meta SOP Class and Transfer Syntax and the three instance UIDs
    present before (0020,000E) inclusive, or None when only pydicom can say."""
    meta = file_meta(part10)
    if meta is None:
        return None
    meta_end, out = meta
    ts = out[TRANSFER_SYNTAX]
    if ts in _NOT_SCANNED:
        return None
    end = _elements(part10, meta_end, ts == _IMPLICIT_LE,
                    frozenset({SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID}),
                    SERIES_INSTANCE_UID, out)
    if end is None or end == len(part10):
        return None  # did not get past (0020,000E) within what we have: ask pydicom
    return out

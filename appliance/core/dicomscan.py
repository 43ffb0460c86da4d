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
tests/test_dicomscan.py checks it against pydicom on every sample file. The element
headers are walked by `core.part10` (bench/scan_bench.py times this per CT slice).
"""

from __future__ import annotations

from appliance.core import part10

SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x00080018, 0x0020000D, 0x0020000E
MEDIA_SOP_CLASS, TRANSFER_SYNTAX, SOURCE_AE = 0x00020002, part10.TRANSFER_SYNTAX, 0x00020016

_IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_NOT_SCANNED = frozenset({"1.2.840.10008.1.2.2", DEFLATED})  # big endian, deflated


def _elements(buf: bytes, pos: int, implicit: bool, wanted: frozenset[int], stop: int,
              out: dict[int, str], first: int = 0) -> int | None:
    """Scan top-level elements from `pos` until a tag above `stop` (or below `first`);
    collect `wanted` values.

    Returns the position of the first element past `stop` (or the end of `buf` if that is
    exactly where the elements end), or None if the caller must use pydicom instead.
    """
    end, undefined = pos, part10.UNDEFINED
    try:
        for tag, _, start, value, length, end in part10.elements(buf, pos, implicit, stop, first):
            if length == undefined:
                return None
            if implicit and part10.looks_explicit(buf, start):
                return None  # looks explicit after all: pydicom detects and handles that
            if tag in wanted:
                raw = buf[value:end]
                if b"\\" in raw:
                    return None  # several values: pydicom's MultiValue is the reference
                try:
                    out[tag] = raw.decode("ascii").rstrip("\x00 ")
                except UnicodeDecodeError:
                    return None
    except part10.Malformed:  # an unknown VR, or cut short
        return None
    return end


def file_meta(part10_head: bytes) -> tuple[int, dict[int, str]] | None:
    """(where the data set starts, {tag: value} of the meta SOP Class and Transfer Syntax,
    and Source AE Title if present), or None when the file meta cannot be scanned here or
    lacks SOP Class or Transfer Syntax."""
    if (len(part10_head) < part10.META_START + 12
            or part10_head[part10.PREAMBLE:part10.META_START] != part10.MAGIC):
        return None
    out: dict[int, str] = {}
    # The file meta group: explicit VR little endian, always; it ends where group 2 does.
    meta_end = _elements(part10_head, part10.META_START, False,
                         frozenset({MEDIA_SOP_CLASS, TRANSFER_SYNTAX, SOURCE_AE}), 0x0002FFFF, out,
                         0x00020000)
    if meta_end is None or TRANSFER_SYNTAX not in out or MEDIA_SOP_CLASS not in out:
        return None
    return meta_end, out


def scan_identifiers(part10_head: bytes) -> dict[int, str] | None:
    """{tag: value} for the meta SOP Class and Transfer Syntax and the three instance UIDs
    present before (0020,000E) inclusive, or None when only pydicom can say."""
    meta = file_meta(part10_head)
    if meta is None:
        return None
    meta_end, out = meta
    ts = out[TRANSFER_SYNTAX]
    if ts in _NOT_SCANNED:
        return None
    end = _elements(part10_head, meta_end, ts == _IMPLICIT_LE,
                    frozenset({SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID}),
                    SERIES_INSTANCE_UID, out)
    if end is None or end == len(part10_head):
        return None  # did not get past (0020,000E) within what we have: ask pydicom
    return out

"""Part-10 structure: the one module that walks and rewrites DICOM files byte by byte.

A Part-10 file is a 128-byte preamble, "DICM", the File Meta Information (group 0002,
always Explicit VR Little Endian) and the data set in the transfer syntax the meta names
(PS3.10 7.1). This module knows that structure and nothing of what values mean:

* element headers in Explicit and Implicit VR Little Endian (PS3.5 7.1): the VRs with a
  2-byte reserved field and a 32-bit length (`LONG_VRS`), the others with a 16-bit one;
* undefined lengths: a value of undefined length is items up to a sequence delimiter, an
  item of undefined length holds elements up to an item delimiter (PS3.5 7.5), and the
  content of an undefined-length UN is Implicit VR (PS3.5 6.2.2);
* encapsulated pixel data: item headers, the Basic Offset Table (PS3.5 A.4);
* the file meta: where it ends, its Transfer Syntax UID, rewriting it with another one;
* splicing top-level elements in or out of a data set, every other byte kept;
* inflating a Deflated Explicit VR Little Endian data set, with a cap on the output.

Everything here is pure: bytes (or a memoryview) in, offsets and bytes out; no file, no
clock, no logging, no pydicom. Offsets are positions in the buffer the caller passed.

How it fails: structure it cannot walk raises `Malformed` (a ValueError) with a short
reason that never quotes a value from the data (values may be patient data); input that
ends inside a structure raises `Truncated`, a `Malformed` that says more bytes could
complete it (a reader growing a buffer reads on); a file without preamble and "DICM"
raises `NotPart10`; inflating past its cap raises `TooLarge`. Nothing reads a declared
length beyond the buffer: every length is checked against what is there first, and
nested undefined lengths are followed to at most `MAX_DEPTH` levels.

The receive hot path walks each instance's first elements with `elements` (~0.25 us per
element); keep its loop free of per-element calls (bench/scan_bench.py times it).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

PREAMBLE = 128
MAGIC = b"DICM"
META_START = PREAMBLE + len(MAGIC)  # where the file meta's first element starts
UNDEFINED = 0xFFFFFFFF
MAX_TAG = 0xFFFFFFFF

TRANSFER_SYNTAX = 0x00020010
META_GROUP_LENGTH = 0x00020000
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
SEQUENCE_DELIMITER_ITEM = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)  # the delimiter's 8 bytes

# PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 32-bit length
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
VRS = LONG_VRS | SHORT_VRS
MAX_DEPTH = 32  # nested undefined-length sequences followed; real data sets nest < 10
INFLATE_STEP = 1 << 20  # inflated per zlib call

_EXPLICIT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length (or reserved)
_IMPLICIT = struct.Struct("<HHL")  # tag, 32-bit length; also every item header
_U32 = struct.Struct("<L")


class Malformed(ValueError):
    """Bytes this module cannot walk as Part-10 structure. The message is a short reason
    that never contains a value of the data."""


class Truncated(Malformed):
    """The bytes end inside a structure: more of them may complete it."""


class NotPart10(Malformed):
    """No 128-byte preamble followed by "DICM"."""


class TooLarge(ValueError):
    """Inflating would give more bytes than the cap allows."""


class Element(NamedTuple):
    """A data element as it lies in the buffer. (`elements` yields the same fields as a
    plain tuple: building a NamedTuple per element would cost the receive hot path more
    than the walk itself.)"""

    tag: int
    vr: bytes | None  # None in Implicit VR
    start: int  # of the element header
    value: int  # of the value
    length: int  # as declared: UNDEFINED for a value of undefined length
    end: int  # where the next element starts


# (tag, vr, start, value, length, end): the fields of `Element`
ElementTuple = tuple[int, bytes | None, int, int, int, int]


def elements(buf: bytes | bytearray | memoryview, pos: int, implicit: bool,
             stop: int = MAX_TAG, first: int = 0) -> Iterator[ElementTuple]:
    """The data elements from `pos` to the end of `buf`, in order, up to the first one
    whose tag is above `stop` or below `first` (not yielded: its `start` is the last
    element's `end`; its tag is read before anything else of it).

    Values of undefined length are followed to their delimiter (`end` is past it). An
    explicit VR that is not a known one raises Malformed; in Implicit VR the VR is not
    there (None), whatever the bytes look like (see `looks_explicit`).
    """
    n = len(buf)
    # Locals, and two loops rather than a test per element: this is the receive hot path.
    long_vrs, short_vrs, explicit_header, u32 = LONG_VRS, SHORT_VRS, _EXPLICIT.unpack_from, _U32.unpack_from
    if implicit:
        implicit_header = _IMPLICIT.unpack_from
        while pos < n:
            if pos + 8 > n:
                raise Truncated("an element header is cut short")
            group, elem, length = implicit_header(buf, pos)
            tag = group << 16 | elem
            if tag > stop or tag < first:
                return
            if length == UNDEFINED:
                end = _undefined_end(buf, pos + 8, True, 1)
            else:
                end = pos + 8 + length
                if end > n:
                    raise Truncated("an element's value is cut short")
            yield tag, None, pos, pos + 8, length, end
            pos = end
        return
    while pos < n:
        if pos + 8 > n:
            raise Truncated("an element header is cut short")
        group, elem, vr, length = explicit_header(buf, pos)
        tag = group << 16 | elem
        if tag > stop or tag < first:
            return
        if vr in long_vrs:
            if pos + 12 > n:
                raise Truncated("an element header is cut short")
            (length,) = u32(buf, pos + 8)
            value = pos + 12
            if length == UNDEFINED:
                end = _undefined_end(buf, value, vr == b"UN", 1)
                yield tag, vr, pos, value, length, end
                pos = end
                continue
        elif vr in short_vrs:
            value = pos + 8
        else:
            raise Malformed("an element has an unknown VR")
        end = value + length
        if end > n:
            raise Truncated("an element's value is cut short")
        yield tag, vr, pos, value, length, end
        pos = end


def _header(buf: bytes | bytearray | memoryview, pos: int, implicit: bool) -> Element:
    """The element header at `pos`; `end` is past a defined-length value (which need not
    be in `buf`), UNDEFINED for an undefined one. (`elements` decodes headers inline: a
    call per element would cost the receive hot path a third of its time.)"""
    n = len(buf)
    if pos + 8 > n:
        raise Truncated("an element header is cut short")
    group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
    tag = group << 16 | elem
    if implicit:
        (length,) = _U32.unpack_from(buf, pos + 4)
        vr, value = None, pos + 8
    elif vr in LONG_VRS:
        if pos + 12 > n:
            raise Truncated("an element header is cut short")
        (length,) = _U32.unpack_from(buf, pos + 8)
        value = pos + 12
    elif vr in SHORT_VRS:
        value = pos + 8
    else:
        raise Malformed("an element has an unknown VR")
    return Element(tag, vr, pos, value, length, UNDEFINED if length == UNDEFINED else value + length)


def _undefined_end(buf: bytes | bytearray | memoryview, pos: int, implicit: bool,
                   depth: int) -> int:
    """Where an undefined-length value starting at `pos` ends: past its sequence
    delimiter. Its items are skipped by their length, or walked to their item delimiter
    when theirs is undefined too."""
    if depth > MAX_DEPTH:
        raise Malformed("sequences nested too deeply")
    n = len(buf)
    while True:
        tag, length = item_header(buf, pos)
        pos += 8
        if tag == SEQUENCE_DELIMITER:
            return pos
        if tag != ITEM:
            raise Malformed("an undefined-length value holds something other than items")
        if length != UNDEFINED:
            pos += length
            if pos > n:
                raise Truncated("an item is cut short")
            continue
        while True:  # the item's elements, up to its delimiter
            if item_header(buf, pos)[0] == ITEM_DELIMITER:
                pos += 8
                break
            inner = _header(buf, pos, implicit)
            if inner.length == UNDEFINED:
                pos = _undefined_end(buf, inner.value, implicit or inner.vr == b"UN", depth + 1)
            elif inner.end > n:
                raise Truncated("an element's value is cut short")
            else:
                pos = inner.end


def item_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """(tag, length) of the item, item delimiter or sequence delimiter header at `pos`
    (8 bytes in either VR encoding)."""
    if pos + 8 > len(buf):
        raise Truncated("an item header is cut short")
    group, elem, length = _IMPLICIT.unpack_from(buf, pos)
    return group << 16 | elem, length


def looks_explicit(buf: bytes | bytearray | memoryview, pos: int) -> bool:
    """Whether the element at `pos` reads as Explicit VR (its bytes 4-5 are a known VR),
    as pydicom decides a data set's actual encoding."""
    return bytes(buf[pos + 4 : pos + 6]) in VRS


def header_length(vr: bytes | None) -> int:
    """Bytes of an element header: 12 for an explicit long VR, else 8."""
    return 12 if vr in LONG_VRS else 8


def locate(buf: bytes | bytearray | memoryview, pos: int, implicit: bool, tag: int) -> Element | None:
    """The header of top-level element `tag` in the data set from `pos` (its value need
    not be in `buf`: `end` may lie past it, and is UNDEFINED for an undefined length), or
    None when an element with a larger tag comes first. Truncated when `buf` ends before
    the element's header does (a caller that holds all of the data set knows then that
    the element is not there)."""
    last = pos
    for e in elements(buf, pos, implicit, stop=tag - 1):
        last = e[5]
    if item_header(buf, last)[0] != tag:  # the tag, read before anything else
        return None
    return _header(buf, last, implicit)


# --- the file meta --------------------------------------------------------------------


class Meta(NamedTuple):
    """The File Meta Information of a Part-10 buffer."""

    elements: tuple[Element, ...]
    end: int  # where the data set starts
    transfer_syntax: str  # (0002,0010) without its padding; "" if absent

    def value(self, buf: bytes | bytearray | memoryview, tag: int) -> str | None:
        """A meta element's value as text (Latin-1, trailing NULs and spaces removed,
        as pydicom gives a UI or AE value), None if the meta has no such element."""
        for e in self.elements:
            if e.tag == tag:
                return text(buf[e.value : e.end])
        return None


def text(raw: bytes | bytearray | memoryview) -> str:
    """A string value's bytes as text: Latin-1, padding removed."""
    return bytes(raw).decode("latin-1").rstrip("\x00 ").strip()


def meta(buf: bytes | bytearray | memoryview) -> Meta:
    """The file meta group of `buf` (which starts with the preamble): its elements, up to
    the first element of another group. NotPart10 without preamble and "DICM"; Malformed
    for a meta element of undefined length or two Transfer Syntax UIDs; Truncated when
    `buf` ends within the meta or less than an element header after it."""
    if len(buf) < META_START or bytes(buf[PREAMBLE:META_START]) != MAGIC:
        if len(buf) < META_START and bytes(buf[PREAMBLE:]) == MAGIC[: max(0, len(buf) - PREAMBLE)]:
            raise Truncated("the file ends within the preamble")
        raise NotPart10("no preamble and DICM")
    found: list[Element] = []
    end = META_START
    ts: str | None = None
    for fields in elements(buf, META_START, False, stop=0x0002FFFF, first=0x00020000):
        e = Element(*fields)
        if e.length == UNDEFINED:
            raise Malformed("a file meta element has an undefined length")
        if e.tag == TRANSFER_SYNTAX:
            if ts is not None:
                raise Malformed("the file meta has two transfer syntaxes")
            ts = text(buf[e.value : e.end])
        found.append(e)
        end = e.end
    return Meta(tuple(found), end, ts or "")


def dataset_offset(buf: bytes | bytearray | memoryview) -> int:
    """Where the data set starts in a Part-10 buffer (after preamble, DICM and group 2)."""
    return meta(buf).end


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element in Explicit VR Little Endian, an odd-length value padded (NUL for UI
    and binary VRs, a space for text)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    return element_header(tag, vr, len(value)) + value


def element_header(tag: int, vr: bytes, length: int) -> bytes:
    """An Explicit VR Little Endian element header."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length)
    return _EXPLICIT.pack(tag >> 16, tag & 0xFFFF, vr, length)


def file_meta(elements: Sequence[bytes], preamble: bytes = b"\x00" * PREAMBLE) -> bytes:
    """Preamble, "DICM" and a file meta group of the encoded `elements` (group 0002 in
    tag order, without (0002,0000)), headed by its group length."""
    body = b"".join(elements)
    return preamble + MAGIC + element(META_GROUP_LENGTH, b"UL", _U32.pack(len(body))) + body


def with_transfer_syntax(buf: bytes | bytearray | memoryview, m: Meta, transfer_syntax: str) -> bytes:
    """`buf`'s file meta elements, byte for byte, with only (0002,0010) replaced by
    `transfer_syntax` and (0002,0000), if there, recomputed. (Preamble and DICM are
    not included.)"""
    parts: list[bytes] = []
    group_length = -1
    for e in m.elements:
        if e.tag == META_GROUP_LENGTH:
            group_length = len(parts)
            parts.append(b"")
        elif e.tag == TRANSFER_SYNTAX:
            parts.append(element(TRANSFER_SYNTAX, b"UI", transfer_syntax.encode("ascii")))
        else:
            parts.append(bytes(buf[e.start : e.end]))
    if group_length >= 0:
        after = sum(len(p) for p in parts[group_length + 1 :])
        parts[group_length] = element(META_GROUP_LENGTH, b"UL", _U32.pack(after))
    return b"".join(parts)


# --- rewriting a data set -------------------------------------------------------------


def splice(buf: bytes, spans: Mapping[int, tuple[int, int]], base: int, end: int,
           replace: Mapping[int, bytes | None]) -> bytes:
    """`buf[base:]` with top-level elements replaced (bytes), removed (None) or inserted
    (a tag not in `spans` goes before the first element with a larger tag). `spans`
    maps each top-level tag to its (start, end) in `buf`; `end` is where the last one
    ends, and `buf[end:]` (a trailer) is kept as it is."""
    order = sorted(spans.items(), key=lambda kv: kv[1][0])
    inserts = sorted(t for t in replace if t not in spans and replace[t] is not None)
    out: list[bytes] = []
    pos = order[0][1][0] if order else base
    out.append(buf[base:pos])
    for tag, (start, stop) in order:
        while inserts and inserts[0] < tag:
            out.append(replace[inserts.pop(0)] or b"")
        if tag in replace:
            new = replace[tag]
            if new is not None:
                out.append(new)
        else:
            out.append(buf[start:stop])
    for tag in inserts:
        out.append(replace[tag] or b"")
    out.append(buf[end:])
    return b"".join(out)


# --- encapsulated pixel data ----------------------------------------------------------


def item(value: bytes) -> bytes:
    """An item (FFFE,E000) holding `value`."""
    return _IMPLICIT.pack(0xFFFE, 0xE000, len(value)) + value


def basic_offset_table(item_lengths: Sequence[int]) -> bytes:
    """The Basic Offset Table item for frames whose first fragment items (headers
    included) are `item_lengths` long: offsets relative to the first item after the table
    (as `pydicom.encaps.encapsulate` writes them); empty when an offset would not fit in
    32 bits (PS3.5 A.4 allows an empty table)."""
    offsets, pos = [], 0
    for n in item_lengths:
        offsets.append(pos)
        pos += n
    if offsets and offsets[-1] > 0xFFFFFFFF:
        return item(b"")
    return item(struct.pack(f"<{len(offsets)}L", *offsets))


# --- Deflated Explicit VR Little Endian -----------------------------------------------


def inflate(deflated: bytes | bytearray | memoryview, cap: int) -> bytes:
    """The inflated data set of a Deflated Explicit VR Little Endian file (raw deflate,
    RFC 1951; bytes after the end of the deflate stream are ignored, as pydicom does).
    Incremental, `INFLATE_STEP` bytes at a time: it stops as soon as the output passes
    `cap` (TooLarge), having held about the cap and a step (the growing output, and the
    copy of it a growth may take); a data set within the cap is copied once more into
    the bytes returned. Malformed if it is not deflate."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    data: bytes | bytearray | memoryview = deflated
    try:
        while True:
            out += d.decompress(data, INFLATE_STEP)
            if len(out) > cap:
                raise TooLarge(f"inflates to more than {cap} bytes")
            data = d.unconsumed_tail
            if not data or d.eof:
                # At the end of the stream, bytes after it (DCMTK pads an odd-length
                # deflated data set with one) stay in unconsumed_tail when max_length
                # is given, and would be handed back forever: they are ignored.
                break
        out += d.flush()  # what zlib still holds: less than its window
    except zlib.error:
        raise Malformed("the deflated data set does not inflate") from None
    if len(out) > cap:
        raise TooLarge(f"inflates to more than {cap} bytes")
    return bytes(out)


def inflate_prefix(deflated: bytes | bytearray | memoryview, n: int) -> bytes:
    """At most the first `n` bytes of an inflated data set (what a reader needs to see
    its first elements), whatever it inflates to; Malformed if it is not deflate."""
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated, n)
    except zlib.error:
        raise Malformed("the deflated data set does not inflate") from None


__all__ = [
    "ITEM", "ITEM_DELIMITER", "LONG_VRS", "MAGIC", "MAX_DEPTH", "META_START", "PIXEL_DATA",
    "PREAMBLE", "SEQUENCE_DELIMITER", "SEQUENCE_DELIMITER_ITEM", "SHORT_VRS", "TRANSFER_SYNTAX",
    "UNDEFINED", "VRS", "Element", "ElementTuple", "Malformed", "Meta", "NotPart10", "TooLarge", "Truncated",
    "basic_offset_table", "dataset_offset", "element", "element_header", "elements",
    "file_meta", "header_length", "inflate", "inflate_prefix", "item", "item_header",
    "locate", "looks_explicit", "meta", "splice", "text", "with_transfer_syntax",
]

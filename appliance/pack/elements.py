"""A Part-10 instance's data set as top-level elements with their byte positions.

Owns nothing on disk. It splits a Part-10 file into file meta and data set bytes
(`_split_part10`, `_dataset_bytes`: a deflated data set is inflated incrementally, under
a cap), parses the data set noting where each top-level element lies (`_parse_dataset`,
optionally leaving Pixel Data as a view of the buffer), and writes the result back:
element by element spliced into the original bytes (`_splice`), or, for implicit VR
input, re-encoded as explicit VR and proven equal element by element
(`_checked_explicit`). `pack.codec`, `pack.stream` and `forward.convert` build on it;
`pack.codec`'s docstring says why splicing and what pydicom does otherwise.

How it fails: it never raises anything but `_Pass(reason)` for bad input, with a key of
`pack.reasons.REASONS` ("no-file-meta", "unparseable", "duplicate-element",
"reencode-mismatch", ...). Nothing here logs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.values import convert_string

from appliance.core import part10
from appliance.pack.reasons import _Pass

# --- Part-10 structure: preamble, file meta, dataset bytes (core.part10) ----------------

_PIXEL_DATA = part10.PIXEL_DATA
_EOT_TAGS = (0x7FE00001, 0x7FE00002)  # Extended Offset Table (Lengths)
_FLOAT_PIXEL_TAGS = (0x7FE00008, 0x7FE00009)
_PLANAR_CONFIGURATION = 0x00280006


def _split_part10(raw: bytes) -> part10.Meta:
    """The file meta (explicit VR LE, group 0002, after preamble + 'DICM'), or the reason
    to pass `raw` through."""
    if len(raw) < part10.META_START:
        raise _Pass("no-file-meta")
    try:
        m = part10.meta(raw)
    except part10.NotPart10:
        raise _Pass("no-file-meta") from None
    except part10.Malformed:  # an unknown VR, two transfer syntaxes, cut short...
        raise _Pass("unparseable") from None
    if not m.elements:
        raise _Pass("no-file-meta")
    if not m.transfer_syntax:
        raise _Pass("no-transfer-syntax")
    return m


# --- dataset parsing with element positions ------------------------------------------


@dataclass
class _Parsed:
    ds: Dataset
    spans: dict[int, tuple[int, int]]  # top-level tag -> (start, end) in buf
    end: int  # where the last element ends; buf[end:] is the tail (kept verbatim)
    base: int = 0  # where the dataset starts in buf


def _parse_dataset(buf: bytes, implicit: bool, base: int = 0, defer_pixels: bool = False) -> _Parsed:
    """Parse the dataset in buf[base:] (no meta) and note where each top-level element
    lies (offsets in `buf`, so callers need not copy the dataset out of a Part-10 file).

    With `defer_pixels`, a top-level Pixel Data value of defined length is not copied:
    its element holds a memoryview of `buf` (for `_source_image`; the caller must replace
    the element before anything writes the dataset)."""
    if len(buf) - base >= 8 and part10.looks_explicit(buf, base) == implicit:
        raise _Pass("transfer-syntax-mismatch")
    fp = io.BytesIO(buf)  # shares a bytes object: no copy
    fp.seek(base)
    elems: dict[BaseTag, Any] = {}
    spans: dict[int, tuple[int, int]] = {}
    stopped: list[tuple[str | None, int]] = []

    def at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag == _PIXEL_DATA and length not in (0, 0xFFFFFFFF) and not stopped:
            stopped.append((vr, length))
            return True
        return False

    encoding: str | list[str] = default_encoding
    try:
        while True:
            gen = data_element_generator(fp, implicit, True, encoding=encoding,
                                         stop_when=at_pixels if defer_pixels else None)
            while True:
                start = fp.tell()
                try:
                    elem = next(gen)
                except StopIteration:
                    break
                _add(elems, spans, elem, start, fp.tell())
            if not stopped or _PIXEL_DATA in spans:
                break
            vr, length = stopped[0]
            start = fp.tell()
            value = start + (8 if implicit or vr is None else part10.header_length(vr.encode()))
            if value + length > len(buf):  # cut short: let pydicom read it as before
                defer_pixels = False
                continue
            elem = RawDataElement(BaseTag(_PIXEL_DATA), vr, length,
                                  memoryview(buf)[value : value + length],  # type: ignore[arg-type]
                                  value, implicit, True)
            _add(elems, spans, elem, start, value + length)
            fp.seek(value + length)
            defer_pixels = False
            cs = elems.get(BaseTag(0x00080005))
            if cs is not None and cs.value:  # what the generator would carry on with
                encoding = convert_encodings(convert_string(cs.value, True))
    except _Pass:
        raise
    except Exception:
        raise _Pass("unparseable") from None
    end = fp.tell()
    ds = Dataset(elems)
    cs = ds.get("SpecificCharacterSet")
    ds.set_original_encoding(implicit, True, convert_encodings(cs) if cs else default_encoding)
    return _Parsed(ds, spans, end, base)


def _add(elems: dict[BaseTag, Any], spans: dict[int, tuple[int, int]], elem: Any,
         start: int, end: int) -> None:
    tag = int(elem.tag)
    if tag in spans:
        raise _Pass("duplicate-element")  # which one is meant?
    elems[elem.tag] = elem
    spans[tag] = (start, end)


def _element_bytes(elem: DataElement) -> bytes:
    """One element encoded as explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem)
    return fp.getvalue()


def _splice(buf: bytes, parsed: _Parsed, replace: dict[int, bytes | None]) -> bytes:
    """`buf` with top-level elements replaced (bytes), removed (None) or inserted, the
    rest byte for byte (`part10.splice`)."""
    return part10.splice(buf, parsed.spans, parsed.base, parsed.end, replace)


def _to_explicit(parsed: _Parsed, buf: bytes) -> bytes:
    """Rewrite an implicit VR LE dataset (possibly already modified in `parsed.ds`) as
    explicit VR LE with pydicom; the tail after the last element is kept verbatim."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    try:
        write_dataset(fp, parsed.ds)
    except Exception:
        raise _Pass("reencode-error") from None
    return fp.getvalue() + buf[parsed.end :]


def _same_elements(a: Dataset, b: Dataset, skip: frozenset[int] = frozenset()) -> bool:
    """Element-by-element value equality (recursing into sequences), ignoring group
    lengths and the tags in `skip`."""
    # (iterating a Dataset yields elements, hence .keys())
    ta = {int(t) for t in a.keys() if t.element != 0 and int(t) not in skip}  # noqa: SIM118
    tb = {int(t) for t in b.keys() if t.element != 0 and int(t) not in skip}  # noqa: SIM118
    if ta != tb:
        return False
    for t in ta:
        ea, eb = a[t], b[t]
        if ea.VR == "SQ" or eb.VR == "SQ":
            if ea.VR != eb.VR or len(ea.value) != len(eb.value):
                return False
            if not all(_same_elements(x, y) for x, y in zip(ea.value, eb.value, strict=True)):
                return False
        elif ea.value != eb.value:
            return False
    return True


def _checked_explicit(original: bytes, parsed: _Parsed, skip: frozenset[int]) -> bytes:
    """`_to_explicit`, then prove every element (but `skip`) still has its value."""
    out = _to_explicit(parsed, original)
    try:
        again = _parse_dataset(out, implicit=False)
        fresh = _parse_dataset(original, implicit=True, base=parsed.base)
        same = _same_elements(fresh.ds, again.ds, skip)
    except Exception:
        raise _Pass("reencode-error") from None
    if not same:
        raise _Pass("reencode-mismatch")
    return out


def _native_encoding(transfer_syntax: str) -> str:
    """"explicit", "implicit" or "deflated" for the little-endian native syntaxes, or the
    reason this codec takes no other (nothing is read or inflated here)."""
    ts = UID(transfer_syntax)
    if ts == ExplicitVRLittleEndian:
        return "explicit"
    if ts == ImplicitVRLittleEndian:
        return "implicit"
    if ts == DeflatedExplicitVRLittleEndian:
        return "deflated"
    if ts == ExplicitVRBigEndian:
        raise _Pass("big-endian")
    if ts.is_transfer_syntax and ts.is_encapsulated:
        raise _Pass("already-compressed")
    raise _Pass("unknown-transfer-syntax")


def _dataset_bytes(raw: bytes, p: part10.Meta, max_inflated: int) -> tuple[bytes, int, bool, list[str]]:
    """(buffer, where the dataset starts in it, implicit VR?, notes) for a native
    little-endian transfer syntax. Not a copy of the dataset unless it was deflated; a
    deflated one is inflated incrementally and given up past `max_inflated` bytes."""
    encoding = _native_encoding(p.transfer_syntax)
    if encoding == "explicit":
        return raw, p.end, False, []
    if encoding == "implicit":
        return raw, p.end, True, ["implicit-vr-converted"]
    try:
        return part10.inflate(memoryview(raw)[p.end :], max_inflated), 0, False, ["inflated"]
    except part10.TooLarge:
        raise _Pass("inflated-too-large") from None
    except part10.Malformed:
        raise _Pass("unparseable") from None

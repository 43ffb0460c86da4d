"""Codec: lossless compression of one DICOM Part-10 instance, bytes in, bytes out.

`compress(part10, codec, verify)` turns an uncompressed instance into JPEG 2000 Lossless
(1.2.840.10008.1.2.4.90, OpenJPEG through pydicom's "pylibjpeg" plugin) or JPEG-LS
Lossless (1.2.840.10008.1.2.4.80, CharLS through pydicom's "pyjpegls" plugin), frame by
frame, and with `verify` decodes every frame of its own output again and compares it with
the original stored values. Anything it cannot or should not compress comes back as the
*same bytes object* with `action="passthrough"` and a short machine-friendly `reason`
(see `REASONS`). It never raises on bad input and never logs; the caller logs the
result (reasons starting with "verify-" are errors: the encoder produced something that
does not decode to the original).

`decompress(part10, max_output)` is the way back for a forwarder whose peer does not
accept the compressed syntax: an uncompressed Explicit VR Little Endian Part-10 file, no
longer than `max_output` (checked before decoding, from the image attributes). The
forwarder runs it in a conversion worker (`forward.conversion`), never in the daemon.

`pack.pool.CodecPool` runs `compress` in worker processes ("forkserver" by default, never "fork"
from the threaded daemon): the OpenJPEG encoder holds the GIL and is not thread-safe.

What may change, and nothing else
---------------------------------
* File meta (0002,0010) Transfer Syntax UID, and (0002,0000) group length recomputed
  when the input has one. Every other meta element (Media Storage SOP Class/Instance
  UID, Source AE title, Implementation Class UID/Version, private meta) is copied byte
  for byte, as is the 128-byte preamble.
* (7FE0,0010) Pixel Data: native -> encapsulated (VR OB, undefined length, Basic Offset
  Table, one fragment per frame), as the syntax requires.
* (0028,0006) Planar Configuration 1 -> 0 for colour images: PS3.5 8.2.3 (JPEG-LS) and
  8.2.4 (JPEG 2000) say it "shall be set to 0". Noted in `Result.notes`.
* (7FE0,0000), a retired group length, is removed when present: its value cannot be
  right once Pixel Data has an undefined length. Noted as "pixel-group-length-removed".
* Implicit VR Little Endian input is rewritten as Explicit VR Little Endian, because
  every encapsulated syntax is explicit VR LE: each element gets its VR written out
  (from the data dictionary; unknown private elements become UN, values longer than
  64 KiB in a VR with a 16-bit length become UN per PS3.5 6.2.2), and pydicom drops
  retired group lengths (gggg,0000), whose values are wrong after such a rewrite
  anyway (noted as "group-lengths-removed"). After the rewrite every element is
  compared with the input (values parsed by pydicom, recursively through sequences);
  any difference -> passthrough "reencode-mismatch". Noted as "implicit-vr-converted".
* Deflated Explicit VR Little Endian input is inflated (the dataset bytes inside are
  kept byte for byte). Noted as "inflated". Inflation is incremental and capped
  (`max_inflated`, `core.part10.inflate`): a data set larger than the cap once inflated
  (a deflate bomb: 0.5 MiB that inflate to 512 MiB) passes through as it came,
  "inflated-too-large". Only codec workers call this.

Explicit VR Little Endian input (the usual case) is not re-serialised by pydicom at all:
the output is the input with the Pixel Data element (and the few elements above)
spliced out and replaced, so every other element keeps its exact original encoding
(odd lengths, private VRs, undefined-length sequences, element order, trailing bytes).

pydicom 3 behaviours worked around here (pydicom 3.0.x, pinned <3.1)
---------------------------------------------------------------------
* `Dataset.compress()` / `decompress()` make a NEW SOP Instance UID (and Media Storage
  SOP Instance UID) by default: always called with `generate_instance_uid=False`.
* `pixel_array` masks bits above Bits Stored and sign-extends signed values, and both
  encoders silently drop those bits too, so comparing `pixel_array` before and after
  would call a lossy round trip "identical" (e.g. an overlay in the high bits, or
  signed values stored without sign extension). Here the original values are the raw
  stored container values (Bits Allocated wide, Pixel Representation signedness);
  anything outside the Bits Stored range passes through as
  "pixels-outside-bits-stored", and verification compares against those raw values.
* `compress()` fed from the dataset hands a Planar Configuration 1 buffer to OpenJPEG as
  if it were colour-by-pixel (a scrambled image). We always encode from an array built
  from the raw bytes (colour-by-pixel) and set Planar Configuration to 0, which the
  syntax requires anyway.
* pydicom's writer drops every group length and re-encodes elements it has parsed; we
  splice instead (above) for explicit VR input.
* The JPEG 2000 plugin already forces `use_mct=False` for RGB; we pass it explicitly so
  Photometric Interpretation stays what it was (no YBR_RCT).
* `decompress()` converts YBR to RGB by default (changing pixel values and Photometric
  Interpretation) and leaves Extended Offset Table elements behind: we pass
  `as_rgb=False` and remove (7FE0,0001)/(7FE0,0002).
* pydicom's reader turns a truncated file into a warning; we check the Pixel Data
  length against Rows x Columns x Samples x Frames x Bits Allocated ourselves.
* pydicom warns a lot on odd input. `compress`/`decompress` suppress warnings while they
  run (`warnings.catch_warnings`, which is process-global: run them in one thread per
  process, as `CodecPool` does), so a test run with warnings-as-errors behaves like
  production.

Not compressed, on purpose: Explicit VR Big Endian (retired; converting it means byte-
swapping every binary value, not worth the risk), files without a Part-10 header, Pixel
Data whose length is not exactly what the image attributes say (plus one pad byte):
extra bytes would be lost, missing ones invented. Nested pixel data (e.g. an Icon Image
Sequence) is left native and untouched. `decompress` needs a decoder for the input
syntax: JPEG 2000, JPEG-LS and RLE are installed; the JPEG family (baseline, extended,
lossless) would need pylibjpeg-libjpeg or gdcm, so those raise CodecError.
Verification decodes with the same libraries that encoded (OpenJPEG, CharLS): they are
the only decoders installed.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.pixels.utils import decompress as _pydicom_decompress
from pydicom.pixels.utils import iter_pixels
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)
from pydicom.values import convert_string

from appliance.core import part10

__all__ = ["CODECS", "REASONS", "CodecError", "Result", "compress", "decompress"]

# codec name -> (transfer syntax, pydicom encoding plugin, extra encoder options)
CODECS: dict[str, tuple[UID, str, dict[str, Any]]] = {
    "jpeg2000": (JPEG2000Lossless, "pylibjpeg", {"use_mct": False}),
    "jpeg-ls": (JPEGLSLossless, "pyjpegls", {}),
}
_CODEC_NAMES = (*CODECS, "none")

# Every reason `compress` can give, and what it means. "ok" is the only one for
# action="compressed". Reasons starting with "verify-" mean the codec is broken: log them
# as errors. "bits-allocated-N" exists for every N other than 8 and 16.
REASONS: dict[str, str] = {
    "ok": "compressed, and verified when verify=True",
    "codec-none": "codec 'none' configured",
    "unparseable": "not a Part-10 file pydicom can parse (header, meta or dataset)",
    "duplicate-element": "a top-level element occurs twice: which one is meant?",
    "no-file-meta": "no 128-byte preamble + 'DICM' + file meta",
    "no-transfer-syntax": "file meta has no (0002,0010)",
    "unknown-transfer-syntax": "(0002,0010) is not a transfer syntax we know",
    "transfer-syntax-mismatch": "dataset encoding differs from the one (0002,0010) declares",
    "big-endian": "Explicit VR Big Endian (retired) is not converted",
    "already-compressed": "encapsulated transfer syntax",
    "no-pixel-data": "no (7FE0,0010) Pixel Data: not an image",
    "float-pixels": "Float / Double Float Pixel Data",
    "bits-allocated-1": "1-bit (bit-packed) pixel data",
    "bits-allocated-32": "32-bit pixel data",
    "bad-pixel-attributes": "Rows/Columns/Bits/Samples/Frames missing or invalid",
    "bad-pixel-data": "Pixel Data element not a plain native value",
    "pixel-data-length-mismatch": "Pixel Data length differs from what the attributes say",
    "pixels-outside-bits-stored": "stored values use bits above Bits Stored: lossy to encode",
    "encode-error": "the encoder rejected the image",
    "too-large": "would need an Extended Offset Table (> 4 GiB)",
    "reencode-error": "implicit -> explicit VR rewrite failed",
    "reencode-mismatch": "implicit -> explicit VR rewrite changed an element",
    "not-smaller": "compressed file not smaller than the input",
    "verify-mismatch": "decoded pixels differ from the original",
    "verify-error": "our own output could not be decoded",
    "worker-crashed": "the worker process died on this instance, twice (CodecPool only)",
    "worker-timeout": "compressing it ran past pack.job_timeout_s (+ per MB): worker killed",
    "pack-error": "reading or identifying it in the worker failed: sent as is, as received",
    "stream-unsupported": "large instance the streaming path cannot take apart (deflated,"
                          " header or trailer too long, elements out of order): sent as is",
    "temp-write-error": "large instance: its compressed temp file could not be written",
    "inflated-too-large": "deflated data set larger than the cap once inflated (a deflate"
                          " bomb, or more than the in-memory path holds): sent as is",
}

Action = Literal["compressed", "passthrough"]

# Defaults for the caps; the appliance passes its configured ones (pack: the in-memory
# path's size, pack.stream_threshold_mb; forward: receive.max_instance_mb).
MAX_INFLATED = 64 << 20
MAX_OUTPUT = 4096 << 20


@dataclass(frozen=True)
class Result:
    """The outcome of `compress`. `data` is a complete Part-10 file (for a passthrough:
    the input object itself)."""

    data: bytes = field(repr=False)
    transfer_syntax: str  # of `data`; "" when the input has none we could read
    action: Action
    reason: str  # a key of REASONS
    input_size: int
    output_size: int
    frames: int = 0  # frames encoded (and verified) when compressed
    notes: tuple[str, ...] = ()  # attribute changes the syntax dictated, see module doc

    @property
    def ratio(self) -> float:
        return self.input_size / self.output_size if self.output_size else 1.0


class CodecError(ValueError):
    """`decompress` could not produce an uncompressed version of its input."""


class _Pass(Exception):
    """Internal: stop and pass the input through with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


# --- pixels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    frames: int
    rows: int
    columns: int
    samples: int
    planar: int
    values: np.ndarray  # (frames, rows, columns, samples): the raw stored values


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    v = ds.get(keyword, default)
    if v is None or v == "":
        if default is None:
            raise _Pass("bad-pixel-attributes")
        return default
    return int(v)


@dataclass(frozen=True)
class _Layout:
    """The Image Pixel attributes that say how native Pixel Data is laid out."""

    frames: int
    rows: int
    columns: int
    samples: int
    planar: int
    bits_allocated: int
    bits_stored: int
    signed: int

    @property
    def expected_length(self) -> int:
        return self.rows * self.columns * self.samples * self.frames * self.bits_allocated // 8

    @property
    def frame_length(self) -> int:
        return self.rows * self.columns * self.samples * self.bits_allocated // 8

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(f"<{'i' if self.signed else 'u'}{self.bits_allocated // 8}")

    def shape(self, values: np.ndarray, frames: int) -> np.ndarray:
        """`frames` frames of stored values as (frames, rows, columns, samples),
        colour-by-pixel whatever the Planar Configuration."""
        if self.samples > 1 and self.planar == 1:
            return values.reshape(frames, self.samples, self.rows, self.columns).transpose(0, 2, 3, 1)
        return values.reshape(frames, self.rows, self.columns, self.samples)

    def check_range(self, values: np.ndarray) -> None:
        """Refuse stored values with bits above Bits Stored (the encoders drop them)."""
        if self.bits_stored < self.bits_allocated and values.size:
            bs = self.bits_stored
            lo, hi = (-(1 << (bs - 1)), (1 << (bs - 1)) - 1) if self.signed else (0, (1 << bs) - 1)
            if int(values.min()) < lo or int(values.max()) > hi:
                raise _Pass("pixels-outside-bits-stored")


def _layout(ds: Dataset) -> _Layout:
    """The pixel layout of `ds` (which must hold Pixel Data), or a reason not to try."""
    try:
        bits_allocated = _int(ds, "BitsAllocated")
        if bits_allocated not in (8, 16):
            raise _Pass(f"bits-allocated-{bits_allocated}")
        rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
        samples = _int(ds, "SamplesPerPixel")
        bits_stored = _int(ds, "BitsStored")
        signed = _int(ds, "PixelRepresentation")
        frames = _int(ds, "NumberOfFrames", 1)
        planar = _int(ds, "PlanarConfiguration", 0) if samples > 1 else 0
    except _Pass:
        raise
    except Exception:
        raise _Pass("bad-pixel-attributes") from None
    if (min(rows, columns, samples, frames, bits_stored) < 1 or samples not in (1, 3)
            or bits_stored > bits_allocated or signed not in (0, 1) or planar not in (0, 1)):
        raise _Pass("bad-pixel-attributes")
    return _Layout(frames, rows, columns, samples, planar, bits_allocated, bits_stored, signed)


def decoded_length(ds: Dataset) -> int:
    """Bytes of native Pixel Data the Image Pixel attributes of `ds` describe (what
    pydicom's decoders produce for it); CodecError when they are missing or invalid."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except Exception:
        raise CodecError("bad-pixel-attributes") from None
    if min(rows, columns, samples, frames, bits) < 1:
        raise CodecError("bad-pixel-attributes")
    return (rows * columns * samples * frames * bits + 7) // 8


def _source_image(ds: Dataset) -> _Image:
    """The stored pixel values exactly as they are in the file, or a reason not to try."""
    if _PIXEL_DATA not in ds:
        floaty = any(t in ds for t in _FLOAT_PIXEL_TAGS)
        raise _Pass("float-pixels" if floaty else "no-pixel-data")
    lay = _layout(ds)
    try:
        px = ds.get_item(_PIXEL_DATA)
        value = px.value
        undefined = px.is_undefined_length if isinstance(px, DataElement) else px.length == 0xFFFFFFFF
    except Exception:
        raise _Pass("bad-pixel-data") from None
    if undefined or not isinstance(value, bytes | memoryview):
        raise _Pass("bad-pixel-data")
    expected = lay.expected_length
    if not (len(value) == expected or (expected % 2 and len(value) == expected + 1)):
        raise _Pass("pixel-data-length-mismatch")
    count = lay.rows * lay.columns * lay.samples * lay.frames
    values = lay.shape(np.frombuffer(value, dtype=lay.dtype, count=count), lay.frames)
    lay.check_range(values)
    return _Image(lay.frames, lay.rows, lay.columns, lay.samples, lay.planar, values)


def _decode_frames(part10: bytes) -> Iterator[np.ndarray]:
    """Decode every frame of a Part-10 file (the verification decoder; tests patch it)."""
    return iter_pixels(io.BytesIO(part10), raw=True)


def _verify(part10: bytes, image: _Image) -> None:
    shape = (image.rows, image.columns, image.samples)
    n = 0
    try:
        for n, frame in enumerate(_decode_frames(part10), start=1):
            if n > image.frames or frame.size != image.values[n - 1].size:
                raise _Pass("verify-mismatch")
            if not np.array_equal(frame.reshape(shape), image.values[n - 1]):
                raise _Pass("verify-mismatch")
    except _Pass:
        raise
    except Exception:
        raise _Pass("verify-error") from None
    if n != image.frames:
        raise _Pass("verify-mismatch")


# --- the public functions -------------------------------------------------------------


def _passthrough(part10: bytes, reason: str, transfer_syntax: str = "") -> Result:
    return Result(part10, transfer_syntax, "passthrough", reason, len(part10), len(part10))


def compress(part10: bytes, codec: str = "jpeg2000", verify: bool = True,
             max_inflated: int = MAX_INFLATED) -> Result:
    """Compress one Part-10 instance losslessly with `codec` ("jpeg2000", "jpeg-ls" or
    "none"). A deflated data set is inflated up to `max_inflated` bytes, and passed
    through ("inflated-too-large") if it is larger. Never raises for bad input; raises
    ValueError for an unknown codec."""
    if codec not in _CODEC_NAMES:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(_CODEC_NAMES)}")
    part10 = bytes(part10) if not isinstance(part10, bytes) else part10
    ts_in = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = _split_part10(part10)
            # reported (and so maybe logged) only when it is a well-formed UID
            ts_in = p.transfer_syntax if UID(p.transfer_syntax).is_valid else ""
            if codec == "none":
                raise _Pass("codec-none")
            return _compress(part10, p, codec, verify, max_inflated)
    except _Pass as stop:
        return _passthrough(part10, stop.reason, ts_in)
    except Exception:  # the boundary: bad input never escapes as an exception
        return _passthrough(part10, "unparseable", ts_in)


def _compress(raw: bytes, p: part10.Meta, codec: str, verify: bool, max_inflated: int) -> Result:
    target, plugin, options = CODECS[codec]
    buf, base, implicit, notes = _dataset_bytes(raw, p, max_inflated)
    parsed = _parse_dataset(buf, implicit, base, defer_pixels=True)
    ds = parsed.ds
    image = _source_image(ds)

    replace: dict[int, bytes | None] = {}
    if image.samples > 1 and image.planar == 1:
        ds.PlanarConfiguration = 0
        replace[_PLANAR_CONFIGURATION] = _element_bytes(ds["PlanarConfiguration"])
        notes.append("planar-configuration-0")
    if 0x7FE00000 in parsed.spans:
        replace[0x7FE00000] = None
        del ds[0x7FE00000]
        notes.append("pixel-group-length-removed")

    arr = image.values
    if image.samples == 1:
        arr = arr[..., 0]
    if image.frames == 1:
        arr = arr[0]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(p.transfer_syntax)
    try:
        ds.compress(target, arr, encoding_plugin=plugin, generate_instance_uid=False, **options)
    except Exception:
        raise _Pass("encode-error") from None
    if any(t in ds for t in _EOT_TAGS):
        raise _Pass("too-large")

    if implicit:
        if any(t & 0xFFFF == 0 for t in parsed.spans):
            notes.append("group-lengths-removed")
        skip = frozenset({_PIXEL_DATA, _PLANAR_CONFIGURATION} if "planar-configuration-0" in notes
                         else {_PIXEL_DATA})
        body = _checked_explicit(buf, parsed, skip)
    else:
        replace[_PIXEL_DATA] = _element_bytes(ds["PixelData"])
        body = _splice(buf, parsed, replace)
    out = raw[:128] + b"DICM" + part10.with_transfer_syntax(raw, p, target) + body

    if len(out) >= len(raw):
        raise _Pass("not-smaller")
    if verify:
        _verify(out, image)
    return Result(out, str(target), "compressed", "ok", len(raw), len(out), image.frames,
                  tuple(notes))


def decompress(part10: bytes, max_output: int = MAX_OUTPUT) -> bytes:
    """An uncompressed Explicit VR Little Endian Part-10 version of `part10`, for a peer
    that does not accept its transfer syntax. Explicit VR LE input comes back as is.
    UIDs never change; only what the syntax dictates does (Pixel Data; Photometric
    Interpretation / Planar Configuration / Number of Frames when the decoded data says
    so, e.g. YBR_FULL_422 JPEG -> YBR_FULL; Extended Offset Table removed). Raises
    CodecError when it cannot, and before decoding when the output would be longer than
    `max_output` bytes ("inflated-too-large", "decoded-too-large"): a deflated data set is
    inflated incrementally up to that, and encapsulated pixel data is decoded only when
    what the image attributes say it decodes to fits."""
    part10 = bytes(part10) if not isinstance(part10, bytes) else part10
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _decompress(part10, max_output)
    except _Pass as stop:
        raise CodecError(stop.reason) from None
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"decode-error: {type(e).__name__}") from None
    if len(out) > max_output:  # what the attributes said was not what came out
        raise CodecError("decoded-too-large")
    return out


def _decompress(raw: bytes, max_output: int) -> bytes:
    p = _split_part10(raw)
    ts = UID(p.transfer_syntax)
    head = raw[:128] + b"DICM" + part10.with_transfer_syntax(raw, p, ExplicitVRLittleEndian)
    if ts == ExplicitVRLittleEndian:
        return raw
    if ts in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        buf, base, implicit, _ = _dataset_bytes(raw, p, max_output)
        if not implicit:
            return head + buf[base:]
        parsed = _parse_dataset(buf, implicit=True, base=base)
        return head + _checked_explicit(buf, parsed, frozenset())
    if not (ts.is_transfer_syntax and ts.is_encapsulated):
        raise _Pass("big-endian" if ts == ExplicitVRBigEndian else "unknown-transfer-syntax")

    buf = raw
    parsed = _parse_dataset(buf, implicit=False, base=p.end)
    ds = parsed.ds
    if _PIXEL_DATA not in ds:
        raise _Pass("no-pixel-data")
    if len(raw) + decoded_length(ds) > max_output:
        raise _Pass("decoded-too-large")
    keywords = ("PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames")
    before = {kw: ds.get(kw) for kw in keywords}
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    _pydicom_decompress(ds, as_rgb=False, generate_instance_uid=False)

    replace: dict[int, bytes | None] = {_PIXEL_DATA: _element_bytes(ds["PixelData"])}
    for kw in keywords:
        if kw in ds and ds.get(kw) != before[kw]:
            replace[int(Tag(kw))] = _element_bytes(ds[kw])
    for tag in (*_EOT_TAGS, 0x7FE00000):
        if tag in parsed.spans:
            replace[tag] = None
    return head + _splice(buf, parsed, replace)

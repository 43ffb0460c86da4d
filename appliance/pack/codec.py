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

The codec is four modules: this one (the codec table, `compress`, `decompress` and the
verification), `pack.reasons` (REASONS, Result, CodecError), `pack.elements` (the data
set as top-level elements with their byte spans: parse, splice, implicit -> explicit
VR) and `pack.pixels` (the stored pixel values and their layout). This module
re-exports the names others use from the three.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydicom.dataset import FileMetaDataset
from pydicom.pixels.utils import decompress as _pydicom_decompress
from pydicom.pixels.utils import iter_pixels
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)

from appliance.core import part10
from appliance.pack.elements import (
    _EOT_TAGS,
    _FLOAT_PIXEL_TAGS,
    _PIXEL_DATA,
    _PLANAR_CONFIGURATION,
    _add,
    _checked_explicit,
    _dataset_bytes,
    _element_bytes,
    _native_encoding,
    _parse_dataset,
    _Parsed,
    _same_elements,
    _splice,
    _split_part10,
    _to_explicit,
)
from appliance.pack.pixels import _Image, _int, _Layout, _layout, _source_image, decoded_length
from appliance.pack.reasons import REASONS, Action, CodecError, Result, _Pass

__all__ = [
    "CODECS",
    "REASONS",
    "Action",
    "CodecError",
    "MAX_INFLATED",
    "MAX_OUTPUT",
    "Result",
    "_CODEC_NAMES",
    "_EOT_TAGS",
    "_FLOAT_PIXEL_TAGS",
    "_Image",
    "_Layout",
    "_PIXEL_DATA",
    "_PLANAR_CONFIGURATION",
    "_Parsed",
    "_Pass",
    "_add",
    "_checked_explicit",
    "_dataset_bytes",
    "_decode_frames",
    "_element_bytes",
    "_int",
    "_layout",
    "_native_encoding",
    "_parse_dataset",
    "_passthrough",
    "_pydicom_decompress",
    "_same_elements",
    "_source_image",
    "_splice",
    "_split_part10",
    "_to_explicit",
    "compress",
    "decoded_length",
    "decompress",
]

# codec name -> (transfer syntax, pydicom encoding plugin, extra encoder options)
CODECS: dict[str, tuple[UID, str, dict[str, Any]]] = {
    "jpeg2000": (JPEG2000Lossless, "pylibjpeg", {"use_mct": False}),
    "jpeg-ls": (JPEGLSLossless, "pyjpegls", {}),
}
_CODEC_NAMES = (*CODECS, "none")

# Defaults for the caps; the appliance passes its configured ones (pack: the in-memory
# path's size, pack.stream_threshold_mb; forward: receive.max_instance_mb).
MAX_INFLATED = 64 << 20
MAX_OUTPUT = 4096 << 20


# --- verification ---------------------------------------------------------------------


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

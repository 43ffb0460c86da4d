"""The stored pixel values of a native (uncompressed) image, exactly as they are in the file.

Owns nothing on disk. `_layout` reads the Image Pixel attributes (Rows, Columns, Samples,
Bits Allocated/Stored, Pixel Representation, Frames, Planar Configuration) into a
`_Layout`, `_source_image` turns native Pixel Data into the raw stored values (Bits
Allocated wide, colour-by-pixel) that `pack.codec` encodes and verifies against, and
`decoded_length` is what encapsulated Pixel Data decodes to (checked before decoding).
`pack.codec`'s docstring says why raw values and not pydicom's `pixel_array`.

How it fails: `_Pass(reason)` for an image the codec should not take ("no-pixel-data",
"bits-allocated-N", "pixel-data-length-mismatch", "pixels-outside-bits-stored", ...);
`decoded_length` raises `CodecError("bad-pixel-attributes")`. Nothing here logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from appliance.pack.elements import _FLOAT_PIXEL_TAGS, _PIXEL_DATA
from appliance.pack.reasons import CodecError, _Pass


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

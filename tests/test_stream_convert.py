"""The streaming conversion (appliance/stream_convert.py) of a compressed instance to
Explicit VR Little Endian: byte for byte the data set `codec.decompress` gives, for every
encapsulated sample it can convert and for the appliance's own JPEG 2000 / JPEG-LS
output; a fallback (nothing sent yet) for what it cannot map up front; an error before
the end for what turns out wrong midway. No network: the transport's use of it is in
tests/test_forward_dicom_stream.py."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from appliance.core.errors import IntegrityError
from appliance.forward import convert as stream_convert
from appliance.forward.dicom.contexts import dataset_offset
from appliance.pack import codec
from appliance.pack.codec import CodecError
from tests.peers import SAMPLES
from tests.test_intake import write_multiframe_header
from tests.test_stream_pack import multiframe

# --- helpers ----------------------------------------------------------------------------


class Source:
    """`read(n)` over bytes in small uneven pieces (every boundary gets crossed); notes
    when it returned its end, and can fail after `fail_after` bytes."""

    def __init__(self, data: bytes, piece: int = 1000, fail_after: int | None = None) -> None:
        self.data, self.pos, self.piece = data, 0, piece
        self.fail_after = fail_after
        self.ended = False

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise IntegrityError("bundle changed while it was being read")
        if n < 0:
            n = len(self.data)
        take = min(n, self.piece + self.pos % 7)
        out = self.data[self.pos : self.pos + take]
        self.pos += len(out)
        if not out:
            self.ended = True
        return out


def convert(raw: bytes, piece: int = 1000) -> bytes:
    """The streamed converted data set, read in uneven pieces; its end only after the
    source's."""
    src = Source(raw, piece)
    conv = stream_convert.open_conversion(src.read)
    assert isinstance(conv, stream_convert.Conversion), conv
    parts = []
    while b := conv.read(4096 + len(parts) % 3):
        parts.append(b)
    assert src.ended, "the conversion ended before its source"
    return b"".join(parts)


def whole(raw: bytes) -> bytes:
    out = codec.decompress(raw)
    return out[dataset_offset(out):]


def reencapsulate(raw: bytes, change: Callable[[list[bytes]], bytes]) -> bytes:
    """`raw` (encapsulated) with its Pixel Data rebuilt by `change(frames)`."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    ds.PixelData = change(frames)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def split_frame(index: int) -> Callable[[list[bytes]], bytes]:
    """For `reencapsulate`: Pixel Data without an offset table, frame `index` in two
    fragments, every other frame in one."""
    def change(frames: list[bytes]) -> bytes:
        f = frames[index]
        half = (len(f) // 2) & ~1
        parts = [*frames[:index], f[:half], f[half:], *frames[index + 1:]]
        return b"".join([struct.pack("<HHL", 0xFFFE, 0xE000, 0)]
                        + [struct.pack("<HHL", 0xFFFE, 0xE000, len(p)) + p for p in parts])
    return change


def encapsulated_samples() -> list[str]:
    out = []
    for path in sorted(SAMPLES.rglob("*")):
        if not path.is_file() or path.suffix in (".md", ".json"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception:  # noqa: S112 - not what this test is about
            continue
        if ts.is_encapsulated:
            out.append(str(path.relative_to(SAMPLES)))
    return out


def write_j2k_multiframe(path: Path, frames: int, distinct: int = 16, n: int = 512,
                         seed: int = 5) -> str:
    """A Multi-frame Grayscale Word SC instance in JPEG 2000 Lossless, as the appliance
    encodes it (one fragment per frame, Basic Offset Table): `frames` n x n frames of
    10-bit noise (so the instance stays ~2/3 of its native size), `distinct` different
    ones repeated. Written frame by frame, never whole in memory. Returns the SHA-256 of
    the native Pixel Data it decodes to."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1024, (n, n), dtype="<u2") for _ in range(distinct)]
    opts = {"rows": n, "columns": n, "samples_per_pixel": 1, "bits_allocated": 16,
            "bits_stored": 10, "pixel_representation": 0, "number_of_frames": 1,
            "photometric_interpretation": "MONOCHROME2"}
    encoder = get_encoder(JPEG2000Lossless)
    frags = []
    for a in arrays:
        f = encoder.encode(a, encoding_plugin="pylibjpeg", use_mct=False, **opts)
        frags.append(f + b"\x00" * (len(f) % 2))
    write_multiframe_header(path, frames, n, 10, JPEG2000Lossless, "CONVERT")
    offsets, pos = [], 0
    for i in range(frames):
        offsets.append(pos)
        pos += 8 + len(frags[i % distinct])
    native = hashlib.sha256()
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        f.write(struct.pack(f"<HHL{frames}L", 0xFFFE, 0xE000, 4 * frames, *offsets))
        for i in range(frames):
            frag = frags[i % distinct]
            f.write(struct.pack("<HHL", 0xFFFE, 0xE000, len(frag)) + frag)
            native.update(arrays[i % distinct].tobytes())
        f.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return native.hexdigest()


# --- the same bytes as the whole path ---------------------------------------------------


@pytest.mark.parametrize("rel", encapsulated_samples())
def test_every_convertible_sample_streams_to_what_decompress_gives(rel: str) -> None:
    raw = (SAMPLES / rel).read_bytes()
    try:
        want = whole(raw)
    except CodecError:
        with pytest.raises(CodecError):  # neither path converts it
            convert(raw)
        return
    assert convert(raw) == want


OWN = {
    "mono16": {},
    "mono16-signed": {"signed": 1, "bits_stored": 16},
    "mono8-odd-length": {"bits_allocated": 8, "bits_stored": 8, "frames": 3, "rows": 33, "columns": 31},
    "rgb8": {"samples": 3, "bits_allocated": 8, "bits_stored": 8},
    "rgb8-planar": {"samples": 3, "planar": 1, "bits_allocated": 8, "bits_stored": 8},
    "trailer": {"trailer": True},
    "pixel-group-length": {"pixel_group_length": True},
    "single-frame": {"frames": 1},
}


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("case", list(OWN))
def test_the_appliances_own_output_streams_to_what_decompress_gives(codec_name: str, case: str) -> None:
    r = codec.compress(multiframe(**OWN[case]), codec_name)
    if r.action != "compressed":
        pytest.skip(f"{codec_name} does not take {case}: {r.reason}")
    assert convert(r.data) == whole(r.data)
    # and without a Basic Offset Table (what the appliance writes past 4 GiB)
    no_bot = reencapsulate(r.data, lambda frames: encapsulate(frames, has_bot=False))
    assert convert(no_bot) == whole(no_bot)


def test_a_generated_large_style_instance_streams_to_what_decompress_gives(tmp_path: Path) -> None:
    native = write_j2k_multiframe(tmp_path / "j2k.dcm", frames=6, distinct=3, n=64)
    raw = (tmp_path / "j2k.dcm").read_bytes()
    assert convert(raw, piece=333) == whole(raw)
    ds = pydicom.dcmread(io.BytesIO(codec.decompress(raw)))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert hashlib.sha256(ds.PixelData).hexdigest() == native


# --- decided before sending: the whole path takes it -------------------------------------


def test_what_cannot_stream_falls_back_with_every_byte_read_so_far() -> None:
    r = codec.compress(multiframe(frames=4), "jpeg2000")
    # a Basic Offset Table with fewer entries than frames: pydicom's mapping, not ours
    short_bot = reencapsulate(r.data, lambda frames: _with_bot(frames, entries=3))
    for raw in (multiframe(), short_bot):  # native; BOT not one entry per frame
        src = Source(raw)
        conv = stream_convert.open_conversion(src.read)
        assert isinstance(conv, stream_convert.Fallback)
        assert conv.consumed + src.read() == raw


def _with_bot(frames: list[bytes], entries: int) -> bytes:
    items = [struct.pack("<HHL", 0xFFFE, 0xE000, len(f)) + f for f in frames]
    offsets = [sum(len(i) for i in items[:k]) for k in range(entries)]
    bot = struct.pack(f"<HHL{entries}L", 0xFFFE, 0xE000, 4 * entries, *offsets)
    return bot + b"".join(items)


def test_an_instance_without_a_decoder_is_refused_before_anything_is_sent() -> None:
    raw = (SAMPLES / "transfer_syntax/WG04/CT2/CT2_JPLL").read_bytes()
    with pytest.raises(CodecError, match="no decoder"):
        stream_convert.open_conversion(Source(raw).read)


# --- found out midway: an error before the end ------------------------------------------


def drain(raw: bytes, fail_after: int | None = None) -> tuple[Exception, Source]:
    """Convert `raw` to the end, which must fail: (the error, the source)."""
    src = Source(raw, piece=4096, fail_after=fail_after)
    with pytest.raises(Exception) as e:  # noqa: B017, PT011 - checked by the callers
        conv = stream_convert.open_conversion(src.read)
        assert isinstance(conv, stream_convert.Conversion)
        while conv.read(65536):
            pass
    return e.value, src


def test_frames_split_across_fragments_without_an_offset_table_go_the_whole_way() -> None:
    # pydicom's whole path groups such fragments by their end-of-image markers; the
    # streamed one cannot know a frame's fragments up front, so it hands the instance over
    # before anything is sent, and the whole path converts it
    r = codec.compress(multiframe(frames=4), "jpeg2000")
    raw = reencapsulate(r.data, lambda frames: encapsulate(frames, fragments_per_frame=2, has_bot=False))
    src = Source(raw)
    conv = stream_convert.open_conversion(src.read)
    assert isinstance(conv, stream_convert.Fallback) and "first fragment" in conv.reason
    rebuilt = conv.consumed + src.read()
    assert rebuilt == raw
    assert whole(rebuilt) == whole(r.data)


def test_a_later_frame_split_across_fragments_fails_before_the_end() -> None:
    # the first frame whole, the second in two fragments, no offset table: seen only
    # when the fragments outnumber the frames or a half frame does not decode
    r = codec.compress(multiframe(frames=4), "jpeg2000")
    raw = reencapsulate(r.data, split_frame(1))
    err, _ = drain(raw)
    assert isinstance(err, CodecError)
    assert "offset table" in str(err) or "decode" in str(err)


def test_a_corrupt_frame_midway_fails_before_the_end() -> None:
    r = codec.compress(multiframe(frames=6), "jpeg2000")

    def spoil(frames: list[bytes]) -> bytes:
        frames[4] = b"\x00" * len(frames[4])  # no codestream at all
        return encapsulate(frames, has_bot=True)

    raw = reencapsulate(r.data, spoil)
    err, _ = drain(raw)
    assert isinstance(err, CodecError) and "decode-error" in str(err)
    ds = pydicom.dcmread(io.BytesIO(r.data), stop_before_pixels=True)
    assert str(ds.SOPInstanceUID) not in str(err)


def test_a_source_that_fails_midway_propagates_its_error() -> None:
    r = codec.compress(multiframe(frames=6), "jpeg-ls")
    err, _ = drain(r.data, fail_after=len(r.data) // 2)
    assert isinstance(err, IntegrityError)

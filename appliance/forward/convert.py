"""Streaming counterpart of `codec.decompress` for a large instance: an encapsulated
(compressed) Part-10 instance read piece by piece becomes the data set of its Explicit VR
Little Endian version, decoded frame by frame, with memory bounded by a chunk and a
frame or two whatever the instance's size.

The output is byte for byte the data set `codec.decompress` gives (its bytes from
`dataset_offset`), so a PACS gets the same instance whichever path the transport took:

* The header (the elements before Pixel Data) is spliced as `codec._decompress` splices
  it: every element keeps its exact encoding but Photometric Interpretation, Planar
  Configuration and Number of Frames, which get the values pydicom's
  `decompress(ds, as_rgb=False, generate_instance_uid=False)` gives them (from the decoded
  frame's pixel properties, so the first frame is decoded before the header goes out),
  and the Extended Offset Table elements and (7FE0,0000), which are removed.
* Pixel Data becomes native, VR OB (Bits Allocated <= 8) or OW, its length the decoded
  frames' total padded to even, the frames decoded one at a time with pydicom's decoder
  for the syntax and the options `decompress` uses (`iter_array(as_rgb=False)`, the
  dataset's Image Pixel attributes), each frame handed to it alone, which yields the
  bytes the whole-dataset decode gives for that frame. Every frame must decode to the
  first one's size and pixel properties.
* The elements after Pixel Data go out unchanged (at most `stream_pack.MAX_TAIL` bytes;
  they must parse, and come after Pixel Data).

Frames come from the fragments as pydicom maps them, in the cases that can be mapped
while reading forward: the Extended Offset Table (one fragment per frame, each checked
against its offset and length), the Basic Offset Table when it has one entry per frame
(pydicom's own assignment of fragments to frames by offset), all fragments for a
single-frame instance, and one fragment per frame for a multi-frame instance without an
offset table (what the appliance's own JPEG 2000 / JPEG-LS output is when an offset
would not fit in 32 bits). In that last case the first fragment must end with an
end-of-image marker and decode alone, else the whole path takes the instance (it groups
fragments by those markers, as pydicom does); a later frame split across fragments shows
only as it is read.

`open_conversion(read)` reads up to the end of the first frame and decides:

* `Fallback(reason, consumed)`: this path cannot take the instance (not encapsulated,
  header too long or out of order, an offset table whose entries are not one per frame,
  ...); nothing was sent, and `consumed` plus the rest of the source is the whole
  instance for `codec.decompress`.
* `CodecError`: the instance cannot be decompressed at all (no decoder installed, the
  first frame does not decode, decoded pixel data over 4 GiB), as `codec.decompress`
  would say after reading it whole.
* a `Conversion`: `read(n)` gives the converted data set; b"" only once the source
  returned b"" (for a bundle's `InstanceStream`: the instance verified). Anything that
  turns out wrong later (a frame that does not decode or decodes to another size,
  fragments that are not one per frame, a trailer that does not parse) raises
  `CodecError` from `read`, before the end: the caller must then abandon what it sent
  (the transport aborts the association, so the PACS stores nothing).

Each frame is decoded by a decoder run of its own, which tries the installed plugins in
order; pydicom's whole-dataset decode sticks to the plugin that decoded the first frame.
The two agree because only one plugin is installed per syntax (pylibjpeg/OpenJPEG for
JPEG 2000, pyjpegls/CharLS for JPEG-LS, pydicom's own RLE); installing a second one
(e.g. gdcm) would call for pinning `decoding_plugin`.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID, RLELossless

from appliance.core import part10
from appliance.pack import codec
from appliance.pack import stream as stream_pack
from appliance.pack.codec import CodecError, _Pass

PIECE = stream_pack.PIECE
_EOI = b"\xff\xd9"  # end of a JPEG, JPEG-LS or JPEG 2000 codestream
_KEYWORDS = ("PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames")
_MAX_PIXEL_LENGTH = 2**32 - 1  # pydicom's limit for the decoded value


class _Fallback(Exception):
    """Internal: decided before sending anything; the whole path takes the instance."""


@dataclass(frozen=True)
class Fallback:
    reason: str
    consumed: bytes  # what was read from the source: put it in front of the rest


class _Recorder:
    """The source's chunks, kept while `kept` is not None (until the decision)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.kept: list[bytes] | None = []

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self._read(PIECE):
            if self.kept is not None:
                self.kept.append(chunk)
            yield chunk


def open_conversion(read: Callable[[int], bytes],
                    max_output: int = codec.MAX_OUTPUT) -> Conversion | Fallback:
    """Start converting the Part-10 instance `read(n)` returns piece by piece (b"" at
    its end); see the module documentation. CodecError "decoded-too-large" when the
    decoded pixel data would make the data set longer than `max_output` bytes: checked
    from the image attributes before any frame is decoded, and again from the first
    frame. Exceptions of `read` propagate."""
    rec = _Recorder(read)
    inp = stream_pack._Input(iter(rec), digest=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = _start(inp, max_output)
    except _Fallback as f:
        return Fallback(str(f), b"".join(rec.kept or ()))
    except _Pass as stop:  # the first frame cannot be read: neither path can convert it
        raise CodecError(stop.reason) from None
    rec.kept = None
    return conv


@dataclass
class _Plan:
    decoder: Decoder
    options: dict[str, Any]
    frames: int
    cap: int  # most encoded bytes one frame may take
    guessed: bool = False  # multi-frame without an offset table: one fragment per frame assumed

    def failed(self, what: str) -> str:
        return what + ("; without an offset table each fragment was taken as a frame"
                       if self.guessed else "")


def _start(inp: stream_pack._Input, max_output: int) -> Conversion:
    head, p = stream_pack._read_head(inp)
    if p is None:
        raise _Fallback("not a Part-10 file")
    ts = UID(p.transfer_syntax)
    if not (ts.is_transfer_syntax and ts.is_encapsulated):
        raise _Fallback("not an encapsulated transfer syntax")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise CodecError(f"no decoder for {ts.name}") from None
    if not decoder.is_available:
        raise CodecError(f"no decoder is installed for {ts.name}")

    while (px := stream_pack._pixel_element(bytes(head), p.end, False)) is None:
        if inp.eof:
            raise _Fallback("no pixel data found")
        if len(head) >= stream_pack.MAX_HEAD:
            raise _Fallback("header too long")
        head += inp.read(len(head))
    if px.vr not in (b"OB", b"OW") or px.length != part10.UNDEFINED:
        raise _Fallback("pixel data not encapsulated")
    vr = px.vr
    inp.unread(bytes(head[px.value :]))
    hbuf = bytes(head[p.end : px.start])
    del head
    try:
        parsed = codec._parse_dataset(hbuf, implicit=False)
    except _Pass as stop:
        raise _Fallback(f"header: {stop.reason}") from None
    if parsed.end != len(hbuf) or any(t >= codec._PIXEL_DATA for t in parsed.spans):
        raise _Fallback("header elements out of order")
    ds = parsed.ds
    try:
        opts = as_pixel_options(ds)
        frames = int(opts["number_of_frames"])
        bits = int(ds.BitsAllocated)
        frame_size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * ((bits + 7) // 8)
    except Exception:
        raise _Fallback("image pixel attributes missing or invalid") from None
    if len(hbuf) + frame_size * frames > max_output:
        raise CodecError("decoded-too-large")
    eot = _extended_offsets(ds, parsed.spans, frames)
    opts.pop("extended_offsets", None)
    opts.update(number_of_frames=1, pixel_keyword="PixelData", pixel_vr=vr.decode())
    bot = _basic_offsets(inp)
    if bot and eot is None and len(bot) != frames:
        raise _Fallback("Basic Offset Table entries are not one per frame")
    plan = _Plan(decoder, opts, frames, 2 * frame_size + (1 << 20),
                 guessed=frames > 1 and not bot and eot is None)
    encoded = _frames(inp, plan, bot, eot)

    frame = _next_frame(encoded, 0)
    if plan.guessed:
        # Without an offset table a frame may span several fragments; pydicom's whole
        # path groups them by their end-of-image marker. Unless the first fragment is
        # one whole frame, that path takes the instance (nothing has been sent yet).
        if ts != RLELossless and not frame.rstrip(b"\x00").endswith(_EOI):
            raise _Fallback("no offset table, and the first fragment is not a whole frame")
        try:
            first, props = _decode(plan, frame, 0)
        except CodecError:
            raise _Fallback("no offset table, and the first fragment does not decode alone") from None
    else:
        first, props = _decode(plan, frame, 0)
    del frame
    total = len(first) * frames
    if total >= _MAX_PIXEL_LENGTH:
        raise CodecError("the decoded pixel data would be longer than 4 GiB")
    if len(hbuf) + total > max_output:
        raise CodecError("decoded-too-large")
    before = {kw: ds.get(kw) for kw in _KEYWORDS}
    ds.PhotometricInterpretation = props["photometric_interpretation"]
    if int(props["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = props["planar_configuration"]
    if "NumberOfFrames" in ds or frames > 1:
        ds.NumberOfFrames = frames
    replace: dict[int, bytes | None] = {}
    for kw in _KEYWORDS:
        if kw in ds and ds.get(kw) != before[kw]:
            replace[int(ds[kw].tag)] = codec._element_bytes(ds[kw])
    for tag in (*codec._EOT_TAGS, 0x7FE00000):
        if tag in parsed.spans:
            replace[tag] = None
    pixel_vr = b"OB" if bits <= 8 else b"OW"
    header = codec._splice(hbuf, parsed, replace) + part10.element_header(
        part10.PIXEL_DATA, pixel_vr, total + total % 2)
    return Conversion(inp, plan, encoded, header, first, props, total % 2 == 1, set(parsed.spans))


def _extended_offsets(ds: Any, spans: dict[int, tuple[int, int]],
                      frames: int) -> tuple[list[int], list[int]] | None:
    eot, lengths = (t in spans for t in codec._EOT_TAGS)
    if not eot:
        return None
    if not lengths:
        raise _Fallback("Extended Offset Table without its lengths")
    try:
        raw_offsets, raw_lengths = bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths)
        offsets = list(struct.unpack(f"<{len(raw_offsets) // 8}Q", raw_offsets))
        sizes = list(struct.unpack(f"<{len(raw_lengths) // 8}Q", raw_lengths))
    except Exception:
        raise _Fallback("Extended Offset Table unreadable") from None
    if len(offsets) != frames or len(sizes) != frames:
        raise _Fallback("Extended Offset Table entries are not one per frame")
    return offsets, sizes


def _item_header(inp: stream_pack._Input) -> tuple[int, int]:
    try:
        return part10.item_header(inp.read(8))
    except part10.Truncated:
        raise _Pass("the pixel data ends early") from None


def _basic_offsets(inp: stream_pack._Input) -> list[int]:
    tag, length = _item_header(inp)
    if tag != part10.ITEM or length % 4 or length > stream_pack.MAX_HEAD:
        raise _Fallback("no valid Basic Offset Table item")
    raw = inp.read(length)
    if len(raw) != length:
        raise _Fallback("the pixel data ends early")
    return list(struct.unpack(f"<{length // 4}L", raw))


def _fragments(inp: stream_pack._Input, cap: int) -> Iterator[tuple[int, bytes]]:
    """(offset from the first item after the Basic Offset Table, value) of each fragment
    item, up to the sequence delimiter."""
    pos = 0
    while True:
        tag, length = _item_header(inp)
        if tag == part10.SEQUENCE_DELIMITER:
            return
        if tag != part10.ITEM or length == part10.UNDEFINED:
            raise _Pass("the pixel data has an item that is not a fragment")
        if length > cap:
            raise _Pass("a fragment is larger than any frame can be")
        value = inp.read(length)
        if len(value) != length:
            raise _Pass("the pixel data ends early")
        yield pos, value
        pos += 8 + length


def _frames(inp: stream_pack._Input, plan: _Plan, bot: list[int],
            eot: tuple[list[int], list[int]] | None) -> Iterator[bytes]:
    """Each frame's encoded bytes, as pydicom's `generate_frames` would join them. Raises
    _Pass when the fragments cannot be frames (found out as they are read)."""
    frags = _fragments(inp, plan.cap)
    if eot is not None:
        offsets, sizes = eot
        for i, (pos, value) in enumerate(frags):
            if i >= plan.frames or pos != offsets[i] or len(value) != sizes[i]:
                raise _Pass("the fragments do not match the Extended Offset Table")
            yield value
        return
    if bot:  # pydicom's assignment: a fragment starting before the next offset is this frame's
        frame: list[bytes] = []
        size = index = 0
        for pos, value in frags:
            if index == len(bot) - 1 or pos < bot[index + 1]:
                frame.append(value)
                size += len(value)
                if size > plan.cap:
                    raise _Pass("a frame is larger than any frame can be")
            else:
                yield b"".join(frame)
                index += 1
                frame, size = [value], len(value)
        yield b"".join(frame)
        return
    if plan.frames == 1:
        parts: list[bytes] = []
        size = 0
        for _, value in frags:
            parts.append(value)
            size += len(value)
            if size > plan.cap:
                raise _Pass("a frame is larger than any frame can be")
        yield b"".join(parts)
        return
    for i, (_, value) in enumerate(frags):
        if i >= plan.frames:
            raise _Pass("more fragments than frames, and no offset table to group them")
        yield value


def _next_frame(encoded: Iterator[bytes], index: int) -> bytes:
    try:
        return next(encoded)
    except StopIteration:
        raise _Pass(f"fewer frames than Number of Frames ({index} found)") from None


def _decode(plan: _Plan, frame: bytes, index: int) -> tuple[bytes, dict[str, Any]]:
    """Frame `index` decoded as `decompress` decodes it within the whole dataset."""
    src = part10.item(b"") + part10.item(frame)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, props = next(plan.decoder.iter_array(src, as_rgb=False, **plan.options))
    except Exception as e:
        raise CodecError(plan.failed(f"decode-error: frame {index + 1} of {plan.frames} does not "
                                     f"decode ({type(e).__name__})")) from None
    return arr.tobytes(), dict(props)


class Conversion:
    """The converted data set, read as it is decoded (a `link.DataSource`)."""

    def __init__(self, inp: stream_pack._Input, plan: _Plan, encoded: Iterator[bytes],
                 header: bytes, first: bytes, props: dict[str, Any], pad: bool,
                 header_tags: set[int]) -> None:
        self._inp = inp
        self._pieces = self._generate(plan, encoded, header, first, props, pad, header_tags)
        self._cur = memoryview(b"")

    @property
    def bytes_read(self) -> int:
        """Bytes of the instance read from the source so far."""
        return self._inp.size

    def read(self, n: int, /) -> bytes:
        while not self._cur:
            try:
                self._cur = memoryview(next(self._pieces))
            except StopIteration:
                return b""
            except _Pass as stop:
                raise CodecError(stop.reason) from None
        out = bytes(self._cur[:n])
        self._cur = self._cur[n:]
        return out

    def _generate(self, plan: _Plan, encoded: Iterator[bytes], header: bytes, first: bytes,
                  props: dict[str, Any], pad: bool, header_tags: set[int]) -> Iterator[bytes]:
        yield header
        yield first
        size = len(first)
        del first
        for index in range(1, plan.frames):
            frame, got = _decode(plan, _next_frame(encoded, index), index)
            if len(frame) != size:
                raise _Pass(plan.failed(f"frame {index + 1} decodes to {len(frame)} bytes, not {size}"))
            if got != props:
                raise _Pass(f"frame {index + 1} decodes with other pixel properties than the first")
            yield frame
        if next(encoded, None) is not None:
            raise _Pass("more frames than Number of Frames")
        if pad:
            yield b"\x00"
        yield self._tail(header_tags)

    def _tail(self, header_tags: set[int]) -> bytes:
        """The elements after Pixel Data, read to the end of the source (verified)."""
        tail = self._inp.read(stream_pack.MAX_TAIL + 1)
        if len(tail) > stream_pack.MAX_TAIL:
            raise _Pass("the elements after the pixel data are too long")
        if tail:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tags = set(codec._parse_dataset(tail, implicit=False).spans)
            if any(t <= codec._PIXEL_DATA for t in tags) or tags & header_tags:
                raise _Pass("the elements after the pixel data are out of order")
        return tail


__all__ = ["Conversion", "Fallback", "open_conversion"]

"""Streaming pack of one large instance: memory bounded by a chunk and a few frames.

The in-memory path (`pack.prepare` -> `codec.compress`) holds several copies of an
instance (docs/benchmarks.md, "Memory": a 1 GiB multi-frame instance took the worker to
4.4 GiB). Above `pack.stream_threshold_mb` the packer uses this module instead:

`prepare_stream` (in a codec worker) reads the sealed spool file chunk by chunk, hashing
as it goes, and collects the header up to the top-level (7FE0,0010) element. The header
gets the same treatment as in `codec` (file meta with the new Transfer Syntax UID and a
recomputed group length, Planar Configuration 1 -> 0, (7FE0,0000) removed, implicit VR
re-encoded as explicit VR and checked element by element; explicit VR spliced byte for
byte). Then native Pixel Data is encoded **frame by frame** with pydicom's encoder for
the syntax (the same call `Dataset.compress` makes per frame, with the same options, so
the fragments are byte for byte those of the in-memory path), each frame decoded again
and compared at once when verifying. Fragment items, the sequence delimiter and any
elements after Pixel Data go to a temp file in the spool directory, sealed under a fresh
random key (STREAM, so nothing on disk is readable and the pack thread detects any
change); the worker returns only small facts: the output's head up to and including the
Basic Offset Table (`prefix`), the temp's name and key, sizes and digests. The output
counts only once the whole input authenticated: the worker always reads the input to
its end (that is also how it gets the digest the manifest needs).

Whatever this path cannot or should not compress (already compressed, deflated, odd bit
depths, pixels above Bits Stored, a header or trailer too long to hold, a verification
mismatch, a full disk for the temp...) comes back as a pass-through: the pack thread then
copies the sealed spool stream into the bundle chunk by chunk (`copy_passthrough`), never
reading the instance whole. The reasons are those of `codec.REASONS`.

The pack thread writes `prefix`, then the temp's plaintext in 1 MiB pieces
(`copy_output`), and checks the size of what it wrote against the worker's (the temp's
STREAM seal, under a key only the worker and the pack thread know, already proves its
bytes). The temp is named by the packer (so it can always remove it, even after a worker
was killed) and starts with `durable.TEMP_PREFIX`, so a crash leaves nothing that
`Spool.recover` does not remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID

from appliance.core import crypto, part10
from appliance.core.errors import IntegrityError
from appliance.pack import codec
from appliance.pack.codec import _Pass

PIECE = crypto.DEFAULT_CHUNK
MAX_HEAD = 32 << 20  # header before Pixel Data held in memory; longer -> pass-through
MAX_TAIL = 16 << 20  # elements after Pixel Data held in memory; longer -> pass-through
TEMP_AAD = b"appliance pack temp v1"
MEDIA_STORAGE_SOP_CLASS, MEDIA_STORAGE_SOP_INSTANCE = 0x00020002, 0x00020003

_PIXEL_HEADER = part10.element_header(part10.PIXEL_DATA, b"OB", part10.UNDEFINED)


@dataclass(frozen=True)
class Streamed:
    """What a worker sends back for one large instance: small facts only.

    `facts` is None when the workers died on the instance, large or small (the pack
    thread then reads the facts itself, streaming, and passes the instance through)."""

    facts: dict[str, Any] | None
    transfer_syntax: str
    action: str  # "compressed" | "passthrough"
    reason: str
    prefix: bytes = field(default=b"", repr=False)  # output head .. Basic Offset Table item
    temp_key: bytes = field(default=b"", repr=False)
    output_size: int = 0
    frames: int = 0
    notes: tuple[str, ...] = ()


class _Input:
    """The verified plaintext of a sealed spool file as a forward-only reader that
    hashes (unless `digest` is False: the source checks itself) and counts everything
    it pulls."""

    def __init__(self, chunks: Iterator[bytes], digest: bool = True) -> None:
        self._chunks = chunks
        self._cur = memoryview(b"")
        self.hash = hashlib.sha256() if digest else None
        self.size = 0
        self.eof = False

    def _pull(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = next(self._chunks)  # IntegrityError propagates: nothing of it is used
        except StopIteration:
            self.eof = True
            return False
        if self.hash is not None:
            self.hash.update(chunk)
        self.size += len(chunk)
        self._cur = memoryview(chunk)
        return True

    def unread(self, data: bytes) -> None:
        """Put `data` (the last bytes read) back in front of the stream."""
        self._cur = memoryview(bytes(data) + bytes(self._cur))

    def read(self, n: int) -> bytes:
        """Exactly `n` bytes, fewer only at the end of the stream."""
        parts: list[memoryview] = []
        while n > 0:
            if not len(self._cur) and not self._pull():
                break
            take = self._cur[:n]
            parts.append(take)
            self._cur = self._cur[len(take):]
            n -= len(take)
        return b"".join(parts)

    def drain(self) -> None:
        """Read to the end: authenticates the last chunk and completes the digest."""
        self._cur = memoryview(b"")
        while self._pull():
            self._cur = memoryview(b"")


class _SealedTemp:
    """Write-only temp file: plaintext in, STREAM-sealed 1 MiB chunks out, under a
    fresh random key; counts and hashes the plaintext."""

    def __init__(self, path: str) -> None:
        self.key = os.urandom(crypto.KEY_LEN)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            raise _Pass("temp-write-error") from None
        self._f = os.fdopen(fd, "wb")
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._sealer = crypto.stream_seal_chunks(self.key, TEMP_AAD, self._feed())
        self.size = 0
        self.hash = hashlib.sha256()

    def _feed(self) -> Iterator[bytes]:
        while self._pending:
            yield self._pending.pop(0)

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        self._buf += data
        while len(self._buf) > PIECE:  # keep >= 1 byte back: the last chunk is never empty
            self._pending.append(bytes(self._buf[:PIECE]))
            del self._buf[:PIECE]
            if len(self._pending) >= 2:  # the sealer looks one chunk ahead
                self._put(next(self._sealer))

    def _put(self, ct: bytes) -> None:
        try:
            self._f.write(ct)
        except OSError:  # a full disk: pass the instance through instead
            raise _Pass("temp-write-error") from None

    def close(self) -> None:
        self._pending.append(bytes(self._buf))
        self._buf.clear()
        for ct in self._sealer:
            self._put(ct)
        try:
            self._f.close()
        except OSError:
            raise _Pass("temp-write-error") from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


# --- the header ------------------------------------------------------------------------


def _pixel_element(head: bytes, start: int, implicit: bool) -> part10.Element | None:
    """The top-level (7FE0,0010) element's header when it (and all the elements before
    it) are in `head`, else None."""
    try:
        return part10.locate(head, start, implicit, part10.PIXEL_DATA)
    except part10.Malformed:
        return None  # cut in the middle of an element: read more (or give up at the end)


def meta_facts(buf: bytes | bytearray | memoryview, m: part10.Meta | None) -> dict[str, Any]:
    """The bundle manifest's facts about an instance, from its file meta `m` in `buf`
    only: the spool holds our own meta, written by receive from the C-STORE request, so
    nothing of the data set is parsed (or inflated) for them. "" for what is missing."""
    if m is None:
        return {"sop_instance_uid": "", "sop_class": "", "received_transfer_syntax": ""}
    return {"sop_instance_uid": m.value(buf, MEDIA_STORAGE_SOP_INSTANCE) or "",
            "sop_class": m.value(buf, MEDIA_STORAGE_SOP_CLASS) or "",
            "received_transfer_syntax": m.transfer_syntax}


def _read_head(inp: _Input) -> tuple[bytearray, part10.Meta | None]:
    """Read until the file meta is complete and the 8 bytes after it are in (or the
    input ends, or MAX_HEAD is reached, or it is not Part 10): the first read may end
    anywhere, even inside the preamble or a meta element."""
    head = bytearray(inp.read(PIECE))
    while True:
        more = not inp.eof and len(head) < MAX_HEAD
        try:
            p = codec._split_part10(bytes(head))
            if not (more and p.end + 8 > len(head)):  # not cut at the buffer's end
                return head, p
        except _Pass:
            if not more or (len(head) >= 132 and head[128:132] != b"DICM"):
                return head, None
        head += inp.read(max(len(head), 132))


@dataclass
class _Header:
    p: part10.Meta
    implicit: bool
    head: bytes  # preamble .. end of the Pixel Data element header
    pixel: int  # offset of the Pixel Data element in `head`
    value_length: int


def _locate(inp: _Input, head: bytearray, p: part10.Meta) -> _Header:
    encoding = codec._native_encoding(p.transfer_syntax)  # or the in-memory path's reason
    if encoding == "deflated":
        # Never inflated here: a large deflated instance is sent as it came (it is
        # compressed already), so this path needs no cap on inflation.
        raise _Pass("stream-unsupported")
    implicit = encoding == "implicit"
    while (px := _pixel_element(bytes(head), p.end, implicit)) is None:
        if inp.eof:
            raise _Pass("no-pixel-data")
        if len(head) >= MAX_HEAD:
            raise _Pass("stream-unsupported")
        head += inp.read(len(head))
    if (not implicit and px.vr not in (b"OB", b"OW")) or px.length == part10.UNDEFINED:
        raise _Pass("bad-pixel-data")
    inp.unread(bytes(head[px.value :]))
    return _Header(p, implicit, bytes(head[: px.value]), px.start, px.length)


# --- the whole instance ---------------------------------------------------------------


def prepare_stream(path: str, rid: str, spool_key: bytes, codec_name: str, verify: bool,
                   temp_path: str) -> Streamed:
    """In a codec worker: read, authenticate and compress one spooled instance, streaming.

    Raises IntegrityError (the spool file fails authentication) or FileNotFoundError, and
    then leaves no temp file. Otherwise returns a `Streamed`; for "compressed" the output
    is `prefix` + the plaintext of the sealed temp at `temp_path`.
    """
    if codec_name not in codec.CODECS and codec_name != "none":
        raise ValueError(f"unknown codec {codec_name!r}")
    with open(path, "rb") as f:
        inp = _Input(crypto.open_spool_file(crypto.SpoolKey(spool_key), rid, f))
        head, p = _read_head(inp)
        facts = meta_facts(head, p)
        ts_in = p.transfer_syntax if p and UID(p.transfer_syntax).is_valid else ""
        out: _SealedTemp | None = None
        reason = ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if p is None:
                    codec._split_part10(bytes(head))  # raises the reason
                    raise _Pass("unparseable")
                if codec_name == "none":
                    raise _Pass("codec-none")
                hdr = _locate(inp, head, p)
                del head
                out = _SealedTemp(temp_path)
                res = _encode(inp, hdr, codec_name, verify, out)
        except _Pass as stop:
            reason = stop.reason
        except Exception as e:
            if isinstance(e, IntegrityError | OSError):  # the input: the packer's to handle
                _discard(out, temp_path)
                raise
            reason = "unparseable"  # the boundary: bad input never escapes as an exception
        except BaseException:
            _discard(out, temp_path)
            raise
        if reason:
            _discard(out, temp_path)
            inp.drain()  # authenticate all of it, and finish the digest, before using it
            return Streamed(_with_digest(facts, inp), ts_in, "passthrough", reason)
    assert out is not None
    return Streamed(_with_digest(facts, inp), res.transfer_syntax, "compressed", "ok",
                    res.prefix, out.key, res.output_size, res.frames, res.notes)


def _discard(out: _SealedTemp | None, temp_path: str) -> None:
    if out is not None:
        out.abort()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp_path)


def _with_digest(facts: dict[str, Any], inp: _Input) -> dict[str, Any]:
    assert inp.hash is not None
    return {**facts, "received_size": inp.size, "received_sha256": inp.hash.hexdigest()}


@dataclass
class _Encoded:
    transfer_syntax: str
    prefix: bytes
    output_size: int
    frames: int
    notes: tuple[str, ...]


def _encode(inp: _Input, hdr: _Header, codec_name: str, verify: bool, out: _SealedTemp) -> _Encoded:
    target, plugin, options = codec.CODECS[codec_name]
    p = hdr.p
    hbuf = hdr.head[p.end : hdr.pixel]
    parsed = codec._parse_dataset(hbuf, hdr.implicit)
    if parsed.end != len(hbuf):
        raise _Pass("unparseable")
    if any(t > codec._PIXEL_DATA for t in parsed.spans):
        raise _Pass("stream-unsupported")  # out of order: which is "after Pixel Data"?
    if any(t in parsed.spans for t in codec._EOT_TAGS):
        raise _Pass("too-large")  # what the in-memory path says for these
    ds = parsed.ds
    lay = codec._layout(ds)
    expected = lay.expected_length
    if not (hdr.value_length == expected or (expected % 2 and hdr.value_length == expected + 1)):
        raise _Pass("pixel-data-length-mismatch")

    notes = ["implicit-vr-converted"] if hdr.implicit else []
    replace: dict[int, bytes | None] = {}
    if lay.samples > 1 and lay.planar == 1:
        ds.PlanarConfiguration = 0
        replace[codec._PLANAR_CONFIGURATION] = codec._element_bytes(ds["PlanarConfiguration"])
        notes.append("planar-configuration-0")
    if 0x7FE00000 in parsed.spans:
        replace[0x7FE00000] = None
        del ds[0x7FE00000]
        notes.append("pixel-group-length-removed")
    opts = as_pixel_options(ds, **options)
    opts["number_of_frames"] = 1
    decode_opts = {k: v for k, v in opts.items() if k not in options}

    # header first: a failing implicit -> explicit rewrite stops before any encoding
    if hdr.implicit:
        skip = frozenset({codec._PIXEL_DATA, codec._PLANAR_CONFIGURATION}
                         if "planar-configuration-0" in notes else {codec._PIXEL_DATA})
        body = codec._checked_explicit(hbuf, parsed, skip)
    else:
        body = codec._splice(hbuf, parsed, replace)
    head = (hdr.head[:128] + b"DICM" + part10.with_transfer_syntax(hdr.head, p, target) + body
            + _PIXEL_HEADER)

    encoder, decoder = get_encoder(target), get_decoder(target)
    lengths: list[int] = []
    shape = (lay.rows, lay.columns, lay.samples)
    for _ in range(lay.frames):
        raw = inp.read(lay.frame_length)
        if len(raw) != lay.frame_length:
            raise _Pass("pixel-data-length-mismatch")
        values = lay.shape(np.frombuffer(raw, dtype=lay.dtype), 1)
        lay.check_range(values)
        arr = values[0, ..., 0] if lay.samples == 1 else values[0]
        try:
            frag = encoder.encode(arr, encoding_plugin=plugin, **opts)
        except Exception:
            raise _Pass("encode-error") from None
        if len(frag) % 2:
            frag += b"\x00"
        item = part10.item(frag)
        if verify:
            _verify_frame(decoder, item, decode_opts, values[0], shape)
        out.write(item)
        lengths.append(len(item))
    if hdr.value_length != expected and len(inp.read(1)) != 1:
        raise _Pass("pixel-data-length-mismatch")

    tail = inp.read(MAX_TAIL + 1)
    if len(tail) > MAX_TAIL:
        raise _Pass("stream-unsupported")
    inp.drain()  # the end of the input authenticated: only now may the output count
    tail_tags: set[int] = set()
    if tail:
        tparsed = codec._parse_dataset(tail, hdr.implicit)
        tail_tags = set(tparsed.spans)
        if any(t <= codec._PIXEL_DATA for t in tail_tags):
            raise _Pass("stream-unsupported")
        if hdr.implicit:
            tail = codec._checked_explicit(tail, tparsed, frozenset())
    if hdr.implicit and any(t & 0xFFFF == 0 for t in (*parsed.spans, *tail_tags)):
        notes.append("group-lengths-removed")
    out.write(part10.SEQUENCE_DELIMITER_ITEM + tail)
    out.close()

    prefix = head + part10.basic_offset_table(lengths)
    size = len(prefix) + out.size
    if size >= inp.size:
        raise _Pass("not-smaller")
    return _Encoded(str(target), prefix, size, lay.frames, tuple(notes))


def _verify_frame(decoder: Any, item: bytes, opts: dict[str, Any], want: np.ndarray,
                  shape: tuple[int, int, int]) -> None:
    try:
        got = decoder.as_array(part10.item(b"") + item, raw=True, **opts)[0]
    except Exception:
        raise _Pass("verify-error") from None
    if got.size != want.size or not np.array_equal(got.reshape(shape), want):
        raise _Pass("verify-mismatch")


# --- in the pack thread -----------------------------------------------------------------


def _write_pieces(writer: Any, pieces: Iterator[bytes]) -> None:
    for piece in pieces:
        writer.write(piece)


def copy_output(writer: Any, s: Streamed, temp_path: str) -> None:
    """Write a compressed instance's output into the current bundle instance."""
    writer.write(s.prefix)
    with open(temp_path, "rb") as f:
        _write_pieces(writer, crypto.stream_open(s.temp_key, TEMP_AAD, f, PIECE))


def copy_passthrough(writer: Any, path: str, rid: str, spool_key: bytes) -> None:
    """Write the spooled instance unchanged into the current bundle instance, chunk by
    chunk. The caller compares the digest of what was written with the worker's."""
    with open(path, "rb") as f:
        _write_pieces(writer, crypto.open_spool_file(crypto.SpoolKey(spool_key), rid, f))


def passthrough_facts(path: str, rid: str, spool_key: bytes, reason: str) -> Streamed:
    """Facts for a pass-through, read streaming (after a worker died on the instance)."""
    with open(path, "rb") as f:
        inp = _Input(crypto.open_spool_file(crypto.SpoolKey(spool_key), rid, f))
        head, p = _read_head(inp)
        facts = meta_facts(head, p)
        ts_in = p.transfer_syntax if p and UID(p.transfer_syntax).is_valid else ""
        del head
        inp.drain()
    return Streamed(_with_digest(facts, inp), ts_in, "passthrough", reason)


def check_written(entry: Any, size: int, sha256: str | None) -> None:
    """What went into the bundle must be what the worker described."""
    if entry.size != size or (sha256 is not None and entry.sha256 != sha256):
        raise IntegrityError("streamed instance changed between reading and writing")


__all__ = ["MAX_HEAD", "MAX_TAIL", "Streamed", "check_written", "copy_output",
           "copy_passthrough", "meta_facts", "passthrough_facts", "prepare_stream"]

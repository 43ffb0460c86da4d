"""The streaming pack path (appliance/stream_pack.py) for instances above
`pack.stream_threshold_mb`: same output as the in-memory path, pixels and attributes
unchanged, bounded memory (bench/stream_mem_bench.py), and nothing left behind when the
input is tampered with or a worker dies."""

from __future__ import annotations

import io
import os
import signal
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from appliance.bundle import format as bundle
from appliance.core import crypto, durable
from appliance.core.config import Pack
from appliance.core.errors import IntegrityError
from appliance.pack import codec
from appliance.pack import stream as stream_pack
from appliance.pack.packer import Packer
from appliance.pack.pool import CodecPool
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from appliance.receive.identify import identify_stored
from appliance.spool.store import Spool
from tests.peers import SAMPLES

# --- instances ------------------------------------------------------------------------

STUDY = generate_uid(prefix="1.2.826.0.1.3680043.8.498.77.")[:50]


def multiframe(frames: int = 5, rows: int = 64, columns: int = 48, samples: int = 1,
               bits_allocated: int = 16, bits_stored: int = 12, signed: int = 0,
               planar: int = 0, implicit: bool = False, trailer: bool = False,
               pixel_group_length: bool = False, seed: int = 3) -> bytes:
    """A generated multi-frame Part-10 instance whose pixels compress (a smooth ramp
    plus a little noise), every frame different."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY  # one study: the packer bundles them together
    ds.SeriesInstanceUID = STUDY + ".1"
    ds.PatientName = "Test^Stream"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated, ds.BitsStored = bits_allocated, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, signed
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits_stored - 1)), 1 << (bits_stored - 1)) if signed else (0, 1 << bits_stored)
    ramp = np.add.outer(np.arange(frames) * 5, np.add.outer(np.arange(rows), 2 * np.arange(columns)))
    values = (ramp[..., None] * np.arange(1, samples + 1) + rng.integers(0, 4, (*ramp.shape, samples)))
    values = lo + values % (hi - lo)
    if samples == 3 and planar == 1:
        values = values.transpose(0, 3, 1, 2)
    dtype = f"<{'i' if signed else 'u'}{bits_allocated // 8}"
    ds.PixelData = values.astype(dtype).tobytes()
    if len(ds.PixelData) % 2:
        ds.PixelData += b"\x00"
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    if trailer:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 16)  # Data Set Trailing Padding
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    raw = buf.getvalue()
    if pixel_group_length:  # a (7FE0,0000) just before Pixel Data, as old writers made
        at = raw.index(b"\xe0\x7f\x10\x00")
        value = len(raw) - at
        elem = (struct.pack("<HHL", 0x7FE0, 0, 4) if implicit
                else struct.pack("<HH2sH", 0x7FE0, 0, b"UL", 4)) + struct.pack("<L", value)
        raw = raw[:at] + elem + raw[at:]
    return raw


def with_meta(path: Path) -> bytes:
    """A sample as the receiver spools it: its data set behind a complete file meta."""
    ds = pydicom.dcmread(path, force=True)
    raw = path.read_bytes()
    start = 132 + _meta_length(raw) if raw[128:132] == b"DICM" else 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = UID("1.2.3.4")
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue() + raw[start:]


def _meta_length(raw: bytes) -> int:
    return codec._split_part10(raw).end - 132


GENERATED: dict[str, dict[str, Any]] = {
    "u16-12bit": {},
    "u16-16bit": {"bits_stored": 16},
    "s16-12bit": {"signed": 1},
    "s16-16bit": {"signed": 1, "bits_stored": 16},
    "u8": {"bits_allocated": 8, "bits_stored": 8},
    "s8": {"bits_allocated": 8, "bits_stored": 8, "signed": 1},
    "u8-odd-length": {"bits_allocated": 8, "bits_stored": 8, "rows": 63, "columns": 33, "frames": 3},
    "rgb-planar0": {"samples": 3, "bits_allocated": 8, "bits_stored": 8},
    "rgb-planar1": {"samples": 3, "bits_allocated": 8, "bits_stored": 8, "planar": 1},
    "implicit": {"implicit": True},
    "implicit-rgb-planar1": {"implicit": True, "samples": 3, "bits_allocated": 8,
                             "bits_stored": 8, "planar": 1},
    "trailer": {"trailer": True},
    "implicit-trailer": {"implicit": True, "trailer": True},
    "pixel-group-length": {"pixel_group_length": True},
    "single-frame": {"frames": 1},
}


# --- checks ---------------------------------------------------------------------------


def stored_values(raw: bytes) -> np.ndarray:
    """The original stored values as (frames, rows, columns, samples)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return codec._source_image(pydicom.dcmread(io.BytesIO(raw))).values


def assert_same_instance(original: bytes, sent: bytes) -> None:
    """Every stored pixel value and every non-pixel attribute (file meta too, but the
    transfer syntax) is what it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = pydicom.dcmread(io.BytesIO(original)), pydicom.dcmread(io.BytesIO(sent))
        skip = {codec._PIXEL_DATA, 0x7FE00000}
        if "PlanarConfiguration" in a and b.get("PlanarConfiguration") == 0:
            skip.add(codec._PLANAR_CONFIGURATION)  # 1 -> 0, as the syntax requires
        assert codec._same_elements(a, b, frozenset(skip))
        assert a.get("PlanarConfiguration", 0) in (0, 1)
        assert codec._same_elements(a.file_meta, b.file_meta, frozenset({0x00020010}))
        want = stored_values(original)
        shape = want.shape[1:]
        frames = list(iter_pixels(io.BytesIO(sent), raw=True))
    assert len(frames) == len(want)
    for got, w in zip(frames, want, strict=True):
        assert np.array_equal(got.reshape(shape), w)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[CodecPool]:
    p = CodecPool(workers=1)
    yield p
    p.close()


class Box:
    """A spool, a queue, a key pair, and a packer over them."""

    def __init__(self, root: Path, pool: CodecPool, **pack: Any) -> None:
        key = crypto.create_spool_key(root / "spool.key")
        index = open_index(root)
        self.spool, self.queue = Spool(root, key, index, 0), Queue(root, index)
        crypto.create_keypair(root / "a.key", root / "a.pub")
        self.private = crypto.load_private_key(root / "a.key")
        pack.setdefault("stream_threshold_mb", 0)  # every instance streams
        self.packer = Packer(Pack(**pack), self.spool, self.queue,
                             [crypto.load_public_key(root / "a.pub")], pool)

    def store(self, raws: list[bytes]) -> tuple[list[str], list[str]]:
        """Spool `raws` and seal their segments (one per study, in order)."""
        stored = [self.spool.store([r], identify_stored(r)) for r in raws]
        segs = list(dict.fromkeys(s.segment_id for s in stored))
        with self.spool.index.tx() as c:
            c.executemany("UPDATE segments SET state='sealed' WHERE id=?", [(g,) for g in segs])
        return segs, [s.id for s in stored]

    def pack(self, raws: list[bytes]) -> list[tuple[bundle.ManifestEntry, bytes]]:
        segs, _ = self.store(raws)
        got = []
        for seg in segs:
            self.packer.pack(seg)
            got += self.bundle(seg)
        return got

    def bundle(self, seg: str) -> list[tuple[bundle.ManifestEntry, bytes]]:
        with self.queue.path(seg).open("rb") as f:
            return list(bundle.iter_instances(f, self.private))

    def temps(self) -> list[str]:
        return [p.name for p in self.spool.dir.iterdir() if p.name.startswith(durable.TEMP_PREFIX)]


def _spool_file(tmp_path: Path, raw: bytes, rid: str = "r1", chunk: int = 4096) -> tuple[str, bytes]:
    key = os.urandom(32)
    with open(tmp_path / rid, "wb") as f:
        crypto.seal_spool_parts(crypto.SpoolKey(key), rid, [raw], f, chunk_size=chunk)
    return str(tmp_path / rid), key


def _output(s: stream_pack.Streamed, temp: str) -> bytes:
    with open(temp, "rb") as f:
        return s.prefix + b"".join(crypto.stream_open(s.temp_key, stream_pack.TEMP_AAD, f,
                                                      stream_pack.PIECE))


# --- the worker side, in this process -------------------------------------------------


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("kind", sorted(GENERATED))
def test_streamed_output_is_the_in_memory_output_byte_for_byte(
        tmp_path: Path, kind: str, codec_name: str) -> None:
    raw = multiframe(**GENERATED[kind])
    path, key = _spool_file(tmp_path, raw)
    temp = str(tmp_path / ".tmp-pack-x")
    s = stream_pack.prepare_stream(path, "r1", key, codec_name, True, temp)
    r = codec.compress(raw, codec_name, True)
    assert (s.action, s.reason) == (r.action, r.reason) == ("compressed", "ok")
    out = _output(s, temp)
    assert out == r.data
    assert (s.output_size, s.frames, s.notes, s.transfer_syntax) == (
        len(out), r.frames, r.notes, r.transfer_syntax)
    assert s.facts is not None
    assert s.facts["received_size"] == len(raw)
    assert s.facts["sop_instance_uid"] == pydicom.dcmread(io.BytesIO(raw)).SOPInstanceUID
    assert_same_instance(raw, out)


def test_the_temp_file_holds_no_plaintext(tmp_path: Path) -> None:
    raw = multiframe(frames=40, rows=128, columns=128)
    path, key = _spool_file(tmp_path, raw)
    temp = str(tmp_path / ".tmp-pack-x")
    s = stream_pack.prepare_stream(path, "r1", key, "jpeg-ls", True, temp)
    out = _output(s, temp)
    sealed = Path(temp).read_bytes()
    body = out[len(s.prefix):]
    for at in range(8, len(body) - 64, len(body) // 17):
        assert body[at : at + 32] not in sealed
    assert os.stat(temp).st_mode & 0o077 == 0


@pytest.mark.parametrize(("kind", "reason"), [
    ({"bits_allocated": 32, "bits_stored": 32}, "bits-allocated-32"),
    ({"bits_stored": 10, "seed": 1}, "pixels-outside-bits-stored"),
])
def test_what_cannot_be_compressed_passes_through_and_leaves_no_temp(
        tmp_path: Path, kind: dict[str, Any], reason: str) -> None:
    raw = multiframe(**kind)
    if reason == "pixels-outside-bits-stored":  # one value above Bits Stored, in the last frame
        raw = raw[:-2] + b"\xff\xff"
    path, key = _spool_file(tmp_path, raw)
    temp = tmp_path / ".tmp-pack-x"
    s = stream_pack.prepare_stream(path, "r1", key, "jpeg2000", True, str(temp))
    assert (s.action, s.reason) == ("passthrough", reason)
    assert s.reason == codec.compress(raw, "jpeg2000", False).reason
    assert s.facts is not None and s.facts["received_size"] == len(raw)
    assert not temp.exists()


def with_private_blob(raw: bytes, size: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.add_new(0x00290010, "LO", "BENCH PRIVATE")
    ds.add_new(0x00291010, "OB", os.urandom(size))  # before Pixel Data
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_header_longer_than_the_first_chunk_is_read_on(tmp_path: Path) -> None:
    raw = with_private_blob(multiframe(frames=4), 3 << 20)
    path, key = _spool_file(tmp_path, raw)
    temp = str(tmp_path / ".tmp-pack-x")
    s = stream_pack.prepare_stream(path, "r1", key, "jpeg-ls", True, temp)
    assert (s.action, s.reason) == ("compressed", "ok")
    assert _output(s, temp) == codec.compress(raw, "jpeg-ls", False).data


def test_the_file_meta_is_read_on_wherever_the_first_read_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = multiframe()
    want = codec._split_part10(raw)
    for cut in range(1, want.end + 10):  # in the preamble, in an element, at its end
        monkeypatch.setattr(stream_pack, "PIECE", cut)
        chunks = (raw[i : i + 7] for i in range(0, len(raw), 7))  # reads cross chunks
        inp = stream_pack._Input(chunks)
        head, p = stream_pack._read_head(inp)
        assert p == want, cut
        assert bytes(head) == raw[: len(head)]


@pytest.mark.parametrize("limit", ["MAX_HEAD", "MAX_TAIL"])
def test_a_header_or_trailer_too_long_to_hold_passes_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str) -> None:
    monkeypatch.setattr(stream_pack, limit, 1024)
    monkeypatch.setattr(stream_pack, "PIECE", 64)  # the first read is not the whole file
    raw = multiframe(trailer=True)
    if limit == "MAX_HEAD":
        raw = with_private_blob(raw, 4096)
    else:  # a longer Data Set Trailing Padding
        at = raw.rindex(b"\xfc\xff\xfc\xffOB")
        raw = raw[:at + 8] + struct.pack("<L", 2048) + bytes(2048)
    path, key = _spool_file(tmp_path, raw)
    temp = tmp_path / ".tmp-pack-x"
    s = stream_pack.prepare_stream(path, "r1", key, "jpeg2000", True, str(temp))
    assert (s.action, s.reason) == ("passthrough", "stream-unsupported")
    assert s.facts is not None and s.facts["received_size"] == len(raw)
    assert not temp.exists()


def test_a_temp_that_cannot_be_written_means_pass_through(tmp_path: Path) -> None:
    path, key = _spool_file(tmp_path, multiframe())
    s = stream_pack.prepare_stream(path, "r1", key, "jpeg2000", True,
                                   str(tmp_path / "no-such-dir" / ".tmp-pack-x"))
    assert (s.action, s.reason) == ("passthrough", "temp-write-error")


def test_a_verification_mismatch_passes_the_original_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Liar:
        def as_array(self, src: bytes, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
            return np.zeros((kw["rows"], kw["columns"]), dtype=np.uint16), {}

    monkeypatch.setattr(stream_pack, "get_decoder", lambda uid: Liar())
    path, key = _spool_file(tmp_path, multiframe())
    temp = tmp_path / ".tmp-pack-x"
    s = stream_pack.prepare_stream(path, "r1", key, "jpeg2000", True, str(temp))
    assert (s.action, s.reason) == ("passthrough", "verify-mismatch")
    assert not temp.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_tampered_spool_file_raises_integrity_error_and_leaves_no_temp(
        tmp_path: Path, damage: str) -> None:
    raw = multiframe(frames=20)
    path, key = _spool_file(tmp_path, raw)
    sealed = bytearray(Path(path).read_bytes())
    if damage == "flip":
        sealed[len(sealed) // 2] ^= 1  # a chunk in the middle of the pixel data
    else:
        del sealed[-100:]  # the last chunk cut short
    Path(path).write_bytes(bytes(sealed))
    temp = tmp_path / ".tmp-pack-x"
    with pytest.raises(IntegrityError):
        stream_pack.prepare_stream(path, "r1", key, "jpeg2000", True, str(temp))
    assert not temp.exists()


# --- through the packer, the worker pool and the bundle -------------------------------


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
def test_generated_multiframe_instances_go_through_the_bundle_unchanged(
        tmp_path: Path, pool: CodecPool, codec_name: str) -> None:
    raws = [multiframe(**GENERATED[k]) for k in sorted(GENERATED)]
    box = Box(tmp_path, pool, codec=codec_name)
    got = box.pack(raws)
    assert len(got) == len(raws)
    for raw, (entry, data) in zip(raws, got, strict=True):
        assert (entry.action, entry.reason) == ("compressed", "ok")
        assert entry.received_size == len(raw)
        assert data == codec.compress(raw, codec_name, False).data
        assert_same_instance(raw, data)
    assert box.temps() == []
    assert list(box.spool.dir.iterdir()) == []


MULTIFRAME_SAMPLES = [  # real multi-frame files (see the samples' MANIFEST.md)
    "modalities/MR_enhanced/mr_brucker.dcm",  # Enhanced MR, 4 frames, 32 undefined-length SQ
    "modalities/NM/NM-MONO2-16-13x-heart",  # NM, 13 frames, private elements
    "modalities/RT/rtdose.dcm",  # RT Dose, 15 frames, implicit VR, 32-bit: passes through
    "modalities/SEG/partial_overlaps.dcm",  # SEG, 7 frames, 1-bit: passes through
    "modalities/US/Issue16.dcm",  # US, 34 frames, JPEG baseline: passes through
    "modalities/SC/SC_rgb_rle_2frame.dcm",  # RGB, 2 frames, RLE: passes through
]


def test_real_multiframe_samples_streamed_and_in_memory_agree(tmp_path: Path, pool: CodecPool) -> None:
    raws = [with_meta(SAMPLES / p) for p in MULTIFRAME_SAMPLES]
    streamed = Box(tmp_path / "s", pool, codec="jpeg2000").pack(raws)
    in_memory = Box(tmp_path / "m", pool, codec="jpeg2000", stream_threshold_mb=1 << 16).pack(raws)
    assert len(streamed) == len(in_memory) == len(raws)
    for raw, (es, ds), (em, dm) in zip(raws, streamed, in_memory, strict=True):
        assert ds == dm
        assert es.to_json() == em.to_json()
        if es.action == "compressed":
            assert_same_instance(raw, ds)
        else:
            assert ds == raw
    assert [e.action for e, _ in streamed] == ["compressed"] * 2 + ["passthrough"] * 4


def test_a_tampered_instance_is_quarantined_and_the_rest_packed(tmp_path: Path, pool: CodecPool) -> None:
    raws = [multiframe(seed=s, frames=30) for s in (1, 2, 3)]
    box = Box(tmp_path, pool)
    [seg], ids = box.store(raws)
    bad = box.spool.dir / ids[1]
    sealed = bytearray(bad.read_bytes())
    sealed[len(sealed) // 2] ^= 1
    bad.write_bytes(bytes(sealed))
    box.packer.pack(seg)
    got = box.bundle(seg)
    assert [d for _, d in got] == [codec.compress(r, "jpeg2000", False).data for r in (raws[0], raws[2])]
    assert [p.name.split(".")[0] for p in box.spool.quarantine_dir.iterdir()] == [ids[1]]
    assert list(box.spool.dir.iterdir()) == []  # no temp, no spool file left


def die_mid_stream(path: str, rid: str, key: bytes, codec_name: str, verify: bool,
                   temp: str) -> None:
    """Stands in for prepare_stream in a worker: half a temp file, then SIGKILL."""
    with open(temp, "wb") as f:
        f.write(os.urandom(1 << 16))
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_stream_leaves_nothing_wrong(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_pack, "prepare_stream", die_mid_stream)
    raw = multiframe(frames=12)
    with CodecPool(workers=1) as dying:
        box = Box(tmp_path, dying)
        got = box.pack([raw])
    [(entry, data)] = got
    assert (entry.action, entry.reason) == ("passthrough", "worker-crashed")
    assert data == raw  # passed through unchanged, copied chunk by chunk
    assert entry.received_sha256 == entry.sha256
    assert box.temps() == []
    assert list(box.spool.dir.iterdir()) == []


def test_a_temp_left_by_a_crash_is_removed_at_recovery(tmp_path: Path, pool: CodecPool) -> None:
    box = Box(tmp_path, pool)
    (box.spool.dir / f"{durable.TEMP_PREFIX}pack-0123456789abcdef").write_bytes(b"sealed junk")
    box.spool.recover()
    assert box.temps() == []


def test_small_instances_keep_the_in_memory_path(tmp_path: Path, pool: CodecPool) -> None:
    raw = multiframe()
    box = Box(tmp_path, pool, stream_threshold_mb=1)
    [(entry, data)] = box.pack([raw])
    assert data == codec.compress(raw, "jpeg2000", False).data


def test_stream_threshold_is_range_checked() -> None:
    from tests.test_config import one_problem, parse, valid, with_
    assert parse(valid()).pack.stream_threshold_mb == 64
    assert parse(with_(pack={"stream_threshold_mb": 1})).pack.stream_threshold_mb == 1
    for bad in (0, -1, 65_537, "64", 1.5):
        assert "stream_threshold_mb" in one_problem(with_(pack={"stream_threshold_mb": bad}))

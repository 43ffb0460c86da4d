"""appliance.pack.codec against the real sample set (../shared/dicom-samples).

Pixels are compared with pydicom's own decoding, attributes element by element with
pydicom; nothing here trusts the codec module's internal checks.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from appliance.pack import codec
from appliance.pack.codec import Result, compress, decompress
from appliance.pack.pool import CodecPool

SAMPLES = Path(os.environ.get("APPLIANCE_DICOM_SAMPLES",
                              Path(__file__).resolve().parents[2] / "shared" / "dicom-samples"))
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())

CODEC_TS = {"jpeg2000": JPEG2000Lossless, "jpeg-ls": JPEGLSLossless}
PIXEL_DATA = 0x7FE00010

CT_SERIES = "series/CT_Philips_Ingenuity_phantom_28sl"
MR_SERIES = {  # explicit VR unless noted
    "series/MR_GE_MR750_EPI_150sl": "axial_epi_fmri_sequential_i_to_s-{:05d}.dcm",
    "series/MR_GE_Signa_wrist_16sl": "MR{:02d}.dcm",  # implicit VR
    "series/MR_Philips_abdomen_11sl": "adb1_{}.dcm",  # implicit VR
    "series/MR_Philips_Ingenia_pCASL_40sl": "1901_{:04d}.dcm",
}


def sample(rel: str) -> bytes:
    return (SAMPLES / rel).read_bytes()


def read(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


def pixels(data: bytes) -> np.ndarray:
    return read(data).pixel_array


def part10(ds: Dataset, implicit: bool = False) -> bytes:
    """Write a test dataset as a Part-10 file."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def image(arr: np.ndarray, bits_stored: int, signed: bool = False) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.tobytes()
    return ds


def _same_dataset(a: Dataset, b: Dataset, skip: set[int], where: str = "") -> None:
    # iterating a Dataset yields elements, hence .keys()
    ta = [t for t in a.keys() if t not in skip and t.element != 0]  # noqa: SIM118
    tb = [t for t in b.keys() if t not in skip and t.element != 0]  # noqa: SIM118
    assert ta == tb, f"{where}: element set changed"
    for t in ta:
        ea, eb = a[t], b[t]
        if ea.VR == "SQ":
            assert eb.VR == "SQ" and len(ea.value) == len(eb.value), f"{where}{t}"
            for i, (x, y) in enumerate(zip(ea.value, eb.value, strict=True)):
                _same_dataset(x, y, set(), f"{where}{t}[{i}]")
        else:
            assert ea.value == eb.value, f"{where}{t} {ea.keyword} changed"


def assert_same_attributes(before: bytes, after: bytes, may_change: set[int] = frozenset()) -> None:
    """Every element but Pixel Data (and `may_change`) has the same value; the file meta
    too, except the transfer syntax. For explicit VR input each top-level element must
    also keep its exact encoding (VR and value bytes)."""
    a, b = read(before), read(after)
    assert before[:128] == after[:128], "preamble changed"
    meta_a = {t: e.value for t, e in a.file_meta.items() if t not in (0x00020000, 0x00020010)}
    meta_b = {t: e.value for t, e in b.file_meta.items() if t not in (0x00020000, 0x00020010)}
    assert meta_a == meta_b
    skip = {PIXEL_DATA, *may_change}
    if a.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
        for t in a.keys():  # noqa: SIM118
            if t in skip or t == 0x7FE00000:
                continue
            ra, rb = a.get_item(t), b.get_item(t)
            if getattr(ra, "is_raw", False):
                assert (ra.VR, ra.length, ra.value) == (rb.VR, rb.length, rb.value), f"{t} re-encoded"
    _same_dataset(a, b, skip)


def assert_round_trip(before: bytes, r: Result, codec_name: str) -> None:
    assert r.action == "compressed", r.reason
    assert r.reason == "ok"
    assert r.transfer_syntax == CODEC_TS[codec_name]
    assert r.output_size == len(r.data) < len(before) == r.input_size
    out = read(r.data)
    assert out.file_meta.TransferSyntaxUID == CODEC_TS[codec_name]
    orig = read(before)
    assert out.SOPInstanceUID == orig.SOPInstanceUID
    assert out.file_meta.get("MediaStorageSOPInstanceUID") == orig.file_meta.get("MediaStorageSOPInstanceUID")
    assert np.array_equal(out.pixel_array, orig.pixel_array)
    assert out.pixel_array.dtype == orig.pixel_array.dtype
    assert_same_attributes(before, r.data)


def series_files(series: str, pattern: str | None, picks: tuple[int, ...]) -> list[str]:
    if pattern is None:
        names = sorted(p.name for p in (SAMPLES / series).iterdir())
        return [f"{series}/{names[i]}" for i in picks]
    return [f"{series}/{pattern.format(i + 1)}" for i in picks]


ROUND_TRIP = (series_files(CT_SERIES, None, (0, 13, 27))
              + [f for s, pat in MR_SERIES.items() for f in series_files(s, pat, (0, 9))])


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("rel", ROUND_TRIP)
def test_round_trip_series_slice(rel: str, codec_name: str) -> None:
    before = sample(rel)
    assert_round_trip(before, compress(before, codec_name, verify=True), codec_name)


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
def test_ct_series_compresses_well(codec_name: str) -> None:
    files = sorted((SAMPLES / CT_SERIES).iterdir())
    results = [compress(f.read_bytes(), codec_name, verify=False) for f in files]
    assert all(r.action == "compressed" for r in results)
    ratio = sum(r.input_size for r in results) / sum(r.output_size for r in results)
    assert ratio > 4, ratio  # measured 5.0 for both codecs


@pytest.mark.parametrize("series", ["series/MR_GE_Signa_wrist_16sl", "series/MR_Philips_abdomen_11sl"])
def test_mr_series_compresses(series: str) -> None:
    results = [compress(f.read_bytes(), "jpeg2000", verify=False)
               for f in sorted((SAMPLES / series).iterdir())]
    assert all(r.action == "compressed" for r in results)
    ratio = sum(r.input_size for r in results) / sum(r.output_size for r in results)
    assert ratio > 1.5, ratio


def test_explicit_vr_input_keeps_every_other_byte() -> None:
    before = sample(f"{CT_SERIES}/I100")
    r = compress(before, "jpeg2000")
    assert r.notes == ()
    # the dataset bytes in front of Pixel Data (the last element here) are identical
    meta_end = 132 + 12 + int.from_bytes(before[140:144], "little")  # (0002,0000) comes first
    new_meta_end = 132 + 12 + int.from_bytes(r.data[140:144], "little")
    px = before.rindex(b"\xe0\x7f\x10\x00OW")
    head = before[meta_end:px]
    assert r.data[new_meta_end:new_meta_end + len(head)] == head
    assert r.data[new_meta_end + len(head):].startswith(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    assert r.data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # sequence delimiter


def test_file_meta_kept_but_transfer_syntax() -> None:
    before = sample(f"{CT_SERIES}/I10")
    a, b = read(before), read(compress(before, "jpeg2000").data)
    for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "ImplementationClassUID",
               "ImplementationVersionName", "SourceApplicationEntityTitle"):
        assert b.file_meta.get(kw) == a.file_meta.get(kw), kw
    assert b.file_meta.TransferSyntaxUID == JPEG2000Lossless != a.file_meta.TransferSyntaxUID


def test_implicit_vr_input_is_converted_and_noted() -> None:
    before = sample("series/MR_GE_Signa_wrist_16sl/MR05.dcm")
    assert read(before).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    r = compress(before, "jpeg2000")
    assert "implicit-vr-converted" in r.notes
    assert not read(r.data).is_implicit_VR
    assert_round_trip(before, r, "jpeg2000")


def test_deflated_input_is_inflated_and_compressed() -> None:
    before = sample(f"{CT_SERIES}/I50")
    ds = read(before)
    meta_end = 132 + 12 + int.from_bytes(before[140:144], "little")
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(before[meta_end:]) + c.flush()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, ds.file_meta, enforce_standard=False)
    deflated = before[:128] + b"DICM" + fp.getvalue() + body
    assert np.array_equal(pixels(deflated), ds.pixel_array)
    r = compress(deflated, "jpeg2000")
    assert r.action == "compressed" and "inflated" in r.notes
    assert np.array_equal(pixels(r.data), ds.pixel_array)
    assert read(r.data).SOPInstanceUID == ds.SOPInstanceUID


# --- pixel kinds ----------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
def test_signed_pixels(codec_name: str) -> None:
    before = sample("modalities/CT/SignedCT.dcm")
    assert read(before).PixelRepresentation == 1 and pixels(before).min() < 0
    r = compress(before, codec_name)
    assert_round_trip(before, r, codec_name)
    assert r.notes == ("pixel-group-length-removed",)  # (7FE0,0000) cannot stay right
    assert pixels(r.data).min() == pixels(before).min() < 0


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("rel", ["modalities/US/US-RGB-8-esopecho", "modalities/SC/SC_rgb.dcm"])
def test_rgb_keeps_photometric_interpretation(rel: str, codec_name: str) -> None:
    before = sample(rel)
    r = compress(before, codec_name)
    assert_round_trip(before, r, codec_name)
    assert read(r.data).PhotometricInterpretation == "RGB"  # no YBR_RCT: no MCT


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
def test_rgb_planar_configuration_1_becomes_0(codec_name: str) -> None:
    ds = read(sample("modalities/SC/SC_rgb.dcm"))
    rgb = ds.pixel_array
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    before = buf.getvalue()
    r = compress(before, codec_name)
    assert r.action == "compressed" and r.notes == ("planar-configuration-0",)
    out = read(r.data)
    assert out.PlanarConfiguration == 0  # PS3.5 8.2.3 / 8.2.4: "shall be set to 0"
    assert np.array_equal(out.pixel_array, rgb)
    assert_same_attributes(before, r.data, may_change={0x00280006})


def test_tiny_rgb_odd_length_is_rejected_by_encoders() -> None:
    # 3x3 RGB, 27-byte (odd) Pixel Data: OpenJPEG needs more than 3x3 pixels for its
    # 6 resolution levels, CharLS's output buffer is smaller than the JPEG-LS header.
    before = sample("odd/odd_length/SC_rgb_small_odd.dcm")
    for name in ("jpeg2000", "jpeg-ls"):
        r = compress(before, name)
        assert (r.action, r.reason) == ("passthrough", "encode-error")
        assert r.data is before


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("rel, frames", [("modalities/MR_enhanced/mr_brucker.dcm", 4),
                                         ("modalities/NM/NM-MONO2-16-13x-heart", 13)])
def test_multi_frame(rel: str, frames: int, codec_name: str) -> None:
    before = sample(rel)
    r = compress(before, codec_name)
    assert_round_trip(before, r, codec_name)
    assert r.frames == frames
    assert pixels(r.data).shape[0] == frames


def test_bits_above_bits_stored_pass_through() -> None:
    # pydicom's pixel_array masks bits above Bits Stored and the encoders drop them, so a
    # comparison of pixel_array would call this lossy round trip identical
    ds = read(sample(f"{CT_SERIES}/I120"))
    arr = ds.pixel_array.copy()
    assert ds.BitsStored == 12
    arr[5, 5] |= 0x8000
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    before = buf.getvalue()
    for name in ("jpeg2000", "jpeg-ls"):
        r = compress(before, name)
        assert (r.action, r.reason, r.data) == ("passthrough", "pixels-outside-bits-stored", before)


def test_signed_values_sign_extended_in_12_bits() -> None:
    arr = np.random.default_rng(7).integers(-2048, 2048, (64, 64)).astype("<i2")
    before = part10(image(arr, 12, signed=True))
    for name in ("jpeg2000", "jpeg-ls"):
        r = compress(before, name)
        assert r.action == "compressed", r.reason
        assert np.array_equal(pixels(r.data), arr)
        assert decompress(r.data)[-arr.nbytes:] == arr.tobytes()


# --- pass-through -----------------------------------------------------------------------

ENCAPSULATED = sorted(
    e["path"] for e in MANIFEST
    if e["pydicom_ok"] and e["path"].startswith("transfer_syntax/") and e["transfer_syntax"]
    and UID(e["transfer_syntax"]).is_encapsulated
)


@pytest.mark.parametrize("rel", ENCAPSULATED)
def test_already_compressed_passes_through(rel: str) -> None:
    before = sample(rel)
    r = compress(before, "jpeg2000")
    assert (r.action, r.reason) == ("passthrough", "already-compressed")
    assert r.data is before and r.transfer_syntax == read(before).file_meta.TransferSyntaxUID


@pytest.mark.parametrize("rel, reason", [
    ("modalities/SEG/partial_overlaps.dcm", "bits-allocated-1"),
    ("modalities/RT/rtdose.dcm", "bits-allocated-32"),
    ("modalities/SR/sr_document.dcm", "no-pixel-data"),
    ("modalities/SR/test-SR.dcm", "no-pixel-data"),
    ("modalities/RT/rtplan.dcm", "no-pixel-data"),
    ("modalities/DOC_stl/Issue137.dcm", "no-pixel-data"),
    ("modalities/PR/PR000000.dcm", "no-pixel-data"),
    ("transfer_syntax/small_MR/MR_small_bigendian.dcm", "big-endian"),
    ("odd/no_preamble/no_meta.dcm", "no-file-meta"),
])
def test_sample_passes_through(rel: str, reason: str) -> None:
    before = sample(rel)
    r = compress(before, "jpeg2000")
    assert (r.action, r.reason) == ("passthrough", reason)
    assert r.data is before and r.input_size == r.output_size == len(before)


def test_float_pixel_data_passes_through() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(0, 1, 64, dtype="<f4").tobytes()
    before = part10(ds)
    r = compress(before, "jpeg2000")
    assert (r.action, r.reason, r.data) == ("passthrough", "float-pixels", before)


def test_32_bit_constructed_passes_through() -> None:
    before = part10(image(np.arange(64 * 64, dtype="<u4").reshape(64, 64), 32))
    assert compress(before, "jpeg-ls").reason == "bits-allocated-32"


def test_not_smaller_passes_through() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64)).astype("u1")
    before = part10(image(noise, 8))
    r = compress(before, "jpeg2000")
    assert (r.action, r.reason, r.data) == ("passthrough", "not-smaller", before)


def test_codec_none_passes_through() -> None:
    before = sample(f"{CT_SERIES}/I10")
    r = compress(before, "none", verify=True)
    assert (r.action, r.reason, r.data) == ("passthrough", "codec-none", before)
    assert r.transfer_syntax == ExplicitVRLittleEndian


def test_unknown_codec_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        compress(sample(f"{CT_SERIES}/I10"), "jpeg-xl")


@pytest.mark.parametrize("before", [
    b"", b"not dicom at all", b"\x00" * 128 + b"DICM", b"\x00" * 128 + b"DICM\x02\x00\x10\x00UI",
    sample("fuzz_generated/cat20_cve_dcmtk_dimse_segfault/TC0971_multi_undef_no_delim.dcm"),
    sample(f"{CT_SERIES}/I10")[:5000],  # truncated in the middle of the dataset
], ids=["empty", "text", "dicm-only", "meta-cut", "pydicom-fails", "truncated"])
def test_unparseable_input_passes_through(before: bytes) -> None:
    r = compress(before, "jpeg2000")
    assert r.action == "passthrough" and r.data is before
    assert r.reason in ("unparseable", "no-file-meta", "pixel-data-length-mismatch",
                        "no-pixel-data")


def test_pydicom_unparseable_sample_reason() -> None:
    r = compress(sample("fuzz_generated/cat20_cve_dcmtk_dimse_segfault/"
                        "TC0971_multi_undef_no_delim.dcm"), "jpeg2000")
    assert r.reason == "unparseable"


# --- verification -----------------------------------------------------------------------


def test_verify_mismatch_returns_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    real = codec._decode_frames

    def off_by_one(data: bytes):  # type: ignore[no-untyped-def]
        for frame in real(data):
            changed = frame.copy()
            changed[100, 100] += 1
            yield changed

    monkeypatch.setattr(codec, "_decode_frames", off_by_one)
    before = sample(f"{CT_SERIES}/I140")
    r = compress(before, "jpeg2000", verify=True)
    assert (r.action, r.reason) == ("passthrough", "verify-mismatch")
    assert r.data is before and r.reason.startswith("verify-")
    # without verification the same (patched) decoder is never asked
    assert compress(before, "jpeg2000", verify=False).action == "compressed"


def test_verify_mismatch_on_a_later_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    real = codec._decode_frames

    def last_frame_wrong(data: bytes):  # type: ignore[no-untyped-def]
        frames = list(real(data))
        frames[-1] = frames[-1] ^ 1
        yield from frames

    monkeypatch.setattr(codec, "_decode_frames", last_frame_wrong)
    r = compress(sample("modalities/NM/NM-MONO2-16-13x-heart"), "jpeg-ls")
    assert r.reason == "verify-mismatch"


def test_verify_decoder_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes):  # type: ignore[no-untyped-def]
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(codec, "_decode_frames", broken)
    before = sample(f"{CT_SERIES}/I140")
    r = compress(before, "jpeg-ls")
    assert (r.action, r.reason, r.data) == ("passthrough", "verify-error", before)


# --- decompress -------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", ["jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("rel", [f"{CT_SERIES}/I200", "modalities/MR_enhanced/mr_brucker.dcm",
                                 "modalities/SC/SC_rgb.dcm"])
def test_decompress_restores_the_original_bytes(rel: str, codec_name: str) -> None:
    before = sample(rel)
    r = compress(before, codec_name)
    assert r.action == "compressed"
    after = decompress(r.data)
    assert read(after).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert after == before  # byte for byte: UIDs, pixels, every element


@pytest.mark.parametrize("rel", ["modalities/CT/SignedCT.dcm",
                                 "series/MR_GE_Signa_wrist_16sl/MR03.dcm"])
def test_decompress_restores_pixels_and_uids(rel: str) -> None:
    before = sample(rel)
    r = compress(before, "jpeg2000")
    after = decompress(r.data)
    a, b = read(before), read(after)
    assert b.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert b.SOPInstanceUID == a.SOPInstanceUID
    assert b.file_meta.get("MediaStorageSOPInstanceUID") == a.file_meta.get("MediaStorageSOPInstanceUID")
    assert np.array_equal(b.pixel_array, a.pixel_array)
    assert_same_attributes(before, after)


@pytest.mark.parametrize("rel", ["transfer_syntax/WG04/CT2/CT2_J2KR", "transfer_syntax/WG04/MR1/MR1_J2KR",
                                 "transfer_syntax/WG04/CT2/CT2_JLSL", "transfer_syntax/WG04/CT2/CT2_RLE"])
def test_decompress_other_lossless_syntaxes(rel: str) -> None:
    before = sample(rel)
    after = decompress(before)
    a, b = read(before), read(after)
    assert b.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert b.SOPInstanceUID == a.SOPInstanceUID
    assert np.array_equal(b.pixel_array, a.pixel_array)
    assert_same_attributes(before, after, may_change={0x7FE00001, 0x7FE00002})
    reference = read(sample(rel.rsplit("_", 1)[0] + "_UNC"))
    assert np.array_equal(b.pixel_array, reference.pixel_array)


def test_decompress_leaves_explicit_vr_input_alone() -> None:
    before = sample(f"{CT_SERIES}/I10")
    assert decompress(before) is before


def test_decompress_refuses_what_it_cannot_read() -> None:
    with pytest.raises(codec.CodecError):
        decompress(b"not dicom")


def test_decompress_without_a_decoder_raises() -> None:
    # no JPEG (ISO 10918) decoder is installed (pylibjpeg-libjpeg / gdcm): a JPEG
    # Lossless original has to be forwarded as received
    with pytest.raises(codec.CodecError, match="decode-error"):
        decompress(sample("transfer_syntax/WG04/CT2/CT2_JPLL"))


# --- worker processes -------------------------------------------------------------------


def test_codec_pool_with_two_workers() -> None:
    files = [sample(f"{CT_SERIES}/I{n}") for n in (10, 20, 30, 40)]
    files.append(sample("modalities/SR/sr_document.dcm"))
    with CodecPool(workers=2) as pool:
        assert pool.workers == 2
        futures = [pool.submit(f, "jpeg2000", True) for f in files]
        results = [f.result(timeout=120) for f in futures]
    assert [r.action for r in results] == ["compressed"] * 4 + ["passthrough"]
    for f, r in zip(files, results, strict=True):
        assert r == compress(f, "jpeg2000", True)  # the encoder is deterministic


def test_codec_pool_survives_a_worker_crash() -> None:
    before = sample(f"{CT_SERIES}/I60")
    pool = CodecPool(workers=2, start_method="forkserver")
    try:
        crashed = pool.submit_call(os._exit, (3,), 60, on_lost=lambda reason: codec._passthrough(
            before, reason)).result(timeout=120)
        assert (crashed.action, crashed.reason) == ("passthrough", "worker-crashed")
        assert crashed.data is before
        assert pool.submit(before, "jpeg-ls").result(timeout=120).action == "compressed"
    finally:
        pool.close()


def test_codec_pool_refuses_fork() -> None:
    with pytest.raises(ValueError):
        CodecPool(start_method="fork")


# --- every parseable sample -------------------------------------------------------------

# Samples that are not encapsulated, have Pixel Data and still cannot be compressed.
KNOWN_PASSTHROUGH = {
    "fuzz_generated/cat04_pixel_data/TC0287_buf_2x.dcm": "pixel-data-length-mismatch",
    "fuzz_generated/cat04_pixel_data/TC0293_buf_one_byte.dcm": "pixel-data-length-mismatch",
    "fuzz_generated/cat08_string_encoding/TC0405_latin1_utf8_payload.dcm": "duplicate-element",
    "fuzz_generated/cat11_cve_2025_11266/TC0711_encap_frag_len_maxuint_minus1.dcm": "bad-pixel-data",
    "fuzz_generated/cat21_cve_santesoft_oob/TC0979_px_512sq_0b.dcm": "bad-pixel-data",
    "malformed/MR_truncated.dcm": "pixel-data-length-mismatch",
    "malformed/badVR.dcm": "bits-allocated-32",
    "modalities/RT/rtdose.dcm": "bits-allocated-32",
    "modalities/RT/rtstruct.dcm": "no-file-meta",
    "modalities/SEG/partial_overlaps.dcm": "bits-allocated-1",
    "odd/no_preamble/no_meta.dcm": "no-file-meta",
    "odd/odd_length/SC_rgb_small_odd.dcm": "encode-error",
    "odd/padding/MR_small_padded.dcm": "pixel-data-length-mismatch",  # 8320 bytes for 8192
    "odd/private_tags/nested_priv_SQ.dcm": "bad-pixel-attributes",  # Pixel Data, no Rows
    "transfer_syntax/deflated/image_dfl.dcm": "not-smaller",
    "transfer_syntax/small_MR/MR_small_bigendian.dcm": "big-endian",
}
PARSEABLE = sorted(e["path"] for e in MANIFEST if e["pydicom_ok"])


def test_manifest_is_what_we_expect() -> None:
    assert len(PARSEABLE) == 368
    assert set(KNOWN_PASSTHROUGH) <= set(PARSEABLE)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, reading the odd samples here
@pytest.mark.parametrize("rel", PARSEABLE)
def test_every_parseable_sample(rel: str) -> None:
    before = sample(rel)
    r = compress(before, "jpeg2000", verify=True)
    if r.action == "passthrough":
        assert r.data is before
        ts = read(before).file_meta.get("TransferSyntaxUID") if rel not in KNOWN_PASSTHROUGH else None
        if rel in KNOWN_PASSTHROUGH:
            assert r.reason == KNOWN_PASSTHROUGH[rel]
        elif ts is not None and UID(ts).is_encapsulated:
            assert r.reason == "already-compressed"
        else:
            assert r.reason == "no-pixel-data" and "PixelData" not in read(before), r.reason
        return
    assert rel not in KNOWN_PASSTHROUGH
    a, b = read(before), read(r.data)
    assert b.SOPInstanceUID == a.SOPInstanceUID
    assert b.file_meta.get("MediaStorageSOPInstanceUID") == a.file_meta.get("MediaStorageSOPInstanceUID")
    assert np.array_equal(b.pixel_array, a.pixel_array)
    assert_same_attributes(before, r.data)

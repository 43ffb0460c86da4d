"""appliance.core.part10: the one Part-10 walker and rewriter, against pydicom on the
sample set, and on hand-made, malformed and truncated structure."""

from __future__ import annotations

import io
import os
import signal
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.filewriter import write_file_meta_info

from appliance.core import part10
from tests.peers import SAMPLES

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def as_the_daemon_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon tells pydicom not to judge values (receive.Receiver); so does the reference."""
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def sample_files() -> list[Path]:
    files = sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.suffix not in (".md", ".json"))
    assert len(files) > 300
    return files


def pydicom_meta(raw: bytes) -> tuple[int, str | None] | None:
    """(where pydicom's file meta ends, its transfer syntax), None if it reads none."""
    fp = io.BytesIO(raw)
    try:
        read_preamble(fp, False)
        fm = _read_file_meta_info(fp)
    except Exception:
        return None
    ts = fm.get("TransferSyntaxUID")
    return fp.tell(), None if ts is None else str(ts)


def pydicom_elements(raw: bytes, pos: int, implicit: bool) -> list[tuple[int, int, int]] | None:
    """(tag, start, end) of each top-level element as pydicom's reader walks them."""
    fp = io.BytesIO(raw)
    fp.seek(pos)
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = data_element_generator(fp, implicit, True)
            while True:
                start = fp.tell()
                try:
                    e = next(gen)
                except StopIteration:
                    return out
                out.append((int(e.tag), start, fp.tell()))
    except Exception:
        return None


def walk(buf: bytes, pos: int, implicit: bool, stop: int = part10.MAX_TAG) -> list[part10.Element]:
    """`part10.elements` with named fields."""
    return [part10.Element(*e) for e in part10.elements(buf, pos, implicit, stop)]


def el(tag: int, vr: bytes, value: bytes, implicit: bool = False) -> bytes:
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
    return part10.element_header(tag, vr, len(value)) + value


def undefined(tag: int, vr: bytes, implicit: bool = False) -> bytes:
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, part10.UNDEFINED)
    return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, part10.UNDEFINED)


ITEM_U = struct.pack("<HHL", 0xFFFE, 0xE000, part10.UNDEFINED)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQ_END = part10.SEQUENCE_DELIMITER_ITEM


def meta_bytes(ts: str = EXPLICIT) -> bytes:
    return part10.file_meta([part10.element(0x00020001, b"OB", b"\x00\x01"),
                             part10.element(0x00020002, b"UI", b"1.2.840.10008.5.1.4.1.1.7"),
                             part10.element(0x00020003, b"UI", b"1.2.3.4"),
                             part10.element(0x00020010, b"UI", ts.encode()),
                             part10.element(0x00020012, b"UI", b"1.2.826.0.1.3680043.8.498.1"),
                             part10.element(0x00020013, b"SH", b"PYDICOM 3.0")])


# --- against pydicom, on every sample ------------------------------------------------------


def test_the_meta_ends_where_pydicom_says_on_every_sample() -> None:
    """Same end of the file meta and same transfer syntax as pydicom for every sample
    file that has one; NotPart10 for the ones without."""
    wrong, without = [], 0
    for f in sample_files():
        raw = f.read_bytes()
        theirs = pydicom_meta(raw)
        if theirs is None:
            with pytest.raises(part10.NotPart10):
                part10.meta(raw)
            without += 1
            continue
        m = part10.meta(raw)
        if (m.end, m.transfer_syntax or None) != theirs:
            wrong.append(f"{f.relative_to(SAMPLES)}: {(m.end, m.transfer_syntax)} != {theirs}")
    assert not wrong, "\n".join(wrong)
    assert without == 2


def test_top_level_elements_lie_where_pydicom_reads_them_on_every_sample() -> None:
    """For every sample in a little-endian, non-deflated syntax, the top-level elements
    (tag, start, end) are pydicom's, undefined-length sequences and encapsulated pixel
    data included; the few this module refuses are the malformed and fuzzed files, which
    pydicom reads only by tolerating (truncated values, unknown VRs, missing delimiters)."""
    same, refused, wrong = 0, [], []
    for f in sample_files():
        raw = f.read_bytes()
        theirs = pydicom_meta(raw)
        if theirs is None or theirs[1] in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", None):
            continue
        implicit = theirs[1] == IMPLICIT
        try:
            mine = [(e.tag, e.start, e.end) for e in walk(raw, theirs[0], implicit)]
        except part10.Malformed:
            refused.append(str(f.relative_to(SAMPLES)))
            continue
        if mine == pydicom_elements(raw, theirs[0], implicit):
            same += 1
        else:
            wrong.append(str(f.relative_to(SAMPLES)))
    assert not wrong, wrong
    assert same > 350
    assert refused and all(r.startswith(("fuzz_generated/", "malformed/")) for r in refused), refused


def test_pixel_data_is_located_where_pydicom_reads_it() -> None:
    located = 0
    for f in sample_files():
        raw = f.read_bytes()
        theirs = pydicom_meta(raw)
        if theirs is None or theirs[1] not in (EXPLICIT, IMPLICIT) or f.parts[-2] in ("malformed",):
            continue
        elements = pydicom_elements(raw, theirs[0], theirs[1] == IMPLICIT)
        if elements is None or f.relative_to(SAMPLES).parts[0] == "fuzz_generated":
            continue
        want = next((s for t, s, _ in elements if t == part10.PIXEL_DATA), None)
        try:
            found = part10.locate(raw, theirs[0], theirs[1] == IMPLICIT, part10.PIXEL_DATA)
        except part10.Truncated:  # the whole file, ended before any Pixel Data
            assert want is None and all(t < part10.PIXEL_DATA for t, _, _ in elements), f
            continue
        assert (found.start if found else None) == want, f
        located += found is not None
    assert located > 250


# --- elements ------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True])
def test_elements_gives_each_header_and_value(implicit: bool) -> None:
    data = el(0x00080060, b"CS", b"CT", implicit) + el(0x00091010, b"OB", b"\x01\x02\x03\x04", implicit)
    got = walk(data, 0, implicit)
    vr = (None, None) if implicit else (b"CS", b"OB")
    assert got == [part10.Element(0x00080060, vr[0], 0, 8, 2, 10),
                   part10.Element(0x00091010, vr[1], 10, 18 if implicit else 22, 4,
                                  22 if implicit else 26)]


def test_elements_stops_before_the_first_tag_above_stop() -> None:
    data = el(0x00080060, b"CS", b"CT") + el(0x00100010, b"PN", b"X^Y ") + el(0x00200013, b"IS", b"1 ")
    got = walk(data, 0, False, stop=0x0010FFFF)
    assert [e.tag for e in got] == [0x00080060, 0x00100010]
    assert data[got[-1].end :].startswith(b"\x20\x00\x13\x00")


def test_an_unknown_explicit_vr_is_malformed() -> None:
    with pytest.raises(part10.Malformed, match="unknown VR"):
        list(part10.elements(el(0x00080060, b"ZZ", b"CT"), 0, False))


def test_an_error_never_quotes_the_data() -> None:
    name = b"DOE^JANE"
    data = el(0x00100010, b"PN", name) + el(0x00100020, b"LO", name)[:-3]
    with pytest.raises(part10.Truncated) as e:
        list(part10.elements(data, 0, False))
    assert "DOE" not in str(e.value)


@pytest.mark.parametrize("implicit", [False, True])
def test_every_cut_of_a_data_set_is_truncated_never_misread(implicit: bool) -> None:
    """Cut anywhere inside an element, the walk raises Truncated; cut between elements,
    it gives the whole elements before the cut."""
    seq = (undefined(0x00081140, b"SQ", implicit) + ITEM_U + el(0x00081150, b"UI", b"1.2 ", implicit)
           + ITEM_END + SEQ_END)
    data = el(0x00080060, b"CS", b"CT", implicit) + seq + el(0x00200013, b"IS", b"1 ", implicit)
    whole = walk(data, 0, implicit)
    bounds = {e.end for e in whole}
    for cut in range(1, len(data)):
        if cut in bounds:
            assert walk(data[:cut], 0, implicit) == [e for e in whole if e.end <= cut]
        else:
            with pytest.raises(part10.Truncated):
                list(part10.elements(data[:cut], 0, implicit))


@pytest.mark.parametrize("implicit", [False, True])
def test_an_undefined_length_sequence_ends_past_its_delimiter(implicit: bool) -> None:
    """Items of defined and undefined length, a nested undefined sequence, an empty item."""
    inner = undefined(0x00081199, b"SQ", implicit) + ITEM_U + ITEM_END + SEQ_END
    item_defined = el(0x00081150, b"UI", b"1.2 ", implicit)
    seq = (undefined(0x00081140, b"SQ", implicit)
           + struct.pack("<HHL", 0xFFFE, 0xE000, len(item_defined)) + item_defined
           + ITEM_U + inner + el(0x00081155, b"UI", b"1.3 ", implicit) + ITEM_END + SEQ_END)
    data = seq + el(0x00200013, b"IS", b"1 ", implicit)
    first, second = walk(data, 0, implicit)
    assert (first.tag, first.length, first.end) == (0x00081140, part10.UNDEFINED, len(seq))
    assert second.tag == 0x00200013


def test_an_undefined_length_un_holds_implicit_vr_content() -> None:
    """PS3.5 6.2.2: in an explicit VR data set, an undefined-length UN is a sequence
    encoded in Implicit VR."""
    item_content = el(0x00091001, b"", b"ABCD", implicit=True)
    un = undefined(0x00091010, b"UN") + ITEM_U + item_content + ITEM_END + SEQ_END
    data = un + el(0x00200013, b"IS", b"1 ")
    assert [e.tag for e in walk(data, 0, False)] == [0x00091010, 0x00200013]


def test_encapsulated_pixel_data_ends_past_its_delimiter() -> None:
    frames = encapsulate([b"\x01" * 10, b"\x02" * 6], has_bot=True)
    data = undefined(part10.PIXEL_DATA, b"OB") + frames + SEQ_END + el(0xFFFCFFFC, b"OB", b"\x00\x00")
    px, pad = walk(data, 0, False)
    assert px.end == 12 + len(frames) + 8 and pad.tag == 0xFFFCFFFC


def test_an_undefined_length_value_without_items_is_malformed() -> None:
    data = undefined(0x00081140, b"SQ") + el(0x00081150, b"UI", b"1.2 ") + SEQ_END
    with pytest.raises(part10.Malformed, match="other than items"):
        list(part10.elements(data, 0, False))


def test_a_sequence_without_its_delimiter_is_truncated() -> None:
    """The poisoned instance of issue 10: an undefined-length sequence never closed."""
    data = undefined(0x00081140, b"SQ") + ITEM_U + el(0x00081150, b"UI", b"1.2 ") + ITEM_END
    with pytest.raises(part10.Truncated):
        list(part10.elements(data, 0, False))


def test_nesting_past_the_limit_is_malformed_not_a_recursion_error() -> None:
    depth = 2000
    data = (undefined(0x00081140, b"SQ") + ITEM_U) * depth + (ITEM_END + SEQ_END) * depth
    with pytest.raises(part10.Malformed, match="nested too deeply"):
        list(part10.elements(data, 0, False))
    ok = (undefined(0x00081140, b"SQ") + ITEM_U) * part10.MAX_DEPTH + (ITEM_END + SEQ_END) * part10.MAX_DEPTH
    assert [e.end for e in walk(ok, 0, False)] == [len(ok)]


def test_a_huge_declared_length_is_checked_before_anything_is_read() -> None:
    data = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFF0) + b"\x00" * 16
    with pytest.raises(part10.Truncated):
        list(part10.elements(data, 0, False))


def test_looks_explicit_and_header_length() -> None:
    assert part10.looks_explicit(el(0x00080060, b"CS", b"CT"), 0)
    assert not part10.looks_explicit(el(0x00080060, b"", b"CT", implicit=True), 0)
    assert part10.header_length(b"OB") == 12 and part10.header_length(b"CS") == 8
    assert part10.header_length(None) == 8


# --- locate --------------------------------------------------------------------------------


def test_locate_finds_a_header_whose_value_is_not_there_yet() -> None:
    before = el(0x00280010, b"US", b"\x00\x02")
    data = before + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 1000)
    found = part10.locate(data, 0, False, part10.PIXEL_DATA)
    assert found is not None
    assert (found.start, found.value, found.length, found.end) == (len(before), len(before) + 12, 1000,
                                                                  len(before) + 12 + 1000)


def test_locate_says_absent_when_a_larger_tag_comes_first() -> None:
    data = el(0x00280010, b"US", b"\x00\x02") + el(0xFFFCFFFC, b"OB", b"\x00\x00")
    assert part10.locate(data, 0, False, part10.PIXEL_DATA) is None


@pytest.mark.parametrize("cut", [0, 5, 10, 14])
def test_locate_needs_more_when_the_data_ends_before_the_header(cut: int) -> None:
    data = el(0x00280010, b"US", b"\x00\x02") + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 4)
    with pytest.raises(part10.Truncated):
        part10.locate(data[:cut] if cut < 10 else data[:cut + 4], 0, False, part10.PIXEL_DATA)


# --- the file meta ---------------------------------------------------------------------


def test_file_meta_is_what_pydicom_writes() -> None:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    fm.MediaStorageSOPInstanceUID = "1.2.3.4"
    fm.TransferSyntaxUID = EXPLICIT
    fm.FileMetaInformationVersion = b"\x00\x01"
    fm.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    fm.ImplementationVersionName = "PYDICOM 3.0"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, fm, enforce_standard=True)
    assert meta_bytes() == b"\x00" * 128 + b"DICM" + fp.getvalue()


def test_meta_gives_the_transfer_syntax_and_values() -> None:
    raw = meta_bytes(IMPLICIT) + el(0x00080060, b"", b"CT", implicit=True)
    m = part10.meta(raw)
    assert m.transfer_syntax == IMPLICIT and m.end == len(raw) - 10
    assert m.value(raw, 0x00020003) == "1.2.3.4"
    assert m.value(raw, 0x00020016) is None
    assert part10.dataset_offset(raw) == m.end


def test_meta_stops_at_the_first_element_of_another_group_whatever_its_encoding() -> None:
    """An implicit VR data set starting with group 0001 (pydicom's nested_priv_SQ.dcm)."""
    raw = meta_bytes(IMPLICIT) + el(0x00010001, b"", b"\xff" * 4, implicit=True)
    assert part10.meta(raw).end == len(meta_bytes(IMPLICIT))


@pytest.mark.parametrize("bad,error", [
    (b"\x00" * 200, part10.NotPart10),
    (b"\x00" * 128 + b"DICX" + b"\x00" * 40, part10.NotPart10),
])
def test_meta_refuses_what_is_not_part10(bad: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        part10.meta(bad)


def test_every_cut_of_the_meta_is_truncated_or_whole_elements() -> None:
    """A buffer cut inside the meta raises Truncated; cut between two of its elements it
    reads as a shorter meta ending at the cut (a reader growing its buffer therefore
    wants an element header's worth past `end` before it trusts the end)."""
    raw = meta_bytes()
    full = part10.meta(raw)
    bounds = {part10.META_START} | {e.end for e in full.elements}
    for cut in range(1, len(raw)):
        if cut in bounds:
            assert part10.meta(raw[:cut]).end == cut
        else:
            with pytest.raises(part10.Truncated):
                part10.meta(raw[:cut])


def test_two_transfer_syntaxes_are_malformed() -> None:
    raw = meta_bytes() + part10.element(0x00020010, b"UI", IMPLICIT.encode())
    with pytest.raises(part10.Malformed, match="two transfer syntaxes"):
        part10.meta(raw)


def test_an_undefined_length_meta_element_is_malformed() -> None:
    raw = meta_bytes() + undefined(0x00020100, b"OB") + SEQ_END
    with pytest.raises(part10.Malformed, match="undefined length"):
        part10.meta(raw)


def test_with_transfer_syntax_changes_only_that_and_the_group_length() -> None:
    raw = meta_bytes() + el(0x00080060, b"CS", b"CT")
    m = part10.meta(raw)
    new = part10.with_transfer_syntax(raw, m, "1.2.840.10008.1.2.4.90")
    out = raw[:132] + new + raw[m.end :]
    m2 = part10.meta(out)
    assert m2.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert [out[e.start : e.end] for e in m2.elements if e.tag not in (0x00020000, 0x00020010)] == \
           [raw[e.start : e.end] for e in m.elements if e.tag not in (0x00020000, 0x00020010)]
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.file_meta.FileMetaInformationGroupLength == m2.end - 132 - 12
    assert ds.Modality == "CT"


# --- splice -----------------------------------------------------------------------------------


def test_splice_replaces_removes_and_inserts_keeping_every_other_byte() -> None:
    a, b, c = el(0x00080060, b"CS", b"CT"), el(0x00100010, b"PN", b"X^Y "), el(0x00200013, b"IS", b"1 ")
    head, tail = b"HEAD", b"\x00\x00"
    buf = head + a + b + c + tail
    spans = {0x00080060: (4, 4 + len(a)), 0x00100010: (4 + len(a), 4 + len(a) + len(b)),
             0x00200013: (4 + len(a) + len(b), len(buf) - 2)}
    new_b, inserted = el(0x00100010, b"PN", b"A^B "), el(0x00180050, b"DS", b"1 ")
    out = part10.splice(buf, spans, 4, len(buf) - 2,
                        {0x00100010: new_b, 0x00200013: None, 0x00180050: inserted, 0x7FE00010: b"PX"})
    assert out == a + new_b + inserted + b"PX" + tail


# --- encapsulation ---------------------------------------------------------------------------


def test_items_and_the_basic_offset_table_are_pydicoms() -> None:
    frames = [b"\x01" * 10, b"\x02" * 6, b"\x03" * 8]
    lengths = [len(part10.item(f)) for f in frames]
    ours = part10.basic_offset_table(lengths) + b"".join(part10.item(f) for f in frames)
    assert ours == encapsulate(frames, has_bot=True)
    assert part10.item_header(part10.item(b"ab")) == (part10.ITEM, 2)
    assert part10.item_header(part10.SEQUENCE_DELIMITER_ITEM) == (part10.SEQUENCE_DELIMITER, 0)


def test_an_offset_table_past_4_gib_is_empty() -> None:
    assert part10.basic_offset_table([1 << 31, 1 << 31, 8]) == part10.item(b"")


# --- inflation --------------------------------------------------------------------------------


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("size", [0, 1, 1000, part10.INFLATE_STEP, 3 * part10.INFLATE_STEP + 7])
def test_inflate_gives_the_data_set_up_to_its_cap(size: int) -> None:
    data = os.urandom(size // 2) + bytes(size - size // 2)
    assert part10.inflate(deflate(data), size) == data
    if size:
        with pytest.raises(part10.TooLarge):
            part10.inflate(deflate(data), size - 1)


def test_inflate_ignores_bytes_after_the_deflate_stream_as_pydicom_does() -> None:
    assert part10.inflate(deflate(b"abc") + b"junk", 10) == b"abc"


@pytest.mark.parametrize("pad", [b"\0", b"\0" * 998])
def test_inflate_ends_at_the_end_of_a_stream_longer_than_a_step_with_bytes_after_it(pad: bytes) -> None:
    """DCMTK pads an odd-length deflated data set with a byte. With output limited per
    call, zlib keeps what follows the end of the stream in unconsumed_tail: an inflate
    that loops until that is empty spins forever (it held a codec worker until its
    deadline, and the instance went out uncompressed)."""
    data = bytes(range(256)) * (part10.INFLATE_STEP // 256 + 29)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("inflate did not end"))
    signal.alarm(10)
    try:
        assert part10.inflate(deflate(data) + pad, 2 * len(data)) == data
    finally:
        signal.alarm(0)


def test_inflate_refuses_what_is_not_deflate() -> None:
    with pytest.raises(part10.Malformed):
        part10.inflate(b"\xff" * 64, 1 << 20)


def test_a_deflate_bomb_stops_at_the_cap_without_inflating_it() -> None:
    """512 MiB of zeros deflate to ~0.5 MiB; with a 4 MiB cap, inflating it allocates less
    than twice the cap (the output as it grows, one step of zlib's), never the 512 MiB."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zero = bytes(16 * MiB)
    bomb = b"".join(c.compress(zero) for _ in range(32)) + c.flush()
    assert len(bomb) < 1 * MiB
    tracemalloc.start()
    try:
        with pytest.raises(part10.TooLarge):
            part10.inflate(bomb, 4 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak
    assert part10.inflate_prefix(bomb, 1000) == bytes(1000)


def test_an_inflated_sample_is_what_pydicom_reads() -> None:
    deflated = "1.2.840.10008.1.2.1.99"
    f = next(p for p in sample_files() if (pydicom_meta(p.read_bytes()) or (0, ""))[1] == deflated)
    raw = f.read_bytes()
    m = part10.meta(raw)
    body = part10.inflate(raw[m.end :], 64 * MiB)
    ds = pydicom.dcmread(f)
    assert [e.tag for e in walk(body, 0, False)] == [int(t) for t in ds.keys()]  # noqa: SIM118


def test_a_pydicom_dataset_round_trips_through_the_walker() -> None:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.ReferencedImageSequence = [Dataset(), Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)
    data = fp.getvalue()
    assert [e.tag for e in walk(data, 0, False)] == [0x00081140, 0x00100010]

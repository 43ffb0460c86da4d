"""A deflate bomb for the tests and bench/deflate_bomb_bench.py: a valid instance in
Deflated Explicit VR Little Endian whose data set inflates to hundreds of MiB (zero
pixels) from well under 1 MiB, written without ever holding it inflated.

Issue 10 item 6: such an instance, sent by an allowed modality, is a valid instance (it
is acknowledged), but nothing may inflate it whole: pack inflates at most its cap in a
codec worker and sends it on as it came.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from appliance.core import part10
from appliance.spool.store import InstanceMeta, Spool, Stored
from tests.test_intake import MF_SC, write_multiframe_header

MiB = 1 << 20
_ZEROS = bytes(16 * MiB)


def write_bomb(path: Path, frames: int = 1024, n: int = 512) -> Path:
    """`frames` n x n 16-bit frames of zeros (1024 x 512 x 512: 512 MiB inflated) in
    Deflated Explicit VR LE: pydicom writes the header, zlib deflates header and pixels
    as a stream, 16 MiB of zeros at a time."""
    write_multiframe_header(path, frames, n, 12, ExplicitVRLittleEndian, "BOMB")
    plain = path.read_bytes()
    meta = part10.meta(plain)
    pixels = frames * n * n * 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as f:
        f.write(plain[: part10.META_START])
        f.write(part10.with_transfer_syntax(plain, meta, DeflatedExplicitVRLittleEndian))
        f.write(deflater.compress(plain[meta.end :]))
        f.write(deflater.compress(part10.element_header(part10.PIXEL_DATA, b"OW", pixels)))
        left = pixels
        while left:
            piece = min(left, len(_ZEROS))
            f.write(deflater.compress(memoryview(_ZEROS)[:piece]))
            left -= piece
        f.write(deflater.flush())
    return path


def inflated_size(path: Path) -> int:
    """What the bomb's data set inflates to, counted 16 MiB at a time."""
    raw = path.read_bytes()
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    data, total = memoryview(raw)[part10.meta(raw).end :], 0
    while data and not d.eof:
        total += len(d.decompress(data, len(_ZEROS)))
        data = memoryview(d.unconsumed_tail)
    return total + len(d.flush())


def spool_bomb(spool: Spool, path: Path) -> Stored:
    """Spool the bomb as the receiver would have (our own file meta is what it has),
    identified from its meta and first elements only: nothing here inflates it whole."""
    raw = path.read_bytes()
    meta = part10.meta(raw)
    head = part10.inflate_prefix(memoryview(raw)[meta.end :], 64 << 10)
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(head), force=True, stop_before_pixels=True)
    info = InstanceMeta(study_uid=str(ds.StudyInstanceUID), sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class=MF_SC, transfer_syntax=DeflatedExplicitVRLittleEndian,
                        calling_ae="MODALITY")
    stored = spool.store([raw], info)
    with spool.index.tx() as c:
        c.execute("UPDATE segments SET state='sealed' WHERE id=?", (stored.segment_id,))
    return stored

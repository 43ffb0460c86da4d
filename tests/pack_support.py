"""A poisoned instance, built from raw bytes: what the receiver accepts and pydicom cannot read.

After (0020,000E) Series Instance UID comes an undefined-length sequence whose item is
never closed: no item delimiter, no sequence delimiter, the file simply ends. The
receiver identifies the instance (its UIDs all lie before the sequence) and acknowledges
it; pydicom's reader raises ("No tag to read at file position ...") on the rest. Written
by hand because no DICOM toolkit writes such a file on purpose.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.uid import generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_LONG = (b"OB", b"OW", b"SQ", b"UN", b"UT")


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element, padded to even length."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr in _LONG:
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    body = (element(0x0002, 0x0001, b"OB", b"\x00\x01")
            + element(0x0002, 0x0002, b"UI", sop_class.encode())
            + element(0x0002, 0x0003, b"UI", sop_instance.encode())
            + element(0x0002, 0x0010, b"UI", transfer_syntax.encode()))
    return (b"\x00" * 128 + b"DICM"
            + element(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body)


def poisoned_instance(study_uid: str | None = None, sop_uid: str | None = None) -> tuple[bytes, str]:
    """(Part-10 bytes, its SOP Instance UID): a CT instance with an unterminated sequence."""
    sop = sop_uid or generate_uid()
    dataset = (element(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode())
               + element(0x0008, 0x0018, b"UI", sop.encode())
               + element(0x0010, 0x0010, b"PN", b"POISON^TEST")
               + element(0x0020, 0x000D, b"UI", (study_uid or generate_uid()).encode())
               + element(0x0020, 0x000E, b"UI", generate_uid().encode())
               # (0040,0260) Performed Protocol Code Sequence, undefined length ...
               + struct.pack("<HH2s2xL", 0x0040, 0x0260, b"SQ", 0xFFFFFFFF)
               # ... one item of undefined length, never delimited
               + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
               + element(0x0008, 0x0100, b"SH", b"CODE1"))
    return file_meta(CT_IMAGE_STORAGE, sop, EXPLICIT_VR_LE) + dataset, sop


def write_poisoned(path: Path, study_uid: str | None = None) -> str:
    """Write a poisoned instance to `path`; returns its SOP Instance UID."""
    raw, sop = poisoned_instance(study_uid)
    path.write_bytes(raw)
    return sop


def large_image(path: Path, study_uid: str, frames: int = 100, rows: int = 512,
                columns: int = 512) -> str:
    """Write a multi-frame 16-bit Secondary Capture image (frames x rows x columns, a
    ramp with a little noise: it compresses, every frame different) in `study_uid`, so
    that packing it takes a few seconds; returns its SOP Instance UID."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Large", "PACK-LARGE", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(7)
    ramp = np.add.outer(np.arange(frames) * 3, np.add.outer(np.arange(rows), np.arange(columns)))
    values = (ramp + rng.integers(0, 8, ramp.shape)) % 4096
    ds.PixelData = values.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def send_raw(port: int, path: Path, sop_class: str = CT_IMAGE_STORAGE,
             aet: str = "MODALITY", called: str = "EDGE") -> int | None:
    """C-STORE the file's data set bytes as they are (pynetdicom reads them in chunks
    from the file and never decodes them: no toolkit would send a broken data set
    otherwise). Returns the status, None when there was none."""
    from pynetdicom import AE, _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop_class, EXPLICIT_VR_LE)
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_store(path)
            return int(status.Status) if "Status" in status else None
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old

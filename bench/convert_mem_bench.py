#!/usr/bin/env python3
"""Memory of the dicom transport when the PACS refuses an instance's compressed syntax:
peak RSS (VmHWM) of the sending process while one large multi-frame JPEG 2000 instance
is decompressed for, and sent to, an Orthanc with `Jpeg2000TransferSyntaxAccepted: false`,
and of the conversion worker process that decoded it (`forward.conversion`).

For each frame count: `tests.test_stream_convert.write_j2k_multiframe` writes a
Multi-frame Grayscale Word SC instance in JPEG 2000 Lossless (512 x 512 frames of 10-bit
noise, 16 distinct ones repeated, one fragment per frame with a Basic Offset Table: the
appliance's own layout; ~2/3 of the decoded size), frame by frame; it is sealed in a
bundle (written in pieces); a fresh Orthanc 1.10.1 (MaximumPduLength 16384, plain TCP)
refusing JPEG 2000 is started; a child process runs `DicomTransport.send` on the bundle
and reports its VmHWM before and after the send and the time the send took (the probe
of tests/test_forward_dicom_stream.py). The stored instance's transfer syntax and Pixel
Data digest are checked against the native original. `--whole` raises the streaming
threshold above the instance, so the worker runs `codec.decompress` on it whole and the
transport holds the converted data set whole (the path used before streaming
conversion existed).

Usage: .venv/bin/python bench/convert_mem_bench.py [--frames 256,2048] [--whole] [--work DIR]
256 frames = 128 MiB decoded (86 MiB in the bundle), 2048 frames = 1 GiB (690 MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: E402

from tests.orthanc import Orthanc  # noqa: E402
from tests.test_forward_dicom_stream import big_bundle, key_file, probe_send  # noqa: E402
from tests.test_stream_convert import write_j2k_multiframe  # noqa: E402

MiB = 1 << 20


def _stored_pixel_sha256(pacs: Orthanc) -> tuple[str, str]:
    """(transfer syntax, SHA-256 of Pixel Data) of the one stored instance, without a
    second copy of it (native Pixel Data, OW, defined length, is its last element)."""
    import struct

    oid = pacs.instances()[0]
    ts = pacs.request("GET", f"/instances/{oid}/metadata/TransferSyntax").decode()
    raw = memoryview(pacs.instance_file(oid))
    pos = bytes(raw[: 1 << 20]).find(b"\xe0\x7f\x10\x00OW\x00\x00")
    (length,) = struct.unpack_from("<L", raw, pos + 8)
    return ts, hashlib.sha256(raw[pos + 12 : pos + 12 + length]).hexdigest()


def run(work: Path, frames: int, whole: bool) -> dict[str, Any]:
    src = work / f"j2k-{frames}.dcm"
    t = time.perf_counter()
    native = write_j2k_multiframe(src, frames=frames)
    size = src.stat().st_size
    print(f"wrote {size / MiB:.0f} MiB ({frames} frames, {frames * 512 * 512 * 2 / MiB:.0f} MiB decoded) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    b = big_bundle(work / f"j2k-{frames}.bundle", src, transfer_syntax=JPEG2000Lossless)
    src.unlink()
    key = key_file(work)
    with Orthanc(work / f"pacs-{frames}", extra={"Jpeg2000TransferSyntaxAccepted": False}) as pacs:
        m = probe_send(b, key, pacs.dicom_port, threshold=(1 << 62) if whole else None)
        ts, digest = _stored_pixel_sha256(pacs)
    b.unlink()
    assert ts == ExplicitVRLittleEndian, ts
    assert digest == native, "stored pixel data differ from the native original"
    return {"frames": frames, "bundle_mib": round(size / MiB, 1),
            "decoded_mib": frames * 512 * 512 * 2 // MiB,
            "path": "whole (codec.decompress)" if whole else "streamed",
            "seconds": round(m["seconds"], 1), "rss_before_mib": round(m["before"] / MiB, 1),
            "rss_after_mib": round(m["after"] / MiB, 1),
            "growth_mib": round((m["after"] - m["before"]) / MiB, 1),
            "conversion_worker_hwm_mib": round(m.get("worker", 0) / MiB, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="256,2048", help="comma-separated frame counts (512x512x16 bit)")
    ap.add_argument("--whole", action="store_true", help="raise the threshold: read whole, codec.decompress")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for frames in (int(f) for f in args.frames.split(",")):
            print(json.dumps(run(work, frames, args.whole)), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

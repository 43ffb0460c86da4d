"""The dicomweb transport's throughput and memory: STOW-RS to Orthanc on loopback.

    .venv/bin/python bench/dicomweb_bench.py [--quick] [--workdir DIR] [--out result.json]

Two bundles, each sent by `DicomWebTransport.send` to a fresh Orthanc 1.10.1 with its
DICOMweb plugin (`SyncStorageArea` off, so Orthanc's disk is not what is measured):
`many` (200 CT slices of 0.53 MB with new UIDs: several instances per 64 MB request) and
`large` (one 500-frame instance of 250 MiB: streamed, never held whole). The send runs
in a child process of its own, which samples its RSS (/proc/self/statm) at every
progress report and reports the largest growth over the RSS before the send: the memory
the transport needs, whatever the bundle's size. --quick:
20 slices and 50 frames.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from appliance.bundle.format import BundleWriter, InstanceInfo  # noqa: E402
from tests.peers import SAMPLES  # noqa: E402

CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


def instance(base: pydicom.Dataset, frames: int) -> bytes:
    ds = base.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = bytes(ds.Rows * ds.Columns * 2 * frames)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build(path: Path, key: X25519PrivateKey, count: int, frames: int) -> int:
    """A bundle of `count` instances of `frames` frames each; returns their bytes."""
    base = pydicom.dcmread(sorted(CT.iterdir())[0])
    ts = str(base.file_meta.TransferSyntaxUID)
    total = 0
    with path.open("wb") as f:
        w = BundleWriter(f, path.stem, [key.public_key()], "study")
        for _ in range(count):
            raw = instance(base, frames)
            w.begin_instance(InstanceInfo(
                pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID,
                str(base.SOPClassUID), ts, ts, len(raw), hashlib.sha256(raw).hexdigest(), "passthrough"))
            w.write(raw)
            w.end_instance()
            total += len(raw)
        w.close()
    return total


def send(bundle: Path, key_file: Path, workdir: Path) -> dict[str, float]:
    """(in the child) send the bundle to a fresh Orthanc; seconds, RSS growth, count."""
    from appliance.core.config import Destination
    from appliance.forward import Plan
    from appliance.forward.dicomweb import DicomWebTransport
    from tests.orthanc import Orthanc

    key = X25519PrivateKey.from_private_bytes(key_file.read_bytes())
    with Orthanc(workdir / "orthanc", dicomweb=True, sync_storage=False) as pacs:
        t = DicomWebTransport(Destination(name="web", transport="dicomweb", url=pacs.dicomweb_url,
                                          plaintext=True, timeout_s=120), key)
        got: list[int] = []
        rss0 = rss()
        peak = [rss0]
        t0 = time.monotonic()
        t.send(bundle.stem, bundle, lambda n: peak.append(rss()), Plan(delivered=got.append))
        seconds = time.monotonic() - t0
        return {"seconds": seconds, "rss_growth_mib": (max(peak) - rss0) / (1 << 20),
                "delivered": len(got), "stored": pacs.count()}


def rss() -> int:
    """This process's resident set size in bytes, now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("BUNDLE", "KEY", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(send(*(Path(a) for a in args.child))))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicomweb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    key = X25519PrivateKey.generate()
    key_file = work / "bench.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption()))
    cases = {"many": (20, 1) if args.quick else (200, 1), "large": (1, 50) if args.quick else (1, 500)}
    results = []
    print("| bundle | instances | MiB | seconds | MiB/s | RSS growth MiB |")
    print("|---|---|---|---|---|---|")
    for name, (count, frames) in cases.items():
        bundle = work / f"{name}.bundle"
        total = build(bundle, key, count, frames)
        child = [sys.executable, __file__, "--child", str(bundle), str(key_file), str(work / name)]
        r = subprocess.run(child, capture_output=True, text=True, check=True, timeout=1800)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        assert m["delivered"] == m["stored"] == count, m
        mib = total / (1 << 20)
        results.append({"bundle": name, "instances": count, "mib": mib, **m})
        print(f"| {name} | {count} | {mib:.0f} | {m['seconds']:.1f} | {mib / m['seconds']:.0f} | "
              f"{m['rss_growth_mib']:.1f} |")
        bundle.unlink()
    if args.out:
        args.out.write_text(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()

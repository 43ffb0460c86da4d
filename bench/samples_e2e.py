"""Every developer sample, through the appliance into Orthanc, beside the same samples sent directly.

The field question: does anything the scanner was told is stored fail to reach the PACS,
or reach it changed, or wait forever behind something else? In one run, on loopback:

- direct:    each sample file is sent to Orthanc A (the reference) by a pynetdicom SCU,
             in the file's own transfer syntax, one association per folder;
- appliance: the same files, the same way, to the appliance (J2K, verify on, the
             daemon of this checkout), which forwards over DICOM to Orthanc B.

Then, within `--settle` seconds (default 600) of the last C-STORE, every instance the
appliance acknowledged must be either in Orthanc B or parked with its reason (`queue
list`); none may be merely waiting. For every instance Orthanc A stored, the one in
Orthanc B must be the same: every attribute equal (file meta aside), and the same pixel
values (decoded when the syntax differs; the raw Pixel Data when a side cannot be
decoded here). A pynetdicom SCU sends every syntax as is; DCMTK's storescu proposes only
uncompressed syntaxes unless told which one (README), so it could not send the whole
set in one run.

    .venv/bin/python bench/samples_e2e.py [--samples ../shared/dicom-samples] [--settle 600] [--json out.json]

Prints a table of counts and the list of instances that differ, are missing or parked.
Nothing leaves loopback; everything lives in a temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.orthanc import Orthanc  # noqa: E402
from tests.peers import SAMPLES, Appliance, base_config, cli, free_port  # noqa: E402


def sendable(files: list[Path]) -> list[tuple[Path, str, str, str]]:
    """(file, SOP class, SOP instance, transfer syntax) of every file pynetdicom can send;
    the instance is named by its data set's SOP Instance UID, as the PACS names it."""
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            # The PACS files an instance under its data set's SOP Instance UID (some samples'
            # file meta says otherwise); the C-STORE carries the data set's too.
            sc = str(ds.file_meta.MediaStorageSOPClassUID)
            si = str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, OSError, EOFError):
            continue
        if sc and si and ts:
            out.append((f, sc, si, ts))
    return out


def send_folder(port: int, called: str, items: list[tuple[Path, str, str, str]]) -> dict[str, int]:
    """Send items on one association (contexts for each (class, syntax)); SOP UID -> status
    (-1: not sent: no context accepted, association failed, or the SCU could not send)."""
    out: dict[str, int] = {}
    if not items:
        return out
    ae = AE(ae_title="MODALITY")
    for pair in sorted({(sc, ts) for _, sc, _, ts in items})[:128]:
        ae.add_requested_context(*pair)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return {si: -1 for _, _, si, _ in items}
    try:
        for f, _, si, _ in items:
            try:
                rsp = assoc.send_c_store(f)
                out[si] = int(rsp.Status) if "Status" in rsp else -1
            except Exception:  # a file pynetdicom cannot send as is: not part of the comparison
                out[si] = -1
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title=called)
                if not assoc.is_established:
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def same_instance(a: bytes, b: bytes) -> str | None:
    """None when a and b hold the same attributes and pixel values, else what differs."""
    da, db = pydicom.dcmread(io.BytesIO(a)), pydicom.dcmread(io.BytesIO(b))
    for elem in da:
        if elem.tag == 0x7FE00010:
            continue
        if elem.tag not in db:
            return f"({elem.tag.group:04X},{elem.tag.element:04X}) missing"
        other = db[elem.tag]
        if elem.VR == "SQ" or other.value != elem.value:
            if elem.VR == "SQ" and str(elem.value) == str(other.value):
                continue
            if elem.tag in (0x00280006,):  # planar configuration: set to 0 by the syntax
                continue
            return f"({elem.tag.group:04X},{elem.tag.element:04X}) differs"
    if ("PixelData" in da) != ("PixelData" in db):
        return "Pixel Data missing on one side"
    if "PixelData" not in da:
        return None
    if da.file_meta.TransferSyntaxUID == db.file_meta.TransferSyntaxUID:
        return None if da.PixelData == db.PixelData else "Pixel Data differs"
    try:
        return None if np.array_equal(da.pixel_array, db.pixel_array) else "pixel values differ"
    except Exception as e:  # a syntax nothing here decodes: compare what can be compared
        return f"pixels not comparable here ({type(e).__name__})"


def run(samples: Path, work: Path, settle: float) -> dict[str, Any]:
    folders: dict[Path, list[Path]] = defaultdict(list)
    for f in sorted(p for p in samples.rglob("*") if p.is_file() and p.suffix not in (".md", ".json")):
        folders[f.parent].append(f)
    batches = {d: sendable(fs) for d, fs in folders.items()}
    with Orthanc(work / "direct") as a, Orthanc(work / "via") as b:
        cfg = base_config(work / "app", free_port())
        cfg["pack"] = {"study_quiet_s": 5}
        cfg["queue"] = {"retry_min_s": 5, "retry_max_s": 60}
        cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1",
                                "port": b.dicom_port, "ae_title": "ORTHANC", "plaintext": True,
                                "timeout_s": 30}]
        app = Appliance(work / "app", cfg).start()
        try:
            direct: dict[str, int] = {}
            via: dict[str, int] = {}
            for items in batches.values():
                direct.update(send_folder(a.dicom_port, "ORTHANC", items))
                # a SOP Instance UID some sample files share counts as acknowledged when
                # any of its files was (the fuzz cases reuse UIDs)
                for si, st in send_folder(app.port, "EDGE", items).items():
                    via[si] = st if via.get(si) != 0 else 0
            last_store = time.monotonic()
            acked = {si for si, st in via.items() if st == 0}
            waiting = _settle(app, settle)
            settled_s = time.monotonic() - last_store
            queue = json.loads(cli("queue", "list", "--json", "--config", str(app.config_path),
                                   check=True).stdout)
            in_a, in_b = a.files_by_sop_uid(), b.files_by_sop_uid()
        finally:
            app.stop()
    parked = [r for r in queue if r["state"] == "held"]
    differs = {si: why for si in in_a if si in in_b and (why := same_instance(in_a[si], in_b[si]))}
    return {
        "files": sum(len(v) for v in folders.values()),
        "sendable": sum(len(v) for v in batches.values()),
        "acked_direct": sum(1 for st in direct.values() if st == 0),
        "acked_appliance": len(acked),
        "stored_direct": len(in_a),
        "stored_via_appliance": len(in_b),
        "stored_direct_also_via": sum(1 for si in in_a if si in in_b),
        "stored_direct_identical_via": sum(1 for si in in_a if si in in_b and si not in differs),
        "stored_direct_not_via": sorted(si_name(si, batches) for si in in_a
                                        if si not in in_b and si in acked),
        "acked_not_via": sorted(si_name(si, batches) for si in acked - set(in_b)),
        "held_instances": sum(r["instances"] for r in parked),
        "failed_instances": sum(r["instances"] for r in queue if r["state"] == "failed"),
        "still_waiting_items": [{"id": r["id"], "state": r["state"], "reason": r["reason"]} for r in waiting],
        "held": [{"id": r["id"], "instances": r["instances"], "reason": r["reason"]} for r in parked],
        "differs": {si_name(si, batches): why for si, why in differs.items()},
        "queue_states": dict(Counter(r["state"] for r in queue)),
        "settled_s_after_last_store": round(settled_s, 1),
        "refused_by_appliance": dict(Counter(f"0x{st:04X}" for st in via.values() if st not in (0, -1))),
    }


def si_name(si: str, batches: dict[Path, list[tuple[Path, str, str, str]]]) -> str:
    """A sample's path (public test data, never patient data) for a SOP Instance UID."""
    for items in batches.values():
        for f, _, s, _ in items:
            if s == si:
                return str(f.relative_to(SAMPLES)) if f.is_relative_to(SAMPLES) else f.name
    return "?"


def _settle(app: Appliance, settle: float) -> list[dict[str, Any]]:
    """Wait until no queue item is still on its way (receiving, sealed, ready, active,
    deferred); return those that still are when `settle` runs out (empty: all settled)."""
    deadline = time.monotonic() + settle
    while True:
        queue = json.loads(cli("queue", "list", "--json", "--config", str(app.config_path),
                               check=True).stdout)
        busy = [r for r in queue if r["state"] not in ("delivered", "held", "failed")]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=Path, default=SAMPLES)
    ap.add_argument("--settle", type=float, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="samples-e2e-") as tmp:
        result = run(args.samples, Path(tmp), args.settle)
    for k, v in result.items():
        print(f"{k:30} {json.dumps(v, indent=1) if isinstance(v, dict | list) else v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Hostile peers on the receive port: what they cost the daemon of this checkout.

Three scenarios, each against a freshly started daemon (tests.peers.Appliance: the real
`appliance run`, loopback, temp dir; packing held off so that only receiving is measured;
acse/dimse/network timeouts set to --timeout):

1. stalled sockets: --stallers TCP connections (from --sources loopback addresses,
   127.0.1.x; default one address each) that each send one byte and stall. Reported: the
   daemon's threads and RSS once they are open, the time an allowed modality's C-ECHO
   (DCMTK echoscu) and C-STORE of one CT slice (storescu) take meanwhile, and the
   seconds until the daemon has closed every stalled socket (or that it had not after
   --close-wait s);
2. an A-ASSOCIATE-RQ whose header declares 1 GiB, followed by up to 256 MiB of junk sent
   as fast as the daemon reads it. Reported: how much it read, whether and when it closed
   the connection, and how much the daemon's peak RSS (VmHWM) grew;
3. a deflate bomb: a Secondary Capture instance in Deflated Explicit VR Little Endian
   whose 512 MiB of zero Pixel Data deflate to ~0.5 MiB, sent by `storescu -xd` from an
   allowed caller. Reported: the status the daemon answered and its peak RSS (VmHWM)
   before and after.

Usage: .venv/bin/python bench/hostile_peers.py [--timeout 5] [--stallers 60] [--sources N]
       [--scenarios stalled,associate,bomb] [--json FILE]
Needs DCMTK (echoscu, storescu). Figures: docs/benchmarks.md, "Hostile peers".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.hostile import (  # noqa: E402
    MiB,
    Stallers,
    oversized_associate_rq,
    proc_status,
    write_deflate_bomb,
)
from tests.peers import Appliance, dcmtk_env, free_port  # noqa: E402
from tests.receive_support import held_config  # noqa: E402

ECHOSCU = "/usr/bin/echoscu" if Path("/usr/bin/echoscu").exists() else "echoscu"
STORESCU = "/usr/bin/storescu" if Path("/usr/bin/storescu").exists() else "storescu"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_slice(path: Path) -> Path:
    """One 512x512 16-bit CT slice, Explicit VR Little Endian, fresh UIDs."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BENCH^HOSTILE", "BENCH-1", "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(512 * 512) % 4096).astype("<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE, ds.SOPInstanceUID
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


@contextlib.contextmanager
def daemon(root: Path, timeout: float) -> Iterator[Appliance]:
    cfg = held_config(root, free_port(), acse_timeout_s=timeout, dimse_timeout_s=timeout,
                      network_timeout_s=timeout)
    cfg["appliance"]["log_level"] = "warning"
    app = Appliance(root, cfg)
    try:
        app.start()
        yield app
    finally:
        app.stop()
        app.kill9()


def timed(cmd: list[str], timeout: float = 120) -> tuple[float, bool, str]:
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())
    except subprocess.TimeoutExpired:
        return time.monotonic() - t0, False, "timed out"
    ok = r.returncode == 0 and "Failed" not in r.stderr and "Rejected" not in r.stderr
    return time.monotonic() - t0, ok, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def stalled(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    ct = ct_slice(work / "ct.dcm")
    with daemon(work / "s", args.timeout) as app:
        assert app.proc is not None
        pid = app.proc.pid
        threads_idle = proc_status(pid, "Threads")
        st = Stallers.open(app.port, args.stallers, args.sources)
        try:
            time.sleep(1.0)  # let the daemon take them all
            out: dict[str, Any] = {
                "threads_idle": threads_idle,
                "threads_under_load": proc_status(pid, "Threads"),
                "rss_mib_under_load": round(proc_status(pid, "VmRSS") / 1024, 1),
                "stalled_still_open_after_1s": st.open_count(),
            }
            secs, ok, last = timed([ECHOSCU, "-aet", "MODALITY", "-aec", "EDGE", "-to", "30",
                                    "127.0.0.1", str(app.port)], timeout=60)
            out |= {"echo_s": round(secs, 2), "echo_ok": ok}
            if not ok:
                out["echo_error"] = last
            secs, ok, last = timed([STORESCU, "-aet", "MODALITY", "-aec", "EDGE", "-to", "30",
                                    "127.0.0.1", str(app.port), str(ct)], timeout=60)
            out |= {"store_s": round(secs, 2), "store_ok": ok}
            if not ok:
                out["store_error"] = last
            closed = st.wait_closed(args.close_wait)
            out["all_closed_after_s"] = round(closed, 1) if closed is not None else None
            out["still_open"] = st.open_count()
            out["threads_after"] = proc_status(pid, "Threads")
        finally:
            st.close()
    return out


def big_associate(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    with daemon(work / "a", args.timeout) as app:
        assert app.proc is not None
        pid = app.proc.pid
        hwm0 = proc_status(pid, "VmHWM")
        flood = oversized_associate_rq(app.port, declared=1 << 30, stream=256 * MiB, timeout=60)
        time.sleep(0.5)
        hwm1 = proc_status(pid, "VmHWM")
        return {"declared_mib": 1024, "junk_taken_mib": round(flood.sent / MiB, 1),
                "closed_by_daemon": flood.closed, "seconds": round(flood.seconds, 2),
                "peak_rss_before_mib": round(hwm0 / 1024, 1),
                "peak_rss_growth_mib": round((hwm1 - hwm0) / 1024, 1)}


def deflate_bomb(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    bomb = write_deflate_bomb(work / "bomb.dcm", inflated=args.bomb_mib * MiB)
    with daemon(work / "b", max(args.timeout, 60)) as app:
        assert app.proc is not None
        pid = app.proc.pid
        subprocess.run([ECHOSCU, "-aet", "MODALITY", "-aec", "EDGE", "127.0.0.1", str(app.port)],
                       capture_output=True, timeout=60, env=dcmtk_env())
        hwm0 = proc_status(pid, "VmHWM")
        t0 = time.monotonic()
        r = subprocess.run([STORESCU, "-v", "-xd", "-aet", "MODALITY", "-aec", "EDGE", "127.0.0.1",
                            str(app.port), str(bomb)], capture_output=True, text=True, timeout=600,
                           env=dcmtk_env())
        secs = time.monotonic() - t0
        hwm1 = proc_status(pid, "VmHWM")
        answer = next((ln.split("(", 1)[1].rstrip(")") for ln in r.stderr.splitlines()
                       if "Received Store Response" in ln), r.stderr.strip()[-200:])
        return {"file_kib": bomb.stat().st_size >> 10, "inflated_mib": args.bomb_mib,
                "answer": answer, "seconds": round(secs, 1),
                "peak_rss_before_mib": round(hwm0 / 1024, 1), "peak_rss_after_mib": round(hwm1 / 1024, 1)}


SCENARIOS = [("stalled", "stalled", stalled), ("associate", "associate_1gib", big_associate),
             ("bomb", "deflate_bomb", deflate_bomb)]


def source() -> dict[str, str]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": str(bool(git("status", "--porcelain")))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=5.0,
                    help="receive.acse/dimse/network_timeout_s of the daemon (default 5)")
    ap.add_argument("--stallers", type=int, default=60)
    ap.add_argument("--sources", type=int, default=None,
                    help="source addresses the stallers come from (default: one each)")
    ap.add_argument("--close-wait", type=float, default=30.0,
                    help="how long to wait for the daemon to close the stalled sockets")
    ap.add_argument("--bomb-mib", type=int, default=512)
    ap.add_argument("--scenarios", default="stalled,associate,bomb",
                    help="which to run (comma-separated; default all three)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    for tool in (ECHOSCU, STORESCU):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (apt-get install dcmtk)")
    work = Path(tempfile.mkdtemp(prefix="hp-", dir=args.workdir))
    try:
        result: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                  "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                  **source(), "timeout_s": args.timeout}
        for name, key, run in SCENARIOS:
            if name in args.scenarios.split(","):
                result[key] = run(work, args)
                print(f"{key}: {json.dumps(result[key])}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(result, args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    rows: list[tuple[str, str, str]] = []
    if "stalled" in r:
        s = r["stalled"]
        closed = (f"{s['all_closed_after_s']} s" if s["all_closed_after_s"] is not None
                  else f"not all within {args.close_wait:g} s ({s['still_open']} still open)")
        rows += [
            (f"{args.stallers} stalled sockets ({args.sources or args.stallers} source addresses)",
             "daemon threads idle / under load", f"{s['threads_idle']} / {s['threads_under_load']}"),
            ("", "daemon RSS under load", f"{s['rss_mib_under_load']} MiB"),
            ("", "allowed C-ECHO (echoscu)", f"{s['echo_s']} s, {'ok' if s['echo_ok'] else 'FAILED'}"),
            ("", "allowed C-STORE of one slice (storescu)",
             f"{s['store_s']} s, {'ok' if s['store_ok'] else 'FAILED'}"),
            ("", "stalled sockets closed by the daemon", closed),
        ]
    if "associate_1gib" in r:
        b = r["associate_1gib"]
        rows += [("A-ASSOCIATE-RQ declaring 1 GiB + 256 MiB junk",
                  "junk sent until the daemon closed (in kernel buffers)",
                  f"{b['junk_taken_mib']} MiB, {'closed' if b['closed_by_daemon'] else 'NOT closed'}"
                  f" after {b['seconds']} s"),
                 ("", "daemon peak RSS growth", f"{b['peak_rss_growth_mib']} MiB")]
    if "deflate_bomb" in r:
        d = r["deflate_bomb"]
        rows += [(f"deflate bomb ({d['file_kib']} KiB -> {d['inflated_mib']} MiB), storescu -xd",
                  "answer", d["answer"]),
                 ("", "daemon peak RSS before / after",
                  f"{d['peak_rss_before_mib']} / {d['peak_rss_after_mib']} MiB")]
    lines = [f"commit {r['commit']}{' (dirty)' if r['dirty'] == 'True' else ''}, "
             f"timeouts {args.timeout:g} s", "", "| scenario | figure | value |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b_} | {c} |" for a, b_, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

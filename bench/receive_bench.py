#!/usr/bin/env python3
"""Receive benchmark: how fast does a CT study get in, compared with Orthanc and storescp?

What it does (see docs/benchmarks.md for the method and the figures):
1. generates a synthetic CT study (a phantom, not noise: body, fat, muscle, lungs with
   vessels, ribs, spine, heart, aorta, liver, spleen, kidneys, bowel gas, a few HU of
   Gaussian noise; anatomy changes slowly from slice to slice) as Part-10 Explicit VR
   Little Endian files, 512x512x16-bit, CT Image Storage, into a temp dir;
2. sends the whole study with DCMTK `storescu` (TCP_NODELAY=1, -pdu 131072, one
   association) to each receiver, each run against a freshly started receiver on an
   empty state/storage directory on the same disk as the input:
     appliance  the real daemon (tests.peers.Appliance): sealed with AES-256-GCM, file and
                directory fsynced, SQLite commit (synchronous=FULL) before each Success;
     orthanc    Orthanc (tests.orthanc) with its defaults for durability (SyncStorageArea:
                fsync of each file) and MaximumPduLength 131072;
     storescp   DCMTK storescp +xa -pdu 131072: writes plain files, no fsync (a ceiling);
3. then sends it into the appliance as 4 concurrent associations, a quarter each.
Each measurement is repeated --runs times (median reported). Times are wall-clock from
starting storescu to its exit (association setup and release included). MB = 10^6 bytes.
Peak RSS is VmHWM from /proc of the receiver process (and any children), read right
after the send; CPU is the receiver's user+system time during the send.

Usage: .venv/bin/python bench/receive_bench.py [--runs 3] [--slices 300] [--quick]
Results: a markdown table on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.orthanc import Orthanc  # noqa: E402
from tests.peers import Appliance, base_config, dcmtk_env, free_port  # noqa: E402

RESULTS = REPO / "bench" / "results"
# Debian's DCMTK, not pynetdicom's same-named console scripts in .venv/bin.
STORESCU = "/usr/bin/storescu" if Path("/usr/bin/storescu").exists() else "storescu"
STORESCP = "/usr/bin/storescp" if Path("/usr/bin/storescp").exists() else "storescp"
PDU = 131072
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the study ----------------------------------------------------------------------


class _Grid:
    """Pixel-centre coordinates (mm) of a square slice, and ellipse masks cut to their bbox."""

    def __init__(self, n: int, spacing: float) -> None:
        self.n, self.spacing = n, spacing
        self.c = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * spacing
        self.x, self.y = np.meshgrid(self.c, self.c)

    def box(self, cx: float, cy: float, a: float, b: float) -> tuple[slice, slice]:
        def rng(c0: float, r: float) -> slice:
            lo = int(np.searchsorted(self.c, c0 - r))
            hi = int(np.searchsorted(self.c, c0 + r, side="right"))
            return slice(max(0, lo), min(self.n, hi))
        return rng(cy, b), rng(cx, a)

    def ellipse(self, cx: float, cy: float, a: float, b: float) -> np.ndarray:
        """Full-size mask (used for the few big shapes)."""
        return ((self.x - cx) / a) ** 2 + ((self.y - cy) / b) ** 2 <= 1.0

    def paint(self, hu: np.ndarray, cx: float, cy: float, a: float, b: float, value: float,
              within: np.ndarray | None = None) -> None:
        """Set `value` inside the ellipse (and inside `within`, if given), touching only its bbox."""
        sy, sx = self.box(cx, cy, a, b)
        x, y = self.x[sy, sx], self.y[sy, sx]
        m = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
        if within is not None:
            m &= within[sy, sx]
        hu[sy, sx][m] = value


def _bump(t: float, lo: float, hi: float) -> float:
    """0 outside [lo, hi], a smooth 0..1..0 bump inside: organs grow and shrink with z."""
    if t <= lo or t >= hi:
        return 0.0
    return float(np.sin(np.pi * (t - lo) / (hi - lo)) ** 0.5)


def phantom_slice(t: float, g: _Grid, rng: np.random.Generator, vessels: np.ndarray) -> np.ndarray:
    """Hounsfield units of one axial slice at relative position t (0 = apex of the lungs,
    1 = pelvis). Coordinates in mm: patient left = +x, posterior = +y."""
    x, y = g.x, g.y
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    a = 165 + 15 * np.sin(np.pi * t)       # body half-width
    b = 112 + 10 * np.sin(np.pi * t)       # body half-depth
    body = g.ellipse(0, 0, a, b)
    hu[body] = -95                          # subcutaneous fat
    inner = g.ellipse(0, 0, a - 14, b - 12)
    hu[inner] = 42                          # muscle / soft tissue
    # the table under the patient
    hu[(y > b + 18) & (y < b + 26) & (np.abs(x) < 210)] = 250
    # lungs with vessels, upper 55 %
    f = _bump(t, -0.15, 0.58)
    if f > 0:
        for side in (-1, 1):
            cx, cy, la, lb = side * (68 + 4 * t), -8.0, 52 * f + 8, 78 * f + 10
            sy, sx = g.box(cx, cy, la, lb)
            lung = np.zeros_like(inner)
            xs, ys = x[sy, sx], y[sy, sx]
            lung[sy, sx] = (((xs - cx) / la) ** 2 + ((ys - cy) / lb) ** 2 <= 1.0) & inner[sy, sx]
            hu[lung] = -830 + 25 * np.sin(y[lung] / 40.0)          # gravity gradient
            for vx, vy, vr, phase in vessels:
                g.paint(hu, cx + vx * la * np.cos(phase + 3 * t), cy + vy * lb * np.sin(phase + 2 * t),
                        vr, vr, 35, within=lung)
    # heart and aorta
    h = _bump(t, 0.12, 0.5)
    if h > 0:
        g.paint(hu, 18, 8, 58 * h + 5, 48 * h + 5, 45, within=inner)
    if t < 0.82:
        g.paint(hu, -14, 52 - 20 * max(0.0, 0.3 - t), 13, 13, 190)   # aorta with contrast
    # abdomen
    liv = _bump(t, 0.42, 0.82)
    if liv > 0:
        g.paint(hu, -62, 2, 82 * liv + 4, 66 * liv + 4, 62, within=inner)
    spl = _bump(t, 0.45, 0.70)
    if spl > 0:
        g.paint(hu, 88, 22, 32 * spl + 3, 46 * spl + 3, 50, within=inner)
    kid = _bump(t, 0.58, 0.86)
    if kid > 0:
        for side in (-1, 1):
            g.paint(hu, side * 72, 52, 28 * kid + 2, 36 * kid + 2, 150)       # cortex
            g.paint(hu, side * 72, 52, 17 * kid + 1, 24 * kid + 1, 32)        # medulla
    bow = _bump(t, 0.7, 1.15)
    if bow > 0:
        for i, (bx, by) in enumerate(((-40, -40), (30, -50), (60, -10), (-10, -5), (-70, -55))):
            r = (18 + 6 * np.sin(7 * t + i)) * bow + 1
            g.paint(hu, bx, by, r, r, -880 if i % 2 else 15, within=inner)   # gas / content
    # ribs: an elliptical band cut into ribs, 700..1200 HU with the angle
    if t < 0.68:
        ang = np.arctan2(y, x)
        band = g.ellipse(0, 0, a - 18, b - 16) & ~g.ellipse(0, 0, a - 27, b - 25)
        ribs = band & (np.cos(11 * ang + 9 * t) > 0.25) & (y < b - 40)
        hu[ribs] = 950 + 250 * np.cos(2 * ang[ribs])
    # spine: cortical ring, cancellous body, canal
    sy_ = b - 42
    g.paint(hu, 0, sy_, 20, 17, 1150)
    g.paint(hu, 0, sy_, 15, 12, 260)
    g.paint(hu, 0, sy_ + 26, 7, 6, 20)
    # pelvis
    pel = _bump(t, 0.84, 1.3)
    if pel > 0:
        for side in (-1, 1):
            g.paint(hu, side * 95, 20, 40 * pel + 4, 22, 1050)
            g.paint(hu, side * 95, 20, 32 * pel + 1, 15, 42)
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    noise *= np.where(body, np.float32(9.0), np.float32(3.0))
    hu += noise
    return hu


def generate_study(out: Path, slices: int, seed: int = 20240517) -> list[Path]:
    """Write `slices` CT Image Storage files; returns their paths in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n, spacing, thickness = 512, 0.703125, 1.25
    grid = _Grid(n, spacing)
    vessels = np.column_stack([rng.uniform(-0.8, 0.8, 24), rng.uniform(-0.8, 0.8, 24),
                               rng.uniform(1.5, 4.0, 24), rng.uniform(0, 6.28, 24)])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Appliance Bench"
    ds.InstitutionName = "Bench Critical Access Hospital"
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS"
    ds.SeriesDescription = "AXIAL 1.25 STD"
    ds.ManufacturerModelName = "Synthetic Phantom"
    ds.PatientName = "PHANTOM^BENCH"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "064Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.FrameOfReferenceUID = frame
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = n
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    paths = []
    for i in range(slices):
        t = i / max(1, slices - 1)
        hu = phantom_slice(t, grid, rng, vessels)
        stored = np.clip(np.rint(hu + 1024), 0, 4095).astype("<u2")
        sop = generate_uid()
        z = -i * thickness
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [-(n - 1) / 2 * spacing, -(n - 1) / 2 * spacing, z]
        ds.SliceLocation = f"{z:.2f}"
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        p = out / f"CT{i + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


# --- processes ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (d / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(d.name))
    return out


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def peak_rss_kib(pid: int) -> int:
    """VmHWM of the process and its descendants, summed (KiB)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rindex(")") + 2:].split()
            total += int(f[11]) + int(f[12])          # utime, stime
    return total / CLK_TCK


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def stop_pid(proc: subprocess.Popen[bytes] | None, grace: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def storescu_cmd(port: int, called: str, files: list[Path]) -> list[str]:
    return [STORESCU, "-aet", "MODALITY", "-aec", called, "-R", "-pdu", str(PDU),
            "127.0.0.1", str(port), *map(str, files)]


def send(port: int, called: str, groups: list[list[Path]], log: Path) -> float:
    """Run one storescu per group of files, all at once; returns wall seconds until the last exits."""
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        t0 = time.perf_counter()
        for i, g in enumerate(groups):
            fh = log.with_suffix(f".{i}.log").open("wb")
            logs.append(fh)
            procs.append(subprocess.Popen(storescu_cmd(port, called, g), stdout=fh,
                                          stderr=subprocess.STDOUT, env=dcmtk_env()))
        for p in procs:
            p.wait(600)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            stop_pid(p, grace=2)
        for fh in logs:
            fh.close()
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        text = "\n".join(log.with_suffix(f".{i}.log").read_text(errors="replace")[-2000:] for i, _ in bad)
        raise RuntimeError(f"storescu failed {bad}:\n{text}")
    return elapsed


# --- receivers: start -> (pid, port, called AE, count(), stop) ---------------------------


@dataclass
class Receiver:
    pid: int
    port: int
    called: str
    count: Callable[[], int]
    stop: Callable[[], None]


@contextlib.contextmanager
def appliance(root: Path, pack: dict[str, Any] | None = None) -> Iterator[Receiver]:
    port = free_port()
    cfg = base_config(root, port)
    if pack:
        cfg["pack"] = pack
    app = Appliance(root, cfg)
    try:
        app.start()
        assert app.proc is not None
        yield Receiver(app.proc.pid, port, "EDGE",
                       lambda: int(app.status()["receive"]["instances_received"]), app.stop)
    finally:
        app.stop()
        app.kill9()


@contextlib.contextmanager
def orthanc(root: Path) -> Iterator[Receiver]:
    pacs = Orthanc(root, max_pdu=PDU)
    try:
        pacs.start()
        assert pacs.pid is not None
        yield Receiver(pacs.pid, pacs.dicom_port, "ORTHANC", pacs.count, lambda: pacs.stop())
    finally:
        pacs.stop()


@contextlib.contextmanager
def storescp(root: Path) -> Iterator[Receiver]:
    port = free_port()
    out = root / "out"
    out.mkdir(parents=True)
    proc = None
    try:
        with (root / "storescp.log").open("wb") as log:
            proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "+xa", "-pdu", str(PDU), "-od", str(out),
                                     str(port)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(),
                                    start_new_session=True)
        wait_port(port, proc)
        p = proc
        yield Receiver(proc.pid, port, "STORESCP", lambda: sum(1 for _ in out.iterdir()),
                       lambda: stop_pid(p))
    finally:
        stop_pid(proc)


# The appliance with another policy for packing during a burst (pack.during_burst);
# "appliance-before" is the code before issue 11 item 8 (100-image first segment, no
# packing during a burst). Packing goes on alongside receiving in every variant: the
# outbox is a local directory, so a bundle never waits long for its "link".
VARIANTS: dict[str, dict[str, Any]] = {
    "appliance-never": {"during_burst": "never"},
    "appliance-always": {"during_burst": "always"},
    "appliance-first": {"during_burst": "first"},
    "appliance-before": {"during_burst": "never", "first_segment_instances": 100},
}
RECEIVERS: dict[str, Callable[[Path], contextlib.AbstractContextManager[Receiver]]] = {
    "appliance": appliance, "orthanc": orthanc, "storescp": storescp,
    **{k: functools.partial(appliance, pack=v) for k, v in VARIANTS.items()}}


# --- measurement ----------------------------------------------------------------------


@dataclass
class Series:
    name: str
    associations: int
    seconds: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def summary(self, nbytes: int, nfiles: int) -> dict[str, Any]:
        s = statistics.median(self.seconds)
        return {"receiver": self.name, "associations": self.associations, "median_s": round(s, 3),
                "runs_s": [round(v, 3) for v in self.seconds], "mb_per_s": round(nbytes / s / 1e6, 1),
                "images_per_s": round(nfiles / s, 1),
                "peak_rss_mib": round(statistics.median(self.peak_rss_kib) / 1024, 1),
                "cpu_s": round(statistics.median(self.cpu_s), 2)}


def measure(name: str, work: Path, run: int, files: list[Path],
            associations: int) -> tuple[float, int, float]:
    # short: the appliance's status socket (an AF_UNIX path, <= 107 bytes) lives under it
    root = work / f"{name[0]}{associations}-{run}"
    groups = [files[i::associations] for i in range(associations)] if associations > 1 else [files]
    try:
        with RECEIVERS[name](root) as r:
            os.sync()  # no write-back of an earlier run inside this one's timing
            cpu0 = cpu_seconds(r.pid)
            secs = send(r.port, r.called, groups, root / "storescu")
            cpu = cpu_seconds(r.pid) - cpu0
            rss = peak_rss_kib(r.pid)
            n = r.count()
            if n != len(files):
                raise RuntimeError(f"{name}: {n} of {len(files)} instances stored")
        return secs, rss, cpu
    finally:
        shutil.rmtree(root, ignore_errors=True)


def source() -> dict[str, Any]:
    """Which code was measured: the commit, and whether appliance/ had uncommitted changes."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "appliance_uncommitted_changes": bool(git("status", "--porcelain", "--", "appliance"))}


def filesystem(path: Path) -> dict[str, str]:
    """Device and type of the filesystem holding `path` (longest mount point prefix)."""
    best = ("", "", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype)
    return {"device": best[0], "mount": best[1], "type": best[2]}


def machine() -> dict[str, Any]:
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")), "0")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(int(mem) / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| receiver | assocs | MB/s | images/s | median s | runs (s) | peak RSS MiB | receiver CPU s |",
           "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['receiver']} | {r['associations']} | {r['mb_per_s']} | {r['images_per_s']} | "
                   f"{r['median_s']} | {', '.join(map(str, r['runs_s']))} | {r['peak_rss_mib']} | "
                   f"{r['cpu_s']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions per measurement (median)")
    ap.add_argument("--slices", type=int, default=300, help="slices in the study")
    ap.add_argument("--concurrency", type=int, default=4, help="associations for the concurrent test")
    ap.add_argument("--receivers", default="appliance,orthanc,storescp")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 slices, 1 run")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the study and the receivers' state go (default: system temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--study", type=Path, default=None,
                    help="reuse the .dcm files in this directory instead of generating a study")
    args = ap.parse_args(argv)
    if args.quick:
        args.slices, args.runs = 40, 1
    names = [n for n in args.receivers.split(",") if n]
    for n in names:
        if n not in RECEIVERS:
            ap.error(f"unknown receiver {n}")

    info = machine()  # before we load it
    work = Path(tempfile.mkdtemp(prefix="rb-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        if args.study:
            files = sorted(args.study.glob("*.dcm"))
            if not files:
                ap.error(f"no .dcm files in {args.study}")
        else:
            files = generate_study(work / "study", args.slices)
        nbytes = sum(p.stat().st_size for p in files)
        print(f"study: {len(files)} slices, {nbytes / 1e6:.1f} MB, generated in "
              f"{time.perf_counter() - t0:.1f} s in {work}", file=sys.stderr)
        series = {n: Series(n, 1) for n in names}
        concs = ({n: Series(n, args.concurrency) for n in names if n.startswith("appliance")}
                 if args.concurrency > 1 else {})
        conc = concs.get("appliance")
        for run in range(args.runs):
            plan = [(series[n], n, 1) for n in names]
            plan += [(c, n, args.concurrency) for n, c in concs.items()]
            for s, n, a in plan:
                secs, rss, cpu = measure(n, work, run, files, a)
                s.seconds.append(secs)
                s.peak_rss_kib.append(rss)
                s.cpu_s.append(cpu)
                print(f"run {run + 1}/{args.runs} {n} x{a}: {secs:.2f} s, {nbytes / secs / 1e6:.1f} MB/s,"
                      f" peak RSS {rss / 1024:.0f} MiB, CPU {cpu:.1f} s", file=sys.stderr)
        rows = [s.summary(nbytes, len(files)) for s in [*series.values(), *concs.values()]]
        by = {(r["receiver"], r["associations"]): r for r in rows}
        ratios: dict[str, float] = {}
        app = by.get(("appliance", 1))
        if app:
            for other in ("orthanc", "storescp"):
                if (other, 1) in by:
                    ratios[f"appliance/{other}"] = round(app["mb_per_s"] / by[(other, 1)]["mb_per_s"], 2)
            if conc:
                ratios[f"appliance {args.concurrency} assocs/1 assoc"] = round(
                    by[("appliance", args.concurrency)]["mb_per_s"] / app["mb_per_s"], 2)
        print(f"\nStudy: {len(files)} x 512x512x16-bit CT slices, {nbytes / 1e6:.1f} MB; "
              f"storescu -pdu {PDU}, TCP_NODELAY=1; median of {args.runs} run(s)\n")
        print(table(rows))
        print()
        for k, v in ratios.items():
            print(f"- {k}: {v}x")
        result = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "machine": info, "filesystem": filesystem(work), **source(),
                  "slices": len(files), "bytes": nbytes, "runs": args.runs,
                  "pdu": PDU, "results": rows, "ratios": ratios}
        stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
        out = args.out or RESULTS / f"receive-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON: {out}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())


#!/usr/bin/env python3
"""Pack benchmark: codec throughput, the real pipeline, compression ratio, memory.

What it does (see docs/benchmarks.md, sections "Pack", "Compression ratio", "Memory"):
1. throughput, on the 300-slice 512x512x16-bit phantom CT of bench/receive_bench.py
   (generated in a temp dir), in slices/s, each measurement repeated --runs times with
   everything interleaved:
     bare      pydicom Dataset.compress (pylibjpeg-openjpeg J2K lossless, pyjpegls JPEG-LS)
               on the Part-10 bytes: "encode" = dcmread + compress, "encode+decode" also
               decodes the result again and compares it with the original pixels; in this
               process (1 proc) and in a plain ProcessPoolExecutor over the slices (all
               cores; forkserver, niced like the codec workers), nothing of ours;
     pipeline  the real appliance.pack.packer.Packer: a Spool in a temp state dir filled with
               Spool.store, a Queue, a CodecPool(workers=0), one generated X25519
               recipient; timed = Packer.pack_pending() over all sealed segments (read +
               decrypt from the spool, compress in the pool, bundle + encrypt, fsync,
               index commit, spool cleanup), per codec, with verify on and off;
2. compression ratio = received bytes / bundle bytes (encryption and framing included)
   for each series in ../shared/dicom-samples/series/ and for the phantom, per codec;
3. memory: the real daemon (tests.peers.Appliance) receives one multi-frame instance of
   >= 1 GiB (Multi-frame Grayscale Word SC, 512x512x16-bit x 2048 phantom frames, written
   frame by frame) from DCMTK storescu and packs it into a bundle in its outbox folder;
   the RSS of the daemon and of its codec worker processes is sampled from /proc over
   time, and peak = sum of VmHWM. Then a tracemalloc breakdown of the copies on a
   smaller instance of the same kind, in this process. Skipped with --skip-memory; with
   --quick it runs only when --memory is given. With --memory-dest orthanc the daemon
   forwards the bundle over DICOM to an Orthanc the bench starts (plain TCP on loopback),
   and the run ends when Orthanc has stored the instance and the daemon logged
   bundle.delivered: the whole path, receive -> pack -> forward (Orthanc's own memory is
   not counted).

Usage: .venv/bin/python bench/pack_bench.py [--runs 3] [--slices 300] [--quick [--memory]]
                                            [--skip-memory] [--parts throughput,ratio,memory]
                                            [--memory-dest directory|orthanc]
Results: markdown tables on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import multiprocessing
import os
import pickle
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import receive_bench as rb  # noqa: E402  (the phantom, /proc helpers, machine info)

from tests.orthanc import Modality, Orthanc  # noqa: E402
from tests.peers import SAMPLES, Appliance, base_config, dcmtk_env, free_port  # noqa: E402

RESULTS = REPO / "bench" / "results"
CODEC_NAMES = ("jpeg2000", "jpeg-ls")
SHORT = {"jpeg2000": "J2K", "jpeg-ls": "JPEG-LS"}
MiB = 1 << 20


# --- bare codec: pydicom + the encoder plugins, nothing of ours ------------------------


def _bare_init(nice: int) -> None:
    with contextlib.suppress(OSError):
        os.nice(nice)
    warnings.simplefilter("ignore")


def bare_one(raw: bytes, codec: str, decode: bool) -> bytes:
    """dcmread + Dataset.compress (+ decode and compare): returns the encapsulated Pixel Data."""
    import pydicom
    from pydicom.pixels.utils import pixel_array

    from appliance.pack.codec import CODECS  # the table only: transfer syntax, plugin, options

    uid, plugin, opts = CODECS[codec]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw))
        original = ds.pixel_array if decode else None
        ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False, **opts)
        if decode:
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            again = pixel_array(io.BytesIO(out.getvalue()), raw=True)
            if original is None or not np.array_equal(again, original):
                raise AssertionError("round trip changed pixels")
        return bytes(ds.PixelData)


def bare_loop(paths: list[str], codec: str, decode: bool) -> tuple[float, float]:
    """The single-process reference, run in one (niced) worker: (wall s, CPU s) of the loop."""
    blobs = [Path(p).read_bytes() for p in paths]
    t0, c0 = time.perf_counter(), time.process_time()
    for b in blobs:
        bare_one(b, codec, decode)
    return time.perf_counter() - t0, time.process_time() - c0


def time_bare(files: list[Path], blobs: list[bytes], codec: str, decode: bool, single: ProcessPoolExecutor,
              pool: ProcessPoolExecutor | None) -> tuple[float, float]:
    """(wall s, CPU s): the whole loop in one worker process of `single` when `pool` is None,
    else one task per slice in `pool`."""
    if pool is None:
        return single.submit(bare_loop, [str(p) for p in files], codec, decode).result()
    cpu0 = rb.cpu_seconds(os.getpid())
    t0 = time.perf_counter()
    list(pool.map(bare_one, blobs, repeat(codec), repeat(decode)))
    return time.perf_counter() - t0, rb.cpu_seconds(os.getpid()) - cpu0


# --- the pipeline: the real Packer --------------------------------------------------


def instance_meta(raw: bytes) -> Any:
    import pydicom

    from appliance.spool.store import InstanceMeta

    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    return InstanceMeta(study_uid=str(ds.StudyInstanceUID), sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class=str(ds.SOPClassUID), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                        calling_ae="MODALITY")


@dataclass
class Packed:
    seconds: float
    cpu_s: float
    bundles: int
    bundle_bytes: int
    transmitted_bytes: int  # sum of the instances' sizes in the bundles (codec output)
    actions: Counter[str]


def run_packer(blobs: list[bytes], metas: list[Any], codec: str, verify: bool, pool: Any,
               root: Path, private_key: Any) -> Packed:
    """Fill a fresh spool with `blobs`, seal every segment, time Packer.pack_pending()."""
    from appliance.bundle import format as bundle
    from appliance.core import config, crypto, durable
    from appliance.pack.packer import Packer
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue
    from appliance.spool.store import Spool

    state = root / "state"
    durable.make_dirs(state)
    index = open_index(state)
    try:
        cfg = config.Pack(codec=codec, verify=verify)
        spool = Spool(state, crypto.SpoolKey(os.urandom(32)), index, 0, cfg.segment_max_instances,
                      cfg.segment_max_mb << 20)
        queue = Queue(state, index)
        for raw, meta in zip(blobs, metas, strict=True):
            spool.store([raw], meta)
        packer = Packer(cfg, spool, queue, [private_key.public_key()], pool)
        packer.seal_due(time.time() + 1e9)
        os.sync()  # no write-back of the fill inside the timing
        cpu0 = rb.cpu_seconds(os.getpid())
        t0 = time.perf_counter()
        packer.pack_pending()
        secs = time.perf_counter() - t0
        cpu = rb.cpu_seconds(os.getpid()) - cpu0
        items = queue.list(("ready",))
        if sum(i.instances for i in items) != len({m.sop_instance_uid for m in metas}):
            raise RuntimeError("not every instance ended up in a bundle")
        actions: Counter[str] = Counter()
        size = transmitted = 0
        for it in items:  # untimed: open every bundle with the recipient key
            p = queue.path(it.id)
            size += p.stat().st_size
            with p.open("rb") as f:
                m = bundle.read_manifest(f, private_key)
            for e in m.instances:
                actions[e.action] += 1
                transmitted += e.size
        return Packed(secs, cpu, len(items), size, transmitted, actions)
    finally:
        index.close()
        shutil.rmtree(root, ignore_errors=True)


# --- throughput -------------------------------------------------------------------------


@dataclass
class Measure:
    what: str
    codec: str
    verify: bool  # encode+decode for bare
    procs: str
    seconds: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def row(self, n: int) -> dict[str, Any]:
        s = statistics.median(self.seconds)
        return {"what": self.what, "codec": self.codec, "verify": self.verify, "procs": self.procs,
                "slices_per_s": round(n / s, 1), "median_s": round(s, 3),
                "runs_s": [round(v, 3) for v in self.seconds],
                "spread_slices_per_s": [round(n / max(self.seconds), 1), round(n / min(self.seconds), 1)],
                "cpu_s": round(statistics.median(self.cpu_s), 2) if self.cpu_s else None,
                "runs_cpu_s": [round(v, 2) for v in self.cpu_s]}


def throughput(files: list[Path], runs: int, work: Path, pool: Any, bare_pool: ProcessPoolExecutor,
               single: ProcessPoolExecutor, private_key: Any,
               log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    blobs = [p.read_bytes() for p in files]
    metas = [instance_meta(b) for b in blobs]
    n = len(blobs)
    workers = pool.workers
    ms: dict[tuple[str, str, bool, str], Measure] = {}

    def m(what: str, codec: str, verify: bool, procs: str) -> Measure:
        return ms.setdefault((what, codec, verify, procs), Measure(what, codec, verify, procs))

    for run in range(runs):
        for codec in CODEC_NAMES:
            for decode in (False, True):
                for procs, ex in (("1", None), (str(workers), bare_pool)):
                    secs, cpu = time_bare(files, blobs, codec, decode, single, ex)
                    mm = m("bare", codec, decode, procs)
                    mm.seconds.append(secs)
                    mm.cpu_s.append(cpu)
                    log(f"run {run + 1}/{runs} bare {codec} {'enc+dec' if decode else 'encode'} x{procs}: "
                        f"{secs:.2f} s, {n / secs:.1f} slices/s")
            for verify in (False, True):
                r = run_packer(blobs, metas, codec, verify, pool, work / f"p{run}{codec[:4]}{int(verify)}",
                               private_key)
                mm = m("pipeline", codec, verify, str(workers))
                mm.seconds.append(r.seconds)
                mm.cpu_s.append(r.cpu_s)
                log(f"run {run + 1}/{runs} Packer {codec} verify={verify}: {r.seconds:.2f} s, "
                    f"{n / r.seconds:.1f} slices/s, CPU {r.cpu_s:.1f} s, {r.bundles} bundles, "
                    f"{dict(r.actions)}")
    rows = [x.row(n) for x in ms.values()]

    def per_run(pipe: Measure, ref: Measure, cpu: bool = False) -> dict[str, Any]:
        # same run, so the same moment on the shared machine: pair them
        a, b = (pipe.cpu_s, ref.cpu_s) if cpu else (pipe.seconds, ref.seconds)
        rs = [r / p for p, r in zip(a, b, strict=True)]
        return {"median": round(statistics.median(rs), 2), "min": round(min(rs), 2), "max": round(max(rs), 2)}

    ratios: dict[str, Any] = {}
    w = str(workers)
    for codec in CODEC_NAMES:
        s = SHORT[codec]
        off, on = m("pipeline", codec, False, w), m("pipeline", codec, True, w)
        enc, encdec = m("bare", codec, False, w), m("bare", codec, True, w)
        ratios[f"{s} pipeline verify off / bare encode, all cores"] = per_run(off, enc)
        ratios[f"{s} pipeline verify on / bare encode+decode, all cores"] = per_run(on, encdec)
        ratios[f"{s} pipeline verify on / bare encode, all cores"] = per_run(on, enc)
        ratios[f"{s} bare encode: all cores / 1 proc"] = per_run(enc, m("bare", codec, False, "1"))
        # CPU seconds for the same work: what the other jobs on a shared machine cannot skew much
        ratios[f"{s} CPU s, bare encode / pipeline verify off"] = per_run(off, enc, cpu=True)
        ratios[f"{s} CPU s, bare encode+decode / pipeline verify on"] = per_run(on, encdec, cpu=True)
    return rows, ratios


def throughput_table(rows: list[dict[str, Any]]) -> str:
    out = ["| what | codec | verify / decode | procs | slices/s | median s | runs (s) | CPU s |",
           "|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        what = "bare pydicom" if r["what"] == "bare" else "Packer (pipeline)"
        v = ("encode+decode" if r["verify"] else "encode") if r["what"] == "bare" else (
            "verify on" if r["verify"] else "verify off")
        out.append(f"| {what} | {SHORT[r['codec']]} | {v} | {r['procs']} | {r['slices_per_s']} | "
                   f"{r['median_s']} | {', '.join(map(str, r['runs_s']))} | {r['cpu_s']} |")
    return "\n".join(out)


# --- compression ratio ------------------------------------------------------------------


def ratio_rows(series: dict[str, list[Path]], work: Path, pool: Any, private_key: Any,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for i, (name, files) in enumerate(series.items()):
        blobs = [p.read_bytes() for p in files]
        metas = [instance_meta(b) for b in blobs]
        received = sum(map(len, blobs))
        row: dict[str, Any] = {"series": name, "files": len(blobs), "received_bytes": received}
        for codec in CODEC_NAMES:
            r = run_packer(blobs, metas, codec, True, pool, work / f"r{i}{codec[:4]}", private_key)
            row[codec] = {"bundle_bytes": r.bundle_bytes, "ratio": round(received / r.bundle_bytes, 3),
                          "codec_ratio": round(received / r.transmitted_bytes, 3),
                          "overhead_bytes": r.bundle_bytes - r.transmitted_bytes,
                          "actions": dict(r.actions)}
        log(f"ratio {name}: J2K {row['jpeg2000']['ratio']}, JPEG-LS {row['jpeg-ls']['ratio']}")
        rows.append(row)
    return rows


def ratio_table(rows: list[dict[str, Any]]) -> str:
    out = ["| series | files | received MB | J2K bundle MB | J2K ratio | JPEG-LS bundle MB | JPEG-LS ratio |"
           " passed through (J2K / JLS) | bundle overhead (J2K) |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        j, ls = r["jpeg2000"], r["jpeg-ls"]
        over = j["overhead_bytes"]
        out.append(f"| {r['series']} | {r['files']} | {r['received_bytes'] / 1e6:.2f} | "
                   f"{j['bundle_bytes'] / 1e6:.2f} | {j['ratio']:.2f} | {ls['bundle_bytes'] / 1e6:.2f} | "
                   f"{ls['ratio']:.2f} | {j['actions'].get('passthrough', 0)} / "
                   f"{ls['actions'].get('passthrough', 0)} | {over / 1e3:.1f} kB "
                   f"({100 * over / j['bundle_bytes']:.2f} %) |")
    return "\n".join(out)


# --- memory: one >= 1 GiB multi-frame instance through the real daemon ----------------------

MF_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture


def write_multiframe(path: Path, frames: int, seed: int = 7) -> int:
    """A Multi-frame Grayscale Word SC instance, 512x512x16-bit, `frames` phantom slices,
    written frame by frame: pydicom writes everything but Pixel Data, then we append the
    (7FE0,0010) OW element header and the frames. Memory: one frame. Returns the size."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    n, spacing, thickness = 512, 0.703125, 0.625
    sop = generate_uid()
    now = dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = MF_WORD_SC
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "BENCHMF01"
    ds.Modality = "CT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "Appliance Bench"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT THIN SLICE VOLUME"
    ds.SeriesDescription = f"MULTIFRAME {frames} x 0.625"
    ds.PatientName = "PHANTOM^MULTIFRAME"
    ds.PatientID = "BENCH-MF-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "P"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00182005  # Slice Location Vector
    ds.SliceLocationVector = [round(-i * thickness, 3) for i in range(frames)]
    ds.Rows = ds.Columns = n
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MF_WORD_SC)
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    nbytes = frames * n * n * 2
    if nbytes >= 1 << 32:
        raise ValueError("Pixel Data over 4 GiB needs more than a 32-bit length")
    rng = np.random.default_rng(seed)
    grid = rb._Grid(n, spacing)
    vessels = np.column_stack([rng.uniform(-0.8, 0.8, 24), rng.uniform(-0.8, 0.8, 24),
                               rng.uniform(1.5, 4.0, 24), rng.uniform(0, 6.28, 24)])
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, nbytes))
        for i in range(frames):
            hu = rb.phantom_slice(i / max(1, frames - 1), grid, rng, vessels)
            f.write(np.clip(np.rint(hu + 1024), 0, 4095).astype("<u2").tobytes())
    return path.stat().st_size


def _status(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    return 0


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Samples VmRSS of a process tree every `interval` s, and the daemon's log events."""

    def __init__(self, pid: int, log_path: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.log_path, self.interval = pid, log_path, interval
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, dict[str, int]]] = []  # (t, role -> RSS KiB)
        self.events: list[tuple[float, str]] = []
        self.hwm: dict[str, int] = {}
        self.min_available_kib = _mem_available_kib()
        self.stop = threading.Event()
        self._log_pos = 0

    def roles(self) -> dict[int, str]:
        tree = rb.process_tree(self.pid)
        roles = {self.pid: "daemon"}
        workers = 0
        for p in tree[1:]:
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            parent = _ppid(p)
            if b"resource_tracker" in cmd:
                roles[p] = "resource tracker"
            elif parent == self.pid and b"forkserver" in cmd:
                roles[p] = "forkserver"
            elif roles.get(parent) == "forkserver":
                workers += 1
                roles[p] = f"worker {p}"
            else:
                roles[p] = f"other {p}"
        return roles

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        rss: dict[str, int] = {}
        for p, role in self.roles().items():
            st = _status(p)
            if st:
                rss[role] = st.get("VmRSS", 0)
                self.hwm[role] = max(self.hwm.get(role, 0), st.get("VmHWM", 0))
        self.samples.append((t, rss))
        self.min_available_kib = min(self.min_available_kib, _mem_available_kib())
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(self._log_pos)
            data = f.read()
            cut = data.rfind(b"\n") + 1
            self._log_pos += cut
            for line in data[:cut].splitlines():
                with contextlib.suppress(ValueError):
                    ev = json.loads(line).get("event", "")
                    if ev in ("instance.stored", "instance.refused", "segment.sealed", "segment.packed",
                              "dicom.sent", "bundle.delivered", "pack.verify_failed") or "error" in ev:
                        self.events.append((t, ev))

    def mark(self, what: str) -> None:
        self.events.append((time.monotonic() - self.t0, what))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def event_time(self, name: str) -> float | None:
        return next((t for t, e in self.events if e == name), None)

    def phases(self) -> list[dict[str, Any]]:
        """Max of the summed RSS and of each role's RSS between successive events."""
        marks = [(0.0, "start")] + sorted(self.events)
        out = []
        for i, (t, name) in enumerate(marks):
            end = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
            inside = [s for s in self.samples if t <= s[0] < end]
            if not inside:
                continue
            roles: dict[str, int] = {}
            for _, r in inside:
                for k, v in r.items():
                    key = "worker (max)" if k.startswith("worker") else k
                    roles[key] = max(roles.get(key, 0), v)
            out.append({"from": name, "t_s": round(t, 1), "until_s": round(min(end, inside[-1][0]), 1),
                        "max_total_rss_mib": round(max(sum(r.values()) for _, r in inside) / 1024, 1),
                        "max_rss_mib": {k: round(v / 1024, 1) for k, v in roles.items()}})
        return out


def memory_daemon(work: Path, frames: int, codec: str, log: Callable[[str], None],
                  timeout_s: float = 3600, dest: str = "directory") -> dict[str, Any]:
    if dest == "orthanc":
        edge = free_port()
        with Orthanc(work / "pacs", max_pdu=rb.PDU,
                     modalities={"edge": Modality("EDGE", "127.0.0.1", edge)}) as pacs:
            return _memory_daemon(work, frames, codec, log, timeout_s, pacs, edge)
    return _memory_daemon(work, frames, codec, log, timeout_s, None, free_port())


def _memory_daemon(work: Path, frames: int, codec: str, log: Callable[[str], None],
                   timeout_s: float, pacs: Orthanc | None, port: int) -> dict[str, Any]:
    from appliance.bundle import format as bundle
    from appliance.core import crypto

    inst = work / "mf" / "MF0001.dcm"
    t = time.perf_counter()
    size = write_multiframe(inst, frames)
    log(f"memory: wrote {size / MiB:.0f} MiB ({frames} frames) in {time.perf_counter() - t:.0f} s")
    root = work / "m"
    cfg = base_config(root, port)
    cfg["pack"] = {"codec": codec, "verify": True, "study_quiet_s": 1.0}
    if pacs is not None:
        cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1",
                                "port": pacs.dicom_port, "ae_title": "ORTHANC", "plaintext": True}]
    app = Appliance(root, cfg)
    (root / "outbox").mkdir()
    result: dict[str, Any] = {"destination": "orthanc (DICOM, plain TCP)" if pacs else "directory",
                              "instance_bytes": size, "frames": frames, "codec": codec, "verify": True,
                              "sop_class": "Multi-frame Grayscale Word Secondary Capture Image Storage"}
    sampler: Sampler | None = None
    outcome = "ok"
    try:
        app.start()
        assert app.proc is not None
        sampler = Sampler(app.proc.pid, app.log_path)
        sampler.start()
        outbox = root / "outbox"
        sampler.mark("storescu started")
        t0 = time.perf_counter()
        scu = subprocess.run([rb.STORESCU, "-aet", "MODALITY", "-aec", "EDGE", "-R", "-pdu", str(rb.PDU),
                              "127.0.0.1", str(port), str(inst)], capture_output=True, text=True,
                             timeout=1800, env=dcmtk_env())
        result["send_s"] = round(time.perf_counter() - t0, 1)
        sampler.mark("storescu exited")
        sampler.sample()
        if scu.returncode != 0 or sampler.event_time("instance.refused") is not None:
            outcome = f"storescu failed (exit {scu.returncode}) or the daemon refused the instance"
            result["storescu_output"] = (scu.stdout + scu.stderr)[-2000:]
        bundle_path = None
        deadline = time.monotonic() + timeout_s
        while outcome == "ok":
            if app.proc.poll() is not None:
                outcome = f"daemon exited with {app.proc.returncode}"
                break
            if sampler.min_available_kib < 1536 * 1024:
                outcome = "aborted: the machine's MemAvailable fell under 1.5 GiB"
                break
            if pacs is None:
                found = [p for p in outbox.glob("*.bundle") if not p.name.startswith(".")]
            else:  # the bundle stays in the queue's folder for the keep period
                found = list((app.state_dir / "bundles").glob("*.bundle"))
                if not (found and sampler.event_time("bundle.delivered") is not None
                        and pacs.count() >= 1):
                    found = []
            if found:
                bundle_path = found[0]
                break
            if time.monotonic() > deadline:
                outcome = f"timeout: no bundle in the outbox after {timeout_s:.0f} s"
                break
            time.sleep(0.5)
        time.sleep(1.0)  # a last sample or two after the bundle landed
        sampler.sample()
        result["end_to_end_s"] = round(time.perf_counter() - t0, 1)
        if pacs is not None and bundle_path is not None:
            stored = pacs.instance_file(pacs.instances()[0])
            result["pacs_stored_bytes"] = len(stored)
            del stored
        per_role = {r: rb_ for r, rb_ in sampler.hwm.items()}
        result["peak_rss_sum_vmhwm_mib"] = round(sum(per_role.values()) / 1024, 1)
        result["peak_rss_by_process_mib"] = {k: round(v / 1024, 1) for k, v in sorted(per_role.items())}
        result["peak_concurrent_rss_mib"] = round(
            max(sum(r.values()) for _, r in sampler.samples) / 1024, 1) if sampler.samples else None
        result["min_mem_available_mib"] = round(sampler.min_available_kib / 1024)
        if bundle_path is not None:
            result["bundle_bytes"] = bundle_path.stat().st_size
            key = crypto.load_private_key(Path(cfg["encryption"]["appliance_key"]))
            with bundle_path.open("rb") as f:
                man = bundle.read_manifest(f, key)
            result["bundle_instances"] = [{"action": e.action, "reason": e.reason, "size": e.size,
                                           "received_size": e.received_size} for e in man.instances]
            result["ratio"] = round(size / result["bundle_bytes"], 3)
    except Exception as e:  # report where it broke, with the daemon's last words
        outcome = f"{type(e).__name__}: {e}"
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join(5)
            result["events"] = [(round(t, 1), e) for t, e in sampler.events]
            result["phases"] = sampler.phases()
            # every ~1 s: (t, summed RSS, daemon RSS, largest worker RSS), MiB
            result["timeline"] = [
                (round(t, 1), round(sum(r.values()) / 1024), round(r.get("daemon", 0) / 1024),
                 round(max([v for k, v in r.items() if k.startswith("worker")] or [0]) / 1024))
                for t, r in sampler.samples[::5]]
        result["outcome"] = outcome
        if outcome != "ok":
            result["daemon_log_tail"] = app.log_text()[-3000:]
        app.stop(timeout=60)
        app.kill9()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(inst.parent, ignore_errors=True)
    return result


# --- memory breakdown: where the copies are (tracemalloc, in this process) ------------------


def breakdown(work: Path, frames: int, codec: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Traced bytes (Python objects and numpy arrays) held and peaked along the path one
    instance takes through the packer (appliance.pack.packer.prepare in a worker, the Result back
    through the pool's pipe), in this process, as multiples of the instance size."""
    from multiprocessing.reduction import ForkingPickler

    import pydicom.dataset

    from appliance.core import crypto, durable
    from appliance.pack import codec as codec_mod
    from appliance.pack import packer as pack_mod
    from appliance.queue.index import open_index
    from appliance.spool.store import Spool

    inst = work / "bd" / "MF.dcm"
    size = write_multiframe(inst, frames, seed=11)
    raw = inst.read_bytes()
    state = work / "bd" / "state"
    durable.make_dirs(state)
    index = open_index(state)
    spool = Spool(state, crypto.SpoolKey(os.urandom(32)), index, 0)
    rid = spool.store([raw], instance_meta(raw)).id
    del raw
    marks: list[tuple[str, int, int]] = []  # (after what, traced now, peak since start)
    orig: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str | None = None, entry: str | None = None) -> None:
        fn = getattr(owner, name)
        orig.append((owner, name, fn))

        def w(*a: Any, **k: Any) -> Any:
            if entry:
                marks.append((entry, *tracemalloc.get_traced_memory()))
            r = fn(*a, **k)
            marks.append((label or name, *tracemalloc.get_traced_memory()))
            return r
        setattr(owner, name, w)

    def x(v: int) -> float:
        return round(v / size, 2)

    steps: list[dict[str, Any]] = []
    tracemalloc.start()
    try:
        args = (str(spool.dir / rid), rid, spool.key.key, codec, True, 1 << 62)
        call = ForkingPickler.dumps((pack_mod.prepare, args, {}))
        steps.append({"step": f"pack -> worker: the pickled call ({len(call)} bytes)", "held_x": x(len(call)),
                      "peak_x": x(len(call))})
        del call
        wrap(pack_mod, "compress", "codec.compress returned",
             entry="read + decrypt (b''.join of the chunks) + file meta facts")
        for name in ("_dataset_bytes", "_parse_dataset", "_source_image", "_element_bytes", "_splice",
                     "_verify"):
            wrap(codec_mod, name)
        wrap(pydicom.dataset.Dataset, "compress", "Dataset.compress (encode all frames)")
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        prepared = pack_mod.prepare(*args)
        cur, peak = tracemalloc.get_traced_memory()
        res = prepared.result
        steps.append({"step": f"worker: pack.prepare({codec}, verify) -> {res.action}/{res.reason}, "
                              f"output {res.output_size / size:.2f}x",
                      "held_x": x(cur - base), "peak_x": x(peak - base),
                      "inside": [{"after": n, "held_x": x(c - base), "peak_so_far_x": x(p - base)}
                                 for n, c, p in marks]})
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = ForkingPickler.dumps(prepared)
        cur, peak = tracemalloc.get_traced_memory()
        steps.append({"step": "worker -> pack: pickle the result", "held_x": x(cur - base),
                      "peak_x": x(peak - base)})
        del prepared, res
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        back = pickle.loads(out)  # noqa: S301 - our own bytes, as in the pool's result thread
        cur, peak = tracemalloc.get_traced_memory()
        steps.append({"step": "pack: unpickle the result (+ the pipe buffer, as large as the pickle)",
                      "held_x": x(cur - base), "peak_x": x(peak - base)})
        del back, out
        log(f"breakdown on {size / MiB:.0f} MiB: " + "; ".join(f"{s['step'][:40]}: peak {s['peak_x']}x"
                                                              for s in steps))
    finally:
        tracemalloc.stop()
        for owner, name, fn in reversed(orig):
            setattr(owner, name, fn)
        index.close()
        shutil.rmtree(inst.parent, ignore_errors=True)
    return {"instance_bytes": size, "frames": frames, "codec": codec, "steps": steps}


def memory_table(m: dict[str, Any]) -> str:
    size_mib = m["instance_bytes"] / MiB
    out = [f"Instance: {m['sop_class']}, {m['frames']} frames 512x512x16-bit, {size_mib:.0f} MiB; "
           f"codec {m['codec']}, verify on; destination {m.get('destination', 'directory')}; "
           f"outcome: **{m['outcome']}**", "",
           "| process | peak RSS (VmHWM) MiB | x instance |", "|---|---:|---:|"]
    for k, v in m.get("peak_rss_by_process_mib", {}).items():
        out.append(f"| {k} | {v} | {v / size_mib:.2f} |")
    if "peak_rss_sum_vmhwm_mib" in m:
        v = m["peak_rss_sum_vmhwm_mib"]
        out.append(f"| **sum** | **{v}** | **{v / size_mib:.2f}** |")
    if m.get("peak_concurrent_rss_mib"):
        v = m["peak_concurrent_rss_mib"]
        out.append(f"| max of summed VmRSS at one moment (0.2 s samples) | {v} | {v / size_mib:.2f} |")
    out += ["", "| from event | t (s) | until (s) | max summed RSS MiB | max RSS per process MiB |",
            "|---|---:|---:|---:|---|"]
    for p in m.get("phases", []):
        per = ", ".join(f"{k} {v:.0f}" for k, v in sorted(p["max_rss_mib"].items()))
        out.append(f"| {p['from']} | {p['t_s']} | {p['until_s']} | {p['max_total_rss_mib']} | {per} |")
    extra = []
    if "send_s" in m:
        extra.append(f"storescu {m['send_s']} s")
    if "end_to_end_s" in m:
        where = "outbox" if m.get("destination", "directory") == "directory" else "Orthanc (delivered)"
        extra.append(f"storescu start to bundle in {where} {m['end_to_end_s']} s")
    if "ratio" in m:
        extra.append(f"bundle {m['bundle_bytes'] / MiB:.0f} MiB (ratio {m['ratio']})")
    if extra:
        out += ["", "; ".join(extra)]
    return "\n".join(out)


def breakdown_table(b: dict[str, Any]) -> str:
    out = [f"tracemalloc, {b['frames']} frames ({b['instance_bytes'] / MiB:.0f} MiB), codec {b['codec']}: "
           "bytes held after / peak during each step, in multiples of the instance size", "",
           "| step | held after | peak during |", "|---|---:|---:|"]
    for s in b["steps"]:
        out.append(f"| {s['step']} | {s['held_x']}x | {s['peak_x']}x |")
        for i in s.get("inside", []):
            out.append(f"| &nbsp;&nbsp;after {i['after']} | {i['held_x']}x | {i['peak_so_far_x']}x |")
    return "\n".join(out)


# --- main -------------------------------------------------------------------------------


def warm(pool: Any, bare_pools: list[ProcessPoolExecutor], blob: bytes) -> None:
    """Start every worker of the pools and load the codecs (not timed)."""
    futs = [pool.submit(blob, c, True) for c in CODEC_NAMES for _ in range(pool.workers)]
    futs += [bp.submit(bare_one, blob, c, True) for bp in bare_pools for c in CODEC_NAMES
             for _ in range(pool.workers)]
    wait(futs)
    for f in futs:
        f.result()


def load() -> dict[str, Any]:
    """Load average and CPU pressure (PSI): how shared the machine was."""
    out: dict[str, Any] = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    with contextlib.suppress(OSError):
        out["cpu_pressure_some"] = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    return out


def sample_series(limit: int | None) -> dict[str, list[Path]]:
    root = SAMPLES / "series"
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        files = sorted(f for f in d.iterdir() if f.is_file())
        out[d.name] = files
    if limit is not None:
        out = dict(sorted(out.items(), key=lambda kv: sum(f.stat().st_size for f in kv[1]))[:limit])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions per throughput measurement (median)")
    ap.add_argument("--slices", type=int, default=300, help="slices in the phantom CT")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 slices, 1 run, the 2 smallest sample series, no memory test")
    ap.add_argument("--parts", default="throughput,ratio,memory",
                    help="comma-separated subset of throughput,ratio,memory")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the memory test")
    ap.add_argument("--memory", action="store_true", help="run the memory test even with --quick")
    ap.add_argument("--memory-frames", type=int, default=2048,
                    help="frames of the big instance (512 KiB each; 2048 = 1 GiB)")
    ap.add_argument("--memory-codec", default="jpeg2000", choices=CODEC_NAMES)
    ap.add_argument("--memory-dest", default="directory", choices=("directory", "orthanc"),
                    help="where the daemon delivers the big instance's bundle (orthanc: over DICOM)")
    ap.add_argument("--breakdown-frames", type=int, default=256,
                    help="frames of the instance for the tracemalloc breakdown (0: skip it)")
    ap.add_argument("--workdir", type=Path, default=None, help="where temp files go (default: system temp)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args(argv)
    parts = {p for p in args.parts.split(",") if p}
    if parts - {"throughput", "ratio", "memory"}:
        ap.error(f"unknown part(s) {parts - {'throughput', 'ratio', 'memory'}}")
    series_limit = None
    if args.quick:
        args.slices, args.runs, series_limit = 16, 1, 2
        if not args.memory:
            parts.discard("memory")
        args.memory_frames = min(args.memory_frames, 64)
        args.breakdown_frames = min(args.breakdown_frames, 16)
    if args.skip_memory:
        parts.discard("memory")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from appliance.core import log as applog
    from appliance.pack import pool as pool_mod

    applog.setup(level="error", fmt="json", stream=sys.stderr)  # the Packer's info lines: not here
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    info = rb.machine()
    work = Path(tempfile.mkdtemp(prefix="pb-", dir=args.workdir))
    result: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "machine": info, "filesystem": rb.filesystem(work), **rb.source(),
                              "runs": args.runs, "parts": sorted(parts), "load_at_start": load()}
    pool = bare_pool = single = None
    try:
        key = X25519PrivateKey.generate()
        files: list[Path] = []
        if parts & {"throughput", "ratio"}:
            t0 = time.perf_counter()
            files = rb.generate_study(work / "study", args.slices)
            nbytes = sum(p.stat().st_size for p in files)
            log(f"phantom: {len(files)} slices, {nbytes / 1e6:.1f} MB, generated in "
                f"{time.perf_counter() - t0:.1f} s in {work}")
            result.update(slices=len(files), bytes=nbytes)
            pool = pool_mod.CodecPool(0)  # all cores, forkserver, niced workers: as in the daemon
            # the references run at the codec workers' priority, so that the other jobs on a
            # shared machine take the same share from both (nice 0 would beat nice 10 easily)
            ctx = multiprocessing.get_context("forkserver")
            bare_pool = ProcessPoolExecutor(pool.workers, mp_context=ctx, initializer=_bare_init,
                                            initargs=(pool_mod.WORKER_NICE,))
            single = ProcessPoolExecutor(1, mp_context=ctx, initializer=_bare_init,
                                         initargs=(pool_mod.WORKER_NICE,))
            warm(pool, [bare_pool, single], files[len(files) // 2].read_bytes())
        if "throughput" in parts:
            assert pool is not None and bare_pool is not None and single is not None
            rows, ratios = throughput(files, args.runs, work, pool, bare_pool, single, key, log)
            result["throughput"], result["ratios"] = rows, ratios
            print(f"\n## Pack throughput\n\nPhantom CT: {len(files)} x 512x512x16-bit slices, "
                  f"{result['bytes'] / 1e6:.1f} MB; {pool.workers} CPUs; median of {args.runs} run(s)\n")
            print(throughput_table(rows))
            print("\nRatios (per run, paired; median [min-max]):\n")
            for k, v in ratios.items():
                print(f"- {k}: {v['median']}x [{v['min']}-{v['max']}]")
        if "ratio" in parts:
            series = sample_series(series_limit)
            if files:
                series["phantom CT (bench/receive_bench.py)"] = files
            log(f"ratio: {len(series)} series")
            rows = ratio_rows(series, work, pool, key, log)
            result["compression"] = rows
            print("\n## Compression ratio (received bytes / bundle bytes)\n")
            print(ratio_table(rows))
        for ex in (bare_pool, single):
            if ex is not None:
                ex.shutdown()
        bare_pool = single = None
        if pool is not None:
            pool.close()
            pool = None
        if "memory" in parts:
            m = memory_daemon(work, args.memory_frames, args.memory_codec, log, dest=args.memory_dest)
            result["memory"] = m
            print("\n## Memory: one big multi-frame instance through the daemon\n")
            print(memory_table(m))
            if args.breakdown_frames:
                b = breakdown(work, args.breakdown_frames, args.memory_codec, log)
                result["memory_breakdown"] = b
                print()
                print(breakdown_table(b))
        result["load_at_end"] = load()
        stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
        out = args.out or RESULTS / f"pack-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON: {out}")
        return 0
    finally:
        for ex in (bare_pool, single):
            if ex is not None:
                ex.shutdown(cancel_futures=True)
        if pool is not None:
            pool.close(cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

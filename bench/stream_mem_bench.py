#!/usr/bin/env python3
"""Memory of the streaming pack path: peak RSS (VmHWM) while one large multi-frame
instance is packed, for several instance sizes. The target (issue #3): bounded, far
below the instance size, i.e. the same whatever the size.

For each size: `pack_bench.write_multiframe` writes a Multi-frame Grayscale Word SC
instance (512 x 512 x 16 bit, 12 stored; phantom slices, every frame different) frame by
frame; a child process spools it (`Spool.store` over an mmap of the file); the plaintext
file is deleted; then a fresh child process runs the real `Packer.pack` with a one-worker
`CodecPool` (forkserver, as the daemon does) and `pack.stream_threshold_mb` at its
default, so the worker runs `stream_pack.prepare_stream` and the packing process copies
the result into an encrypted bundle. Reported per process: VmHWM (its own peak RSS) of
the packing process ("daemon" side: pack thread + bundle writer) and of the codec worker,
and the sum. `--in-memory` runs the same with the threshold raised above the instance
size (the old path) for comparison.

Usage: .venv/bin/python bench/stream_mem_bench.py [--frames 512,2048] [--codec jpeg-ls]
       [--no-verify] [--in-memory] [--work DIR]
512 frames = 256 MiB of Pixel Data, 2048 frames = 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import mmap
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

MiB = 1 << 20


def _status(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _box(state: Path, codec: str, verify: bool, threshold_mb: int) -> Any:
    from appliance.core import crypto
    from appliance.core.config import Pack
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue
    from appliance.spool.store import Spool

    key_file = state / "spool.key"
    key = crypto.load_spool_key(key_file) if key_file.exists() else crypto.create_spool_key(key_file)
    index = open_index(state)
    spool = Spool(state, key, index, 0)
    pub = state / "a.pub"
    if not pub.exists():
        crypto.create_keypair(state / "a.key", pub)
    cfg = Pack(codec=codec, verify=verify, stream_threshold_mb=threshold_mb)
    return spool, Queue(state, index), cfg, crypto.load_public_key(pub)


def child_store(state: Path, plain: Path) -> dict[str, Any]:
    from appliance.receive.identify import identify_stored

    spool, _, _, _ = _box(state, "none", False, 64)
    with plain.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        meta = identify_stored(bytes(m[: 4 << 20]))  # the header is in the first MiB
        view = memoryview(m)
        stored = spool.store([view], meta)
        view.release()
    with spool.index.tx() as c:
        c.execute("UPDATE segments SET state='sealed' WHERE id=?", (stored.segment_id,))
    return {"segment": stored.segment_id, "instance": stored.id}


def child_pack(state: Path, segment: str, codec: str, verify: bool, threshold_mb: int) -> dict[str, Any]:
    from appliance.pack.packer import Packer
    from appliance.pack.pool import CodecPool

    spool, queue, cfg, pub = _box(state, codec, verify, threshold_mb)
    pool = CodecPool(workers=1)
    worker_hwm: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:  # the worker's VmHWM, read while it lives
        while not done.wait(0.2):
            for pid in list(getattr(pool._executor, "_processes", {}) or {}):
                worker_hwm[pid] = max(worker_hwm.get(pid, 0), _status(pid).get("VmHWM", 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    packer = Packer(cfg, spool, queue, [pub], pool)
    base = _status()
    t0 = time.monotonic()
    packer.pack(segment)
    seconds = time.monotonic() - t0
    for pid in list(getattr(pool._executor, "_processes", {}) or {}):
        worker_hwm[pid] = max(worker_hwm.get(pid, 0), _status(pid).get("VmHWM", 0))
    done.set()
    sampler.join()
    pool.close()
    seg = queue.get(segment)
    temps = [p.name for p in spool.dir.iterdir() if p.name.startswith(".tmp-")]
    return {"seconds": round(seconds, 1), "bundle_bytes": queue.path(segment).stat().st_size,
            "bytes_in": seg.bytes, "pack_process_hwm_before": base.get("VmHWM", 0),
            "pack_process_hwm": _status().get("VmHWM", 0),
            "worker_hwm": max(worker_hwm.values(), default=0), "temps_left": temps}


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(work: Path, frames: int, codec: str, verify: bool, threshold_mb: int,
            log: Any) -> dict[str, Any]:
    import pack_bench

    state = work / f"state-{frames}-{threshold_mb}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    plain = work / f"plain-{frames}.dcm"
    t = time.monotonic()
    size = pack_bench.write_multiframe(plain, frames)
    log(f"wrote {size / MiB:.0f} MiB ({frames} frames) in {time.monotonic() - t:.0f} s")
    stored = _child(["store", str(state), str(plain)])
    plain.unlink()
    log(f"spooled; packing with {codec}, verify={verify}, stream_threshold_mb={threshold_mb}")
    r = _child(["pack", str(state), stored["segment"], codec, str(int(verify)), str(threshold_mb)])
    shutil.rmtree(state, ignore_errors=True)
    return {"frames": frames, "instance_bytes": size, **r}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| instance MiB | path | pack process VmHWM MiB | codec worker VmHWM MiB | sum MiB |"
           " sum / instance | seconds | ratio | temps left |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r["pack_process_hwm"] + r["worker_hwm"]
        out.append(f"| {r['instance_bytes'] / MiB:.0f} | {r['path']} | {r['pack_process_hwm'] / MiB:.1f}"
                   f" | {r['worker_hwm'] / MiB:.1f} | {s / MiB:.1f} | {s / r['instance_bytes']:.3f}"
                   f" | {r['seconds']} | {r['instance_bytes'] / r['bundle_bytes']:.2f}"
                   f" | {len(r['temps_left'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        kind, rest = argv[1], argv[2:]
        if kind == "store":
            res = child_store(Path(rest[0]), Path(rest[1]))
        else:
            res = child_pack(Path(rest[0]), rest[1], rest[2], rest[3] == "1", int(rest[4]))
        print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="512,2048", help="comma-separated frame counts")
    ap.add_argument("--codec", default="jpeg-ls", choices=["jpeg2000", "jpeg-ls"])
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory path")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="stream-mem-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows = []
    try:
        for frames in (int(x) for x in a.frames.split(",")):
            paths = [("streaming", 64)] + ([("in-memory", 65_536)] if a.in_memory else [])
            for name, threshold in paths:
                r = run_one(work, frames, a.codec, not a.no_verify, threshold, log)
                r["path"] = name
                rows.append(r)
                log(json.dumps(r))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"codec {a.codec}, verify {not a.no_verify}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

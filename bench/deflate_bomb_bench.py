#!/usr/bin/env python3
"""Pack side of the deflate bomb (issue 10 item 6): peak RSS of the packing process (the
daemon's pack thread and bundle writer) and of its codec worker while the real
`Packer.pack` packs one instance whose 0.5 MiB Deflated Explicit VR LE data set inflates
to 512 MiB of zero pixels.

The bomb is written by `tests.deflate_bomb.write_bomb` (pydicom header, zlib stream). A
child process, running the appliance code of `--code` (default: this checkout; give a
checkout of main to measure before), spools it (our own file meta, identified from its
UIDs: nothing inflates it there), then packs its segment with a one-worker forkserver
`CodecPool` at the default config (codec jpeg2000, verify on, stream threshold 64 MiB,
max instance 4096 MiB), sampling the worker's VmHWM every 50 ms. `--crash` makes every
worker die on the instance (SIGKILL), so that the crash fallback packs it. Reported: each
process's VmHWM, what the manifest says, and whether the bundle holds the bomb byte for
byte ("identical" is false where the bomb was compressed, losslessly).

Usage: .venv/bin/python bench/deflate_bomb_bench.py [--code DIR] [--crash] [--frames 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _hwm(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_REAL_PREPARE: Any = None


def die(*args: Any, **kw: Any) -> Any:
    """Stands in for `prepare` (`--crash`): in a worker, the worker dies on the instance;
    in the packing process (where main's crash fallback called `prepare` itself) it is
    the real one."""
    if os.getpid() != int(os.environ["BOMB_PACK_PID"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_PREPARE(*args, **kw)


def child(state: Path, bomb: Path, study: str, sop: str, crash: bool) -> dict[str, Any]:
    from appliance.bundle import format as bundle
    from appliance.core import crypto
    from appliance.core.config import Pack
    from appliance.pack import packer as packer_mod
    from appliance.pack.pool import CodecPool
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue
    from appliance.spool.store import InstanceMeta, Spool

    key = crypto.create_spool_key(state / "spool.key")
    index = open_index(state)
    spool, queue = Spool(state, key, index, 0), Queue(state, index)
    crypto.create_keypair(state / "a.key", state / "a.pub")
    raw = bomb.read_bytes()
    stored = spool.store([raw], InstanceMeta(study_uid=study, sop_instance_uid=sop,
                                             sop_class="1.2.840.10008.5.1.4.1.1.7.3",
                                             transfer_syntax="1.2.840.10008.1.2.1.99",
                                             calling_ae="MODALITY"))
    with spool.index.tx() as c:
        c.execute("UPDATE segments SET state='sealed' WHERE id=?", (stored.segment_id,))
    if crash:
        global _REAL_PREPARE
        _REAL_PREPARE = packer_mod.prepare
        os.environ["BOMB_PACK_PID"] = str(os.getpid())  # before the forkserver starts
        packer_mod.prepare = die
    pool = CodecPool(workers=1)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for pid in list(getattr(pool._executor, "_processes", {}) or {}):
                peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    packer = packer_mod.Packer(Pack(), spool, queue, [crypto.load_public_key(state / "a.pub")], pool)
    before = _hwm()
    t0 = time.monotonic()
    packer.pack(stored.segment_id)
    seconds = time.monotonic() - t0
    for pid in list(getattr(pool._executor, "_processes", {}) or {}):
        peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
    done.set()
    sampler.join()
    pool.close()
    with queue.path(stored.segment_id).open("rb") as f:
        [(entry, data)] = list(bundle.iter_instances(f, crypto.load_private_key(state / "a.key")))
    return {"seconds": round(seconds, 2), "pack_process_hwm_before_mib": round(before / MiB, 1),
            "pack_process_hwm_mib": round(_hwm() / MiB, 1),
            "worker_hwm_mib": round(max(peaks.values(), default=0) / MiB, 1),
            "action": entry.action, "reason": entry.reason,
            "identical": hashlib.sha256(data).hexdigest() == hashlib.sha256(raw).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        code, state, bomb, study, sop, crash = argv[1:7]
        sys.path.insert(0, code)
        os.chdir(code)  # the forkserver puts the working directory first on its path
        print(json.dumps(child(Path(state), Path(bomb), study, sop, crash == "1")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose appliance package packs")
    ap.add_argument("--crash", action="store_true", help="every worker dies on the instance")
    ap.add_argument("--frames", type=int, default=1024, help="512x512x16 bit zero frames (1024: 512 MiB)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from pydicom import dcmread

    from appliance.core import part10
    from tests.deflate_bomb import inflated_size, write_bomb

    work = Path(tempfile.mkdtemp(prefix="deflate-bomb-"))
    try:
        bomb = write_bomb(work / "bomb.dcm", frames=a.frames)
        raw = bomb.read_bytes()
        head = part10.inflate_prefix(memoryview(raw)[part10.meta(raw).end :], 64 << 10)
        import io
        ds = dcmread(io.BytesIO(head), force=True, stop_before_pixels=True)
        (work / "state").mkdir()
        env = {**os.environ, "PYTHONPATH": f"{a.code}{os.pathsep}{REPO / 'bench'}"}
        args = [str(a.code), str(work / "state"), str(bomb), str(ds.StudyInstanceUID),
                str(ds.SOPInstanceUID), "1" if a.crash else "0"]
        out = subprocess.run([sys.executable, __file__, "--child", *args],
                             capture_output=True, text=True, env=env, check=False, timeout=1800)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"code": str(a.code), "crash": a.crash, "bomb_bytes": len(raw),
                          "inflates_to_mib": round(inflated_size(bomb) / MiB), **result}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

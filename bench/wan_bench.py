#!/usr/bin/env python3
"""Time to center over an emulated WAN: a 300-slice CT from the first C-STORE until the
reading center's Orthanc holds every instance, at 5, 20 and 100 Mbit/s (issue 11).

The bed (tests/wan.py): namespace `site` (modality = DCMTK storescu, and the appliance or
a site Orthanc) and namespace `center` (Orthanc), one veth link limited with `tc tbf`
in both directions, no added delay or loss. For each rate, in one run:

- link      the link's rate measured first with a TCP stream (goodput = TCP payload/s,
            wire = frames/s); the limits below divide by the goodput;
- raw limit      the study's Part-10 bytes / goodput (sending it uncompressed, no overhead);
- compressed limit  the bytes of the bundles the appliance packed (segments.bundle_bytes:
            J2K lossless, encrypted) / goodput, i.e. the best any compressing gateway
            could do with these bundles;
- direct    storescu in `site` -> Orthanc in `center` (what the scanner does without us);
- appliance storescu -> appliance (shipped pack defaults) in `site` -> DICOM C-STORE ->
            Orthanc in `center`;
- autoroute (at the rates in --autoroute) storescu -> a site Orthanc whose Lua
            `OnStableStudy` sends the study to the center (StableAge 5): the usual
            store-and-forward gateway.
Each mode gets a fresh center Orthanc. Times: wall clock from starting storescu until the
center's instance count (REST, polled every 0.1 s) reaches the study's size. DCMTK and
Orthanc run with TCP_NODELAY=1. MB = 10^6 bytes, Mbit = 10^6 bits.

    .venv/bin/python bench/wan_bench.py [--slices 300] [--rates 5,20,100] [--autoroute 20] [--keep]

Needs root (network namespaces). Prints a markdown table; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from receive_bench import PDU, STORESCU, generate_study, machine, source  # noqa: E402

from tests.orthanc import Modality, Orthanc  # noqa: E402
from tests.peers import Appliance, base_config, dcmtk_env, free_port  # noqa: E402
from tests.wan import Wan  # noqa: E402

# Through the REST API: Orthanc 1.10.1's Lua `SendToModality(studyId, ...)` fails with
# "Unable to read attachment dicom of instance ..." and sends nothing (seen here), while
# the same job through /modalities/{id}/store works.
AUTOROUTE_LUA = """
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/center/store',
              '{"Resources": ["' .. studyId .. '"], "Synchronous": true}')
end
"""


def storescu(wan: Wan, host: str, port: int, called: str, files: list[Path],
             log: Path) -> subprocess.Popen[bytes]:
    cmd = [STORESCU, "-aet", "MODALITY", "-aec", called, "-R", "-pdu", str(PDU), host, str(port),
           *map(str, files)]
    with log.open("wb") as fh:
        return wan.site.popen(*cmd, stdout=fh, stderr=subprocess.STDOUT, env=dcmtk_env())


def wait_all(pacs: Orthanc, n: int, sender: subprocess.Popen[bytes], log: Path, timeout: float,
             t0: float, seen: dict[str, Any]) -> float:
    """Poll until the center holds `n`; records in `seen` when it held the first one
    (`first_s`, seconds after t0) and the load average over the wait (`load_1m`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = pacs.count()
        if c and "first_s" not in seen:
            seen["first_s"] = time.perf_counter() - t0
        if c >= n:
            seen["load_1m"] = os.getloadavg()[0]
            return time.perf_counter()
        if sender.poll() not in (None, 0):
            raise RuntimeError(f"storescu failed:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"center holds {pacs.count()} of {n} after {timeout:g} s")


def center(wan: Wan, root: Path) -> Orthanc:
    return Orthanc(root, netns=wan.center.name, max_pdu=PDU).start()


def run_direct(wan: Wan, work: Path, files: list[Path], timeout: float) -> dict[str, float]:
    pacs = center(wan, work / "center")
    try:
        seen: dict[str, float] = {}
        tx0 = wan.link.counter(wan.site)
        t0 = time.perf_counter()
        p = storescu(wan, wan.center.addr, pacs.dicom_port, "ORTHANC", files, work / "storescu.log")
        done = wait_all(pacs, len(files), p, work / "storescu.log", timeout, t0, seen)
        p.wait(60)
        return {"total_s": done - t0, "wire_mb": (wan.link.counter(wan.site) - tx0) / 1e6, **seen}
    finally:
        pacs.stop()


@contextlib.contextmanager
def appliance_at_site(wan: Wan, work: Path, pack: dict[str, Any]) -> Iterator[tuple[Appliance, Orthanc]]:
    """A fresh center Orthanc, and an appliance in `site` forwarding to it by DICOM with
    the given pack settings (shipped defaults when empty); both stopped on the way out.
    Shared with bench/firstbyte_wan_bench.py."""
    pacs = center(wan, work / "center")
    try:
        cfg = base_config(work / "a", free_port())
        if pack:
            cfg["pack"] = pack
        cfg["destinations"] = [{"name": "center", "transport": "dicom", "host": wan.center.addr,
                                "port": pacs.dicom_port, "ae_title": "ORTHANC", "plaintext": True}]
        app = Appliance(work / "a", cfg)
        app.netns = wan.site.name
        try:
            app.start()
            yield app, pacs
        finally:
            app.stop()
            app.kill9()
    finally:
        pacs.stop()


def run_appliance(wan: Wan, work: Path, files: list[Path], timeout: float,
                  pack: dict[str, Any]) -> dict[str, Any]:
    with appliance_at_site(wan, work, pack) as (app, pacs):
        seen: dict[str, Any] = {}
        tx0 = wan.link.counter(wan.site)
        t0 = time.perf_counter()
        p = storescu(wan, "127.0.0.1", app.port, "EDGE", files, work / "storescu.log")
        done = wait_all(pacs, len(files), p, work / "storescu.log", timeout, t0, seen)
        wire = wan.link.counter(wan.site) - tx0
        p.wait(60)
        bundle = bundle_bytes(app.state_dir)
        seen["pack_s"] = packing_seconds(app.log_text())
    return {"total_s": done - t0, "wire_mb": wire / 1e6, "bundle_mb": bundle / 1e6, **seen}


def packing_seconds(log: str) -> list[float]:
    """How long each segment took to pack, from the daemon's `segment.packed` events."""
    out = []
    for line in log.splitlines():
        if '"segment.packed"' in line:
            out.append(float(json.loads(line)["seconds"]))
    return out


def bundle_bytes(state_dir: Path) -> int:
    conn = sqlite3.connect(f"file:{state_dir / 'queue.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT COALESCE(SUM(bundle_bytes), 0) FROM segments").fetchone()[0])
    finally:
        conn.close()


def run_autoroute(wan: Wan, work: Path, files: list[Path], timeout: float) -> dict[str, float]:
    pacs = center(wan, work / "center")
    lua = work / "autoroute.lua"
    lua.write_text(AUTOROUTE_LUA)
    site = Orthanc(work / "site", netns=wan.site.name, max_pdu=PDU, aet="SITE",
                   modalities={"center": Modality("ORTHANC", wan.center.addr, pacs.dicom_port)},
                   extra={"LuaScripts": [str(lua)], "StableAge": 5})
    try:
        site.start()
        seen: dict[str, float] = {}
        tx0 = wan.link.counter(wan.site)
        t0 = time.perf_counter()
        p = storescu(wan, "127.0.0.1", site.dicom_port, "SITE", files, work / "storescu.log")
        done = wait_all(pacs, len(files), p, work / "storescu.log", timeout, t0, seen)
        p.wait(60)
        return {"total_s": done - t0, "wire_mb": (wan.link.counter(wan.site) - tx0) / 1e6, **seen}
    finally:
        site.stop()
        pacs.stop()


def one_rate(mbit: float, work: Path, files: list[Path], autoroute: bool,
             pack: dict[str, Any]) -> dict[str, Any]:
    raw = sum(f.stat().st_size for f in files)
    timeout = 600 + raw * 8 / (mbit * 1e6) * 3
    with Wan() as wan:
        wan.link.rate(mbit)
        link = wan.link.measure(seconds=4)
        print(f"{mbit:g} Mbit/s: goodput {link['goodput_bps'] / 1e6:.2f}, wire {link['wire_bps'] / 1e6:.2f}",
              flush=True)
        r: dict[str, Any] = {"mbit": mbit, "link": link, "raw_mb": raw / 1e6, "netns": wan.names()}
        r["appliance"] = run_appliance(wan, work / "app", files, timeout, pack)
        print(f"  appliance {r['appliance']['total_s']:.1f} s (first instance at the center after"
              f" {r['appliance']['first_s']:.1f} s; segments packed in {r['appliance']['pack_s']} s;"
              f" load {r['appliance']['load_1m']:.1f})", flush=True)
        r["direct"] = run_direct(wan, work / "direct", files, timeout)
        print(f"  direct {r['direct']['total_s']:.1f} s (load {r['direct']['load_1m']:.1f})", flush=True)
        if autoroute:
            r["autoroute"] = run_autoroute(wan, work / "auto", files, timeout)
            print(f"  autoroute {r['autoroute']['total_s']:.1f} s", flush=True)
    r["raw_limit_s"] = raw * 8 / link["goodput_bps"]
    r["compressed_limit_s"] = r["appliance"]["bundle_mb"] * 1e6 * 8 / link["goodput_bps"]
    return r


TARGETS = {5: 1.1, 20: 1.2, 100: 1.5}  # appliance / compressed limit, from issue 11


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| link | measured goodput | raw limit | compressed limit | direct storescu | "
           "Orthanc auto-route | appliance | appliance / compressed limit (target) | appliance / direct |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        app, direct = r["appliance"]["total_s"], r["direct"]["total_s"]
        auto = f"{r['autoroute']['total_s']:.1f} s" if "autoroute" in r else "—"
        target = TARGETS.get(int(r["mbit"]))
        ratio = app / r["compressed_limit_s"]
        verdict = f" (≤ {target}: {'met' if ratio <= target else 'missed'})" if target else ""
        out.append(f"| {r['mbit']:g} Mbit/s | {r['link']['goodput_bps'] / 1e6:.2f} Mbit/s | "
                   f"{r['raw_limit_s']:.1f} s | {r['compressed_limit_s']:.1f} s | {direct:.1f} s | {auto} | "
                   f"**{app:.1f} s** | {ratio:.2f}x{verdict} | {app / direct:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rates", default="5,20,100", help="Mbit/s, comma-separated")
    ap.add_argument("--autoroute", default="20", help="rates at which to run Orthanc auto-routing")
    ap.add_argument("--quiet", type=float, default=None, help="pack.study_quiet_s (default: shipped)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (daemon and Orthanc logs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("wan_bench needs root (network namespaces, tc, nft)")
    # SIGTERM (e.g. `timeout`) unwinds like an exception, so the bed and peers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rates = [float(x) for x in args.rates.split(",") if x]
    auto = {float(x) for x in args.autoroute.split(",") if x}
    pack = {"study_quiet_s": args.quiet} if args.quiet is not None else {}
    root = Path(tempfile.mkdtemp(prefix="wb-", dir=args.workdir))  # short: socket paths
    try:
        files = generate_study(root / "study", args.slices)
        rows = [one_rate(m, root / f"r{m:g}", files, m in auto, pack) for m in rates]
    finally:
        if args.keep:
            print(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    raw_mb = rows[0]["raw_mb"]
    bundle_mb = rows[0]["appliance"]["bundle_mb"]
    print(f"\nStudy: {len(files)} slices, {raw_mb:.1f} MB Part-10; appliance bundles {bundle_mb:.1f} MB"
          f" (ratio {raw_mb / bundle_mb:.2f}); pack settings: {pack or 'shipped defaults'}\n")
    print(table(rows))
    out = {"slices": len(files), "pack": pack, "rows": rows, "source": source(), "machine": machine()}
    dest = args.out or REPO / "bench" / "results" / time.strftime("wan-%Y%m%d-%H%M%S.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast the reading center ingests: `appliance ingest --once` into a real Orthanc.

The bundles are made by the real appliance (J2K, its `directory` destination as the drop
folder) from copies of the 28-slice Philips CT phantom, one study per copy; then the same
bundles are ingested by `appliance ingest --once` (timed, wall clock of the process), and,
for reference, the original files are sent to a second Orthanc with DCMTK storescu (one
association per study, as a modality would).

    .venv/bin/python bench/ingest_bench.py [--studies 4] [--workdir DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e_support import appliance_config, read_dataset, settled  # noqa: E402
from tests.orthanc import Orthanc  # noqa: E402
from tests.peers import SAMPLES, Appliance, free_port, storescu, to_toml, wait_for  # noqa: E402
from tests.test_ingest import _center_keys, _study  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    keys, outbox = work / "keys", work / "outbox"
    _center_keys(keys)
    outbox.mkdir()
    series = sorted((SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())
    studies = [_study(series, work / f"study{i}", f"BENCH-{i}") for i in range(args.studies)]
    cfg = appliance_config(work / "app", free_port(),
                           {"name": "center", "transport": "directory", "path": str(outbox)})
    cfg["encryption"]["recipients"] = [str(keys / "center.pub")]
    app = Appliance(work / "app", cfg).start()
    try:
        for files in studies:
            assert storescu(app.port, files).returncode == 0
        wait_for(lambda: settled(app.state_dir), 600, "the appliance to deliver every bundle")
    finally:
        app.stop()
    bundles = sorted(outbox.glob("*.bundle"))
    n = sum(len(s) for s in studies)
    raw_mb = sum(f.stat().st_size for s in studies for f in s) / 1e6
    bundle_mb = sum(b.stat().st_size for b in bundles) / 1e6

    with Orthanc(work / "orthanc-ingest") as pacs:
        drop = work / "drop"
        drop.mkdir()
        for b in bundles:
            shutil.copyfile(b, drop / b.name)
        center = {"ingest": {"name": "bench", "drop_dir": str(drop), "state_dir": str(work / "state"),
                             "key": str(keys / "center.key"), "signing_key": str(keys / "sign.key"),
                             "log_format": "json",
                             "pacs": {"host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC",
                                      "plaintext": True}}}
        (work / "center.toml").write_text(to_toml(center))
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "appliance", "ingest", "--once", "--config",
                            str(work / "center.toml")], capture_output=True, text=True, cwd=REPO, timeout=900)
        ingest_s = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        counts = json.loads(r.stdout.splitlines()[-1])
        assert counts == {"stored": len(bundles)}, counts
        assert pacs.count() == n
        per_bundle = [json.loads(ln)["seconds"] for ln in r.stdout.splitlines()[:-1]
                      if json.loads(ln).get("event") == "ingest.stored"]

    with Orthanc(work / "orthanc-direct") as pacs:
        t0 = time.monotonic()
        for files in studies:
            assert storescu(pacs.dicom_port, files, called="ORTHANC").returncode == 0
        direct_s = time.monotonic() - t0
        assert pacs.count() == n

    result = {"instances": n, "bundles": len(bundles), "raw_mb": round(raw_mb, 1),
              "bundle_mb": round(bundle_mb, 1), "ingest_once_s": round(ingest_s, 2),
              "ingest_bundle_s_sum": round(sum(per_bundle), 2),
              "ingest_images_per_s": round(n / ingest_s, 1), "storescu_direct_s": round(direct_s, 2),
              "storescu_images_per_s": round(n / direct_s, 1),
              "transfer_syntax_in_orthanc": "J2K lossless (as bundled)"}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    assert read_dataset(studies[0][0]).Modality == "CT"
    if not args.workdir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

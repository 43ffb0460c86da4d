"""The pack benchmark runs end to end (--quick: 16 slices, 1 run, 2 small sample series,
no memory test); speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO, SAMPLES


def test_pack_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "pack_bench.py"), "--quick",
                        "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| what | codec | verify / decode | procs | slices/s |" in r.stdout, r.stdout
    for row in ("| bare pydicom | J2K | encode | 1 |", "| bare pydicom | JPEG-LS | encode+decode |",
                "| Packer (pipeline) | J2K | verify on |", "| Packer (pipeline) | JPEG-LS | verify off |"):
        assert row in r.stdout, r.stdout
    assert "J2K pipeline verify on / bare encode+decode, all cores:" in r.stdout
    assert "| series | files | received MB | J2K bundle MB | J2K ratio |" in r.stdout
    assert "| phantom CT (bench/receive_bench.py) | 16 |" in r.stdout
    assert "## Memory" not in r.stdout  # opt-in with --quick: never part of `make test`
    result = json.loads(out.read_text())
    assert result["slices"] == 16
    assert "memory" not in result
    assert len(result["throughput"]) == 12
    series = {row["series"] for row in result["compression"]}
    assert "phantom CT (bench/receive_bench.py)" in series
    if (SAMPLES / "series").is_dir():
        assert len(series) == 3
    for row in result["compression"]:
        for codec in ("jpeg2000", "jpeg-ls"):
            assert row[codec]["ratio"] > 1.0  # every series here compresses
    # every temp dir the bench made was removed
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

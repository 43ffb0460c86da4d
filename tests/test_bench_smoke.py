"""The receive benchmark runs end to end (--quick: 40 slices, 1 run); speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO

pytestmark = pytest.mark.peers


def test_receive_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "receive_bench.py"), "--quick",
                        "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| receiver | assocs | MB/s | images/s |" in r.stdout
    for row in ("| appliance | 1 |", "| orthanc | 1 |", "| storescp | 1 |", "| appliance | 4 |"):
        assert row in r.stdout, r.stdout
    assert "appliance/orthanc:" in r.stdout
    result = json.loads(out.read_text())
    assert result["slices"] == 40
    assert {(x["receiver"], x["associations"]) for x in result["results"]} == {
        ("appliance", 1), ("orthanc", 1), ("storescp", 1), ("appliance", 4)}
    # every temp dir the bench made was removed
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

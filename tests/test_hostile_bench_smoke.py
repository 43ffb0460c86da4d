"""bench/hostile_peers.py runs end to end (a small run: 10 stalled sockets, the 1 GiB
association request; the deflate bomb is left to the test that asserts on it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO

pytestmark = pytest.mark.peers


def test_hostile_peers_bench_small_run(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "hostile_peers.py"),
                        "--scenarios", "stalled,associate", "--stallers", "10", "--timeout", "2",
                        "--close-wait", "20", "--workdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| 10 stalled sockets (10 source addresses) | daemon threads idle / under load |" in r.stdout
    assert "| A-ASSOCIATE-RQ declaring 1 GiB + 256 MiB junk |" in r.stdout
    result = json.loads(out.read_text())
    assert set(result) >= {"stalled", "associate_1gib", "commit"}
    assert result["stalled"]["echo_ok"] and result["stalled"]["store_ok"]
    assert result["associate_1gib"]["closed_by_daemon"]
    # every temp dir the bench made was removed
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

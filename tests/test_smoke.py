"""The daemon starts, answers C-ECHO and stores a CT series from DCMTK storescu."""

from __future__ import annotations

from pathlib import Path

from tests.peers import echoscu, storescu


def test_echo_and_store_ct_series(appliance_factory, samples: Path) -> None:
    app = appliance_factory()
    assert echoscu(app.port).returncode == 0
    files = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())
    r = storescu(app.port, files)
    assert r.returncode == 0, r.stderr
    st = app.status()
    assert st["receive"]["instances_received"] == len(files)
    assert len(app.spooled()) == len(files)

"""The daemon starts, answers C-ECHO and stores a CT series from DCMTK storescu."""

from __future__ import annotations

from pathlib import Path

from tests.peers import base_config, echoscu, free_port, storescu


def test_echo_and_store_ct_series(appliance_factory, samples: Path, tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "a", free_port())
    # No segment is sealed (so none packed and taken out of the spool) while the test looks
    # at the spool: by default a study's first 16 instances are sealed once the burst
    # pauses, which a loaded machine makes happen in the middle of this one.
    cfg["pack"] = {"study_quiet_s": 3600, "segment_max_age_s": 3600, "first_segment_instances": 100}
    app = appliance_factory(cfg, root=tmp_path / "a")
    assert echoscu(app.port).returncode == 0
    files = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())
    r = storescu(app.port, files)
    assert r.returncode == 0, r.stderr
    st = app.status()
    assert st["receive"]["instances_received"] == len(files)
    assert len(app.spooled()) == len(files)

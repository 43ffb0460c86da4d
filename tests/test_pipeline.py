"""Receive -> pack -> queue -> directory destination, through the real daemon and storescu."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from appliance.core import crypto
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


def _cfg(root: Path, **pack: Any) -> dict[str, Any]:
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "segment_max_age_s": 30, **pack}
    cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1}
    (root / "outbox").mkdir(parents=True, exist_ok=True)
    return cfg




def test_a_studys_first_segment_is_small_and_the_rest_full(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    """pack.first_segment_instances through the daemon: 28 slices -> 4 + 10 + 10 + 4."""
    root = tmp_path / "f"
    app = appliance_factory(_cfg(root, first_segment_instances=4, segment_max_instances=10),
                            root=root)
    files = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())
    assert storescu(app.port, files).returncode == 0
    rows = wait_for(lambda: (q := _queue(app)) and sum(r["instances"] for r in q) == len(files)
                    and all(r["state"] == "delivered" for r in q) and q, timeout=60,
                    what="every bundle delivered")
    assert sorted(r["instances"] for r in rows) == [4, 4, 10, 10]
    assert rows[0]["instances"] == 4  # `queue list` is in the order segments were opened


def _queue(app: Appliance) -> list[dict[str, Any]]:
    import json
    r = cli("queue", "list", "--json", "--config", str(app.config_path), check=True)
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


def _extract(bundle: Path, key: Path, out: Path) -> list[pydicom.Dataset]:
    r = cli("bundle", "extract", str(bundle), "--key", str(key), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]


def test_series_arrives_as_one_compressed_bundle_with_identical_pixels(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "a"
    app = appliance_factory(_cfg(root, first_segment_instances=100), root=root)
    files = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())
    assert storescu(app.port, files).returncode == 0
    bundles = wait_for(lambda: list((root / "outbox").glob("*.bundle")), what="a bundle")
    wait_for(lambda: _queue(app)[0]["state"] == "delivered", what="delivered")
    assert app.spooled() == {}  # packed instances leave the spool
    received = sum(f.stat().st_size for f in files)
    assert bundles[0].stat().st_size < received / 2  # lossless J2K on CT: well under half
    out = _extract(bundles[0], root / "keys" / "appliance.key", tmp_path / "x")
    originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    assert len(out) == len(files)
    for ds in out:
        orig = originals[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
        assert np.array_equal(ds.pixel_array, orig.pixel_array)
        for elem in orig:
            if elem.tag != 0x7FE00010:
                assert ds[elem.tag].value == elem.value, elem.tag


def test_a_center_key_alone_opens_the_bundle(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "b"
    center = tmp_path / "center"
    crypto.create_keypair(center / "center.key", center / "center.pub")
    cfg = _cfg(root)
    cfg["encryption"]["recipients"] = [str(center / "center.pub")]
    app = appliance_factory(cfg, root=root)
    f = samples / "series" / "MR_GE_Signa_wrist_16sl"
    files = sorted(f.iterdir())[:3]
    assert storescu(app.port, files).returncode == 0
    bundle = wait_for(lambda: list((root / "outbox").glob("*.bundle")), what="a bundle")[0]
    out = _extract(bundle, center / "center.key", tmp_path / "x")
    assert sorted(ds.SOPInstanceUID for ds in out) == sorted(
        pydicom.dcmread(p).SOPInstanceUID for p in files)
    wrong = tmp_path / "wrong"
    crypto.create_keypair(wrong / "w.key", wrong / "w.pub")
    r = cli("bundle", "extract", str(bundle), "--key", str(wrong / "w.key"), "--out", str(tmp_path / "y"))
    assert r.returncode == 65 and "no recipient entry" in r.stderr
    assert not list((tmp_path / "y").glob("*.dcm"))  # nothing written from a bundle it cannot open


def test_missing_destination_folder_defers_then_delivers(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    cfg = _cfg(root)
    cfg["destinations"][0]["path"] = str(tmp_path / "nas")  # not mounted yet
    app = appliance_factory(cfg, root=root)
    f = next((samples / "series" / "MR_Philips_abdomen_11sl").iterdir())
    assert storescu(app.port, [f]).returncode == 0
    row = wait_for(lambda: [r for r in _queue(app) if r["state"] == "deferred"], what="deferred")[0]
    assert "does not exist" in row["reason"]
    (tmp_path / "nas").mkdir()
    wait_for(lambda: _queue(app)[0]["state"] == "delivered", what="delivered after the folder appears")
    assert len(list((tmp_path / "nas").glob("*.bundle"))) == 1


def test_operator_can_hold_and_release_a_waiting_bundle(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    cfg = _cfg(root)
    cfg["destinations"][0]["path"] = str(tmp_path / "nas")
    app = appliance_factory(cfg, root=root)
    f = next((samples / "series" / "MR_Philips_abdomen_11sl").iterdir())
    assert storescu(app.port, [f]).returncode == 0
    item = wait_for(lambda: [r for r in _queue(app) if r["state"] == "deferred"], what="deferred")[0]
    r = cli("queue", "hold", item["id"], "--config", str(app.config_path))
    assert r.returncode == 0, r.stderr
    (tmp_path / "nas").mkdir()
    time.sleep(1.5)  # several retry periods: a held bundle must not move
    assert _queue(app)[0]["state"] == "held"
    assert not list((tmp_path / "nas").iterdir())
    assert cli("queue", "release", item["id"], "--config", str(app.config_path)).returncode == 0
    wait_for(lambda: _queue(app)[0]["state"] == "delivered", what="delivered after release")


def test_queue_commands_refuse_unknown_ids(appliance_factory: Callable[..., Appliance]) -> None:
    app = appliance_factory()
    r = cli("queue", "show", "0000nothere", "--config", str(app.config_path))
    assert r.returncode == 66 and "no queue item" in r.stderr
    r = cli("queue", "hold", "--config", str(app.config_path))
    assert r.returncode == 64




def test_a_bundle_altered_on_disk_goes_to_quarantine_not_to_the_destination(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "e"
    cfg = _cfg(root)
    cfg["destinations"][0]["path"] = str(tmp_path / "nas")  # not there yet: the bundle waits
    app = appliance_factory(cfg, root=root)
    files = sorted((samples / "series" / "MR_Philips_abdomen_11sl").iterdir())[:2]
    assert storescu(app.port, files).returncode == 0
    item = wait_for(lambda: [r for r in _queue(app) if r["state"] == "deferred"], what="deferred")[0]
    path = app.state_dir / "bundles" / f"{item['id']}.bundle"
    altered = bytearray(path.read_bytes())
    altered[len(altered) // 2] ^= 0x40  # one bit, as a failing disk would
    path.write_bytes(bytes(altered))
    (tmp_path / "nas").mkdir()
    row = wait_for(lambda: [r for r in _queue(app) if r["state"] == "failed"], what="failed")[0]
    assert row["reason"].startswith("quarantined: bundle does not verify")
    assert not list((tmp_path / "nas").iterdir())  # not delivered, no temp left behind
    kept = list((app.state_dir / "quarantine").glob(f"{item['id']}.bundle.*"))
    assert [p.read_bytes() for p in kept] == [bytes(altered)]  # kept as it was
    assert "bundle.quarantined" in app.log_text()


def test_queue_commands_racing_the_forwarder_go_through_the_daemon(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    """hold / release / retry --all from the CLI while the daemon forwards: the daemon makes
    every change (one writer), the forward loop never fails, and in the end each bundle is
    in the outbox exactly when its item is delivered."""
    root = tmp_path / "r"
    cfg = _cfg(root, segment_max_instances=2)
    cfg["queue"] = {"retry_min_s": 0.1, "retry_max_s": 1}
    # Bundles go out as soon as they are packed: a bandwidth cap (about 0.5 s a bundle)
    # keeps some of them waiting while the commands run, so that there is a race at all.
    cfg["destinations"][0]["max_kbit_s"] = 3000
    app = appliance_factory(cfg, root=root)
    files = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())
    assert storescu(app.port, files).returncode == 0
    # The race starts with the first bundle queued (packing starts when the burst has ended,
    # which a loaded machine can delay past the 8 s the commands run for).
    wait_for(lambda: _queue(app), timeout=60, what="a first bundle queued")
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for verb in ("hold", "retry", "release", "hold", "release"):
            r = cli("queue", verb, "--all", "--config", str(app.config_path))
            assert r.returncode == 0, r.stderr
            outcomes[verb] = outcomes.get(verb, 0) + r.stdout.count(f": {verb}")
    assert outcomes["hold"] > 0, "no bundle was ever waiting to be held: the race was not run"
    assert cli("queue", "release", "--all", "--config", str(app.config_path)).returncode == 0
    rows = wait_for(lambda: (q := _queue(app)) and all(r["state"] == "delivered" for r in q) and q,
                    timeout=60, what="every bundle delivered")
    assert len(rows) == 14
    sent = {p.name.removesuffix(".bundle") for p in (root / "outbox").glob("*.bundle")}
    assert sent == {r["id"] for r in rows}
    for line in app.log_text().splitlines():
        assert "loop_error" not in line and "send_crashed" not in line, line


def test_queue_commands_without_a_daemon_change_the_index_under_its_lock(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "s"
    cfg = _cfg(root)
    cfg["destinations"][0]["path"] = str(tmp_path / "nas")  # missing: the bundle waits
    app = appliance_factory(cfg, root=root)
    f = next((samples / "series" / "MR_Philips_abdomen_11sl").iterdir())
    assert storescu(app.port, [f]).returncode == 0
    item = wait_for(lambda: [r for r in _queue(app) if r["state"] == "deferred"], what="deferred")[0]
    app.stop()
    r = cli("queue", "hold", item["id"], "--config", str(app.config_path))
    assert r.returncode == 0, r.stderr
    assert _queue(app)[0]["state"] == "held"
    import fcntl
    with (root / "state" / "run" / "daemon.lock").open("a") as lock:  # a daemon that hangs at start
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = cli("queue", "release", item["id"], "--config", str(app.config_path))
    assert r.returncode == 69 and "does not answer" in r.stderr, r.stderr
    assert _queue(app)[0]["state"] == "held"

"""Diagnostics (ops/diagnostics.py): a PHI-free document of the box for the operations
center and the technician — what it keeps of the log, what it elides of the config, how
it is cut into parts and put together again; and the real daemon's document with a
study of canary patient data received."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from appliance.ops import diagnostics
from appliance.ops.diagnostics import Assembler, Recent, elide, pack, parts, safe_value
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for
from tests.test_ops_link import CANARY, canary_study


@pytest.mark.parametrize(("value", "kept"), [
    (3, 3), (2.5, 2.5), (True, True), (None, None), ("seg-0a1b", "seg-0a1b"),
    ("refused", "refused"), ("/var/lib/appliance/spool/ab12", "/var/lib/appliance/spool/ab12"),
    ("CANARY^PHI^ZZQX", "<text>"), ("the PACS said: patient DOE, JOHN not found", "<text>"),
    ("x" * 81, "<text>"), (float("nan"), "nan"), (["a", 1], ["a", 1]), ([["a"]], "<text>"),
    ({"k": "v"}, "<text>"), (b"bytes", "<text>"),
])
def test_the_log_ring_keeps_numbers_and_short_tokens_and_no_free_text(value: object, kept: object) -> None:
    assert safe_value(value) == kept


def test_the_ring_keeps_the_last_events_made_safe() -> None:
    r = Recent(size=3)
    for i in range(5):
        r("bundle.deferred", {"level": "warning", "bundle": f"b{i}", "reason": "DOE^JOHN refused it",
                               "event": "x", "timestamp": "t"})
    events = r.events()
    assert [e["bundle"] for e in events] == ["b2", "b3", "b4"]
    assert events[0]["reason"] == "<text>" and events[0]["level"] == "warning"
    assert "timestamp" not in events[0] and events[0]["event"] == "bundle.deferred"


def test_secret_values_are_elided_and_paths_to_key_files_kept() -> None:
    cfg = {"destinations": [{"name": "cloud", "token_file": "/etc/appliance/token",
                             "password": "hunter2", "client_secret": "s3"}],
           "operations": {"key": "/data/keys/mqtt.key"}, "x": {"passphrase": ""}}
    out = elide(cfg)
    d = out["destinations"][0]
    assert d["password"] == d["client_secret"] == "<elided>"  # noqa: S105 - the elision mark
    assert d["token_file"] == "/etc/appliance/token"  # noqa: S105 - a path, kept
    assert out["operations"]["key"] == "/data/keys/mqtt.key"
    assert out["x"]["passphrase"] == ""  # nothing to elide


def test_parts_put_together_give_the_document_and_each_part_fits_128_kib() -> None:
    doc = {"v": 1, "log": [{"event": "e", "n": i, "pad": base64.b64encode(os.urandom(150)).decode()}
                           for i in range(2000)]}
    msgs, summary = parts(pack(doc), "cmd-1")
    assert summary["parts"] == len(msgs) > 1
    assert all(len(json.dumps(m)) <= 128 * 1024 + 200 for m in msgs)
    a = Assembler("cmd-1")
    for m in reversed(msgs):  # any order
        a.add(m)
        a.add({**m, "cmd_id": "other"})  # another command's parts are ignored
    assert a.complete() and a.document() == doc


def test_a_part_altered_on_the_way_is_caught_by_the_digest() -> None:
    msgs, _ = parts(pack({"v": 1, "log": []}), "cmd-2")
    a = Assembler("cmd-2")
    bad = dict(msgs[0], data=base64.b64encode(b"\x1f\x8b" + b"\0" * 30).decode())
    a.add(bad)
    with pytest.raises(ValueError, match="SHA-256"):
        a.document()


def test_a_document_too_large_loses_its_oldest_log_events_not_its_status() -> None:
    noise = [{"event": "e", "blob": base64.b64encode(os.urandom(3000)).decode()} for _ in range(2000)]
    blob = pack({"v": 1, "status": {"name": "box"}, "log": noise})
    assert len(blob) <= diagnostics.PART_BYTES * diagnostics.MAX_PARTS
    a = Assembler("c")
    for m in parts(blob, "c")[0]:
        a.add(m)
    doc = a.document()
    assert doc["status"] == {"name": "box"} and doc["log_cut"] > 0
    assert doc["log"][-1] == noise[-1]


@pytest.mark.peers
def test_the_daemons_document_has_status_config_and_log_and_no_patient_data(tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "box", free_port())
    cfg["pack"] = {"study_quiet_s": 0.5}
    (tmp_path / "box" / "outbox").mkdir(parents=True)
    box = Appliance(tmp_path / "box", cfg).start()
    try:
        assert storescu(box.port, canary_study(tmp_path / "study")).returncode == 0
        wait_for(lambda: box.status()["queue"].get("delivered") == 1, 60, "delivered", detail=box.log_text)
        out = tmp_path / "diag.json"
        r = cli("diagnostics", "--out", str(out), "--config", str(box.config_path))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        text = out.read_text()
        doc = json.loads(text)
        assert doc["status"]["receive"]["instances_received"] == 3
        assert doc["config"]["receive"]["ae_title"] == "EDGE"
        assert {"association.closed", "bundle.delivered"} <= {e["event"] for e in doc["log"]}
        assert doc["versions"]["pynetdicom"].startswith("3.")
        for v in CANARY.values():
            for part in v.split("^"):
                assert part not in text, f"{part!r} is in the diagnostics"
    finally:
        box.stop()


def test_diagnostics_without_a_daemon_says_so(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, free_port())
    Appliance(tmp_path, cfg)  # writes the config only
    r = cli("diagnostics", "--out", str(tmp_path / "d.json"), "--config", str(tmp_path / "appliance.toml"))
    assert r.returncode == 69 and "not running" in r.stderr

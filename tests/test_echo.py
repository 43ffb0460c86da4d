"""`appliance echo`: does each destination answer, and if not, why — against a real
Orthanc, a port nothing listens on and a folder that is not there."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.orthanc import Orthanc
from tests.peers import Appliance, base_config, cli, free_port

pytestmark = pytest.mark.peers


def test_echo_gives_each_destination_a_verdict_and_fails_when_one_does_not_answer(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "pacs") as pacs:
        cfg = base_config(tmp_path / "box", free_port())
        cfg["destinations"] = [
            {"name": "pacs", "transport": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port,
             "ae_title": "ORTHANC", "plaintext": True},
            {"name": "gone", "transport": "dicom", "host": "127.0.0.1", "port": free_port(),
             "ae_title": "NOBODY", "timeout_s": 5, "plaintext": True},
            {"name": "share", "transport": "directory", "path": str(tmp_path / "not-mounted")},
        ]
        box = Appliance(tmp_path / "box", cfg)
        conf = ["--config", str(box.config_path)]
        r = cli("echo", *conf)
        assert r.returncode == 69, r.stderr
        lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
        assert lines["pacs"].startswith("OK") and "C-ECHO answered Success" in lines["pacs"]
        assert f"dicom 127.0.0.1:{pacs.dicom_port} AE ORTHANC" in lines["pacs"]
        assert lines["gone"].startswith("FAILED") and "refused" in lines["gone"]
        assert lines["share"].startswith("FAILED") and "does not exist" in lines["share"]
        assert cli("echo", "pacs", *conf).returncode == 0
        (tmp_path / "not-mounted").mkdir()
        assert cli("echo", "share", *conf).returncode == 0


def test_echo_of_an_unknown_destination_names_the_ones_there_are(tmp_path: Path) -> None:
    box = Appliance(tmp_path, base_config(tmp_path, free_port()))
    r = cli("echo", "nowhere", "--config", str(box.config_path))
    assert r.returncode == 66 and "no destination named 'nowhere' (the config has: outbox)" in r.stderr

"""`appliance run` when it cannot listen: one line saying why, and an exit code systemd
retries (not 78, the configuration error it does not)."""

from __future__ import annotations

import socket
from pathlib import Path

from appliance.core.errors import EX_TEMPFAIL
from tests.peers import Appliance, base_config, cli, free_port


def test_run_on_a_port_in_use_says_which_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        app = Appliance(tmp_path / "a", base_config(tmp_path / "a", port))
        r = cli("run", "--config", str(app.config_path), timeout=60)
    assert r.returncode == EX_TEMPFAIL == 75, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: port {port} on 127.0.0.1 is in use (by another program?); cannot listen for DICOM")
    assert "Traceback" not in r.stderr


def test_run_on_an_address_not_of_this_machine_says_so(tmp_path: Path) -> None:
    app = Appliance(tmp_path / "a", base_config(tmp_path / "a", free_port(), bind="192.0.2.1"))
    r = cli("run", "--config", str(app.config_path), timeout=60)
    assert r.returncode == EX_TEMPFAIL, r.stderr
    assert "192.0.2.1 is not an address of this machine" in r.stderr.strip().splitlines()[-1]

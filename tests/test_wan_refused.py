"""A reading center the appliance must not trust, over the emulated WAN (issue 11, item
10): the center's DICOM TLS certificate is not signed by the CA the destination pins, or
its SSH host key is not the one pinned.

The real daemon in `site`; in `center`, Orthanc with DICOM TLS, or OpenSSH sshd (SFTP).
The destination must be marked down with the reason in `appliance status`, its bundle
held (no attempt spent after the first), and the destination probed on a growing
back-off while nobody fixes it: never retried silently, never given up on silently.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.receive_bench import generate_study
from tests.e2e_support import appliance_config, queue_db
from tests.orthanc import Orthanc
from tests.peers import Appliance, cli, free_port, storescu, wait_for
from tests.sshd import REMOTE_DIR, Sshd, fingerprint
from tests.test_forward_dicom import PKI
from tests.wan import Wan

pytestmark = pytest.mark.wan


@pytest.fixture
def wan() -> Iterator[Wan]:
    if os.geteuid() != 0:
        pytest.fail("the WAN scenarios need root (CI runs as root)")
    with Wan() as w:
        w.link.rate(20)
        yield w


@contextlib.contextmanager
def daemon(wan: Wan, root: Path, destination: dict[str, Any]) -> Iterator[Appliance]:
    """The appliance in `site` with one destination, probing a down one after 1, 2, 4 s."""
    cfg = appliance_config(root, free_port(), destination)
    cfg["queue"] = {**cfg["queue"], "probe_min_s": 1, "probe_max_s": 8}
    app = Appliance(root, cfg)
    app.netns = wan.site.name
    try:
        app.start()
        yield app
    finally:
        app.stop()
        app.kill9()


def probes(app: Appliance, name: str) -> list[float]:
    """When the daemon's prober probed `name` and got no answer (log timestamps)."""
    out = []
    for line in app.log_text().splitlines():
        if '"destination.probed"' not in line:
            continue
        row: dict[str, Any] = json.loads(line)
        if row.get("destination") == name and row.get("answers") is False and "bundle" not in row:
            out.append(dt.datetime.fromisoformat(row["timestamp"]).timestamp())
    return out


def assert_held_down_and_probed(app: Appliance, wan: Wan, files: list[Path], reason: str) -> None:
    """Send `files`; the bundle is held with `reason`, the destination `center` down with
    it in status, and probed on a growing back-off while no attempt is spent."""
    r = storescu(app.port, files, netns=wan.site.name, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

    def held() -> list[dict[str, Any]] | None:
        rows = queue_db(app.state_dir)
        return rows if rows and all(r["state"] == "held" for r in rows) else None

    rows = wait_for(held, 60, "the bundle held", poll=0.25, detail=app.log_text)
    attempts = [r["attempts"] for r in rows]
    dests = {d["name"]: d for d in app.status()["destinations"]}
    assert (dests["center"]["state"], dests["center"]["last_error"]) == ("down", "rejected")
    status = cli("status", "--config", str(app.config_path), check=True).stdout
    assert "center: DOWN" in status and "next probe in" in status, status
    assert f"last error     center: {reason}" in status, status

    # probed on a back-off that grows (1, 2, 4 s, each up to a fifth shorter) ...
    wait_for(lambda: len(probes(app, "center")) >= 4, 60, "four probes of the center",
             poll=0.5, detail=app.log_text)
    times = probes(app, "center")[:4]  # later ones reach probe_max_s and stop growing
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(b > a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    # ... while the bundle stays held, its reason in `queue list`, no attempt spent
    rows = queue_db(app.state_dir)
    assert [r["attempts"] for r in rows] == attempts
    assert all(r["state"] == "held" for r in rows)
    shown = json.loads(cli("queue", "list", "--json", "--config", str(app.config_path),
                           check=True).stdout)
    assert shown and all(reason in (s.get("reason") or "") for s in shown), shown


def test_untrusted_tls_certificate_marks_the_center_down_holds_and_probes_with_backoff(
        wan: Wan, tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    client = pki.client(ca="rogue-ca")  # a CA that did not sign the center's certificate
    with Orthanc(tmp_path / "center", netns=wan.center.name, tls=pki.orthanc()) as pacs, \
            daemon(wan, tmp_path / "appliance", {
                "name": "center", "transport": "dicom", "host": wan.center.addr,
                "port": pacs.dicom_port, "ae_title": "ORTHANC",
                "tls": {"cert": str(client.cert), "key": str(client.key), "ca": str(client.ca)},
            }) as app:
        assert_held_down_and_probed(app, wan, generate_study(tmp_path / "study", 3),
                                    "the PACS's TLS certificate was not accepted")
        assert pacs.count() == 0


def test_wrong_ssh_host_key_marks_the_center_down_holds_and_probes_with_backoff(
        wan: Wan, tmp_path: Path) -> None:
    with Sshd(tmp_path / "sshd", netns=wan.center.name, listen=wan.center.addr) as server:
        wrong = fingerprint(server.root / "client_ed25519.pub")  # pinned: not the host's key
        with daemon(wan, tmp_path / "appliance", {
                "name": "center", "transport": "sftp", "host": wan.center.addr,
                "port": server.port, "user": "root", "key": str(server.client_key),
                "host_key_sha256": wrong, "remote_dir": REMOTE_DIR}) as app:
            assert_held_down_and_probed(app, wan, generate_study(tmp_path / "study", 3),
                                        "the server's host key")
        assert not list(server.drop.iterdir())

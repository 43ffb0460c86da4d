"""The audit trail sent to the hospital's audit record repository (audit/repository.py):
RFC 5425 framing of the RFC 5424 message (pure), the cursor over the rotating sealed trail
(files only), the [audit] syslog keys, and a real rsyslog with TLS (tests/rsyslog.py):
the daemon's messages of a DCMTK association, a repository down at first (and what a
daemon's /metrics says then: what the audit alert reads), a restart, and a certificate
that names another host."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import AuditTrail, messages
from appliance.audit.messages import Participant
from appliance.audit.repository import BOM, Cursor, Sender, frame
from appliance.audit.trail import read
from appliance.core import config
from appliance.core.config import Audit
from appliance.core.errors import ConfigError
from tests import rsyslog
from tests.peers import SAMPLES, storescu, to_toml, wait_for

KEY = bytes(range(32))
CT_DIR = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


def trail(tmp_path: Path, **kw: Any) -> AuditTrail:
    return AuditTrail(tmp_path / "audit", "box-1", "EDGE", KEY, **kw)


def alert(t: AuditTrail, n: int, ok: bool = True) -> bool:
    """A distinguishable message: an operator command on target `n`."""
    return t.command("root", "hold", f"item-{n}", ok, "x")


def target(message: bytes) -> str:
    m = ET.fromstring(message)  # noqa: S314 - our own output
    return m.findall("ParticipantObjectIdentification")[0].get("ParticipantObjectID", "")


# --- the message on the wire (pure) ----------------------------------------------------


def test_a_frame_is_octet_counted_with_the_atna_syslog_header() -> None:
    raw = messages.application_activity(True, Participant("box-1", False), _when(), "box-1")
    out = frame(raw, "box-1", "42")
    length, _, rest = out.partition(b" ")
    assert int(length) == len(rest)
    header, _, msg = rest.partition(BOM)
    assert msg == raw
    assert header == b"<85>1 2026-12-07T05:30:00.000Z box-1 appliance 42 IHE+RFC-3881 - "


def test_a_failed_event_is_sent_as_a_warning() -> None:
    who = Participant("10.0.0.9", True, None, "ROGUE", "10.0.0.9")
    raw = messages.security_alert(messages.DCM.NodeAuthentication, who, who, messages.MINOR_FAILURE,
                                  "refused", "dicom:EDGE", _when(), "box-1")
    assert frame(raw, "box-1").split(b" ", 2)[1].startswith(b"<84>1")  # facility 10, severity 4


def test_a_header_field_holds_no_space_or_control_character() -> None:
    raw = messages.application_activity(True, Participant("b", False), _when(), "b")
    assert b" my_box\x01 " not in frame(raw, "my box\x01")
    assert b" my_box_ appliance " in frame(raw, "my box\x01")


def _when() -> Any:
    import datetime
    return datetime.datetime(2026, 12, 7, 5, 30, tzinfo=datetime.UTC)


# --- the cursor over the trail (files) ---------------------------------------------------


def drain(c: Cursor) -> list[bytes]:
    got = []
    while batch := c.read(7):
        for message, after in batch:
            got.append(message)
            c.advance(after)
    return got


def test_the_cursor_reads_across_rotations_in_order_and_resumes_after_a_restart(tmp_path: Path) -> None:
    t = trail(tmp_path, max_bytes=3000, files=50)
    for n in range(30):
        assert alert(t, n)
    c = Cursor(t.dir, KEY)
    assert len(list(t.dir.glob("audit.log.*"))) >= 3  # it did rotate
    assert c.waiting() == 30
    for _, after in c.read(13):
        c.advance(after)
    assert c.waiting() == 17
    assert [target(m) for m in drain(c)] == [f"appliance:queue/item-{n}" for n in range(13, 30)]
    assert c.waiting() == 0
    c.save()
    for n in range(30, 45):
        assert alert(t, n)  # rotates again under the saved cursor
    again = Cursor(t.dir, KEY)  # a restart
    assert [target(m) for m in drain(again)] == [f"appliance:queue/item-{n}" for n in range(30, 45)]
    assert again.waiting() == 0 and again.gaps == 0


def test_a_cursor_whose_file_was_rotated_away_restarts_at_the_oldest_and_counts_a_gap(tmp_path: Path) -> None:
    t = trail(tmp_path, max_bytes=3000, files=2)
    assert alert(t, 0)
    c = Cursor(t.dir, KEY)
    [(_, after)] = c.read(1)
    c.advance(after)
    for n in range(1, 40):
        assert alert(t, n)  # the first file is long gone
    got = [target(m) for m in drain(c)]
    assert c.gaps == 1
    kept = [target(m) for p in (t.dir / "audit.log.1", t.dir / "audit.log") for m in read(p, KEY) if m]
    assert got == kept and got[-1] == "appliance:queue/item-39"


def test_an_unreadable_line_is_passed_over_and_counted(tmp_path: Path) -> None:
    t = trail(tmp_path, max_bytes=3000, files=50)
    for n in range(12):
        assert alert(t, n)
    oldest = max(t.dir.glob("audit.log.*"), key=lambda p: int(p.suffix[1:]))
    lines = oldest.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2
    oldest.write_bytes(lines[0] + b"Zm9v\n" + b"".join(lines[1:]))  # torn, then rotated
    c = Cursor(t.dir, KEY)
    assert [target(m) for m in drain(c)] == [f"appliance:queue/item-{n}" for n in range(12)]
    assert c.unreadable == 1


# --- the configuration ----------------------------------------------------------------------


def audit_problems(**audit: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse({"receive": {"callers": [{"ae_title": "CT"}]}, "audit": audit}, {}, Path("/etc/a.toml"))
    return [p.removeprefix("/etc/a.toml: ") for p in e.value.problems]


def test_a_repository_needs_its_ca() -> None:
    [p] = audit_problems(syslog_host="audit.hospital.example")
    assert p.startswith("audit.syslog_ca") and "required" in p


def test_a_client_certificate_needs_its_key() -> None:
    [p] = audit_problems(syslog_host="audit.hospital.example", syslog_ca="ca.pem", syslog_cert="c.pem")
    assert p.startswith("audit.syslog_key")


def test_the_syslog_host_and_port_are_checked() -> None:
    ps = audit_problems(syslog_host="bad host/", syslog_ca="ca.pem", syslog_port=0)
    assert [p.split(":")[0] for p in sorted(ps)] == ["audit.syslog_host", "audit.syslog_port"]


def test_no_host_no_repository() -> None:
    cfg = config.parse({"receive": {"callers": [{"ae_title": "CT"}]}}, {}, Path("/etc/a.toml"))
    assert cfg.audit.syslog_host == "" and cfg.audit.syslog_port == 6514


# --- a real rsyslog over TLS -----------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> rsyslog.Pki:
    return rsyslog.make_pki(tmp_path / "pki")


@pytest.fixture
def repository(tmp_path: Path, pki: rsyslog.Pki) -> Iterator[rsyslog.Rsyslog]:
    assert rsyslog.available(), "rsyslog or rsyslog-gnutls is missing: make peers installs them"
    r = rsyslog.Rsyslog(tmp_path / "rsyslog", pki)
    yield r
    r.stop()


def sender(t: AuditTrail, r: rsyslog.Rsyslog, ca: Path, host: str = "127.0.0.1") -> Sender:
    s = Sender(Audit(syslog_host=host, syslog_port=r.port, syslog_ca=ca), t.dir, KEY, "box-1",
               backoff_max_s=2.0)  # the daemon's is 60 s
    t.on_write = s.wake
    return s


def test_a_repository_down_at_first_gets_everything_later_in_order_once(
        tmp_path: Path, pki: rsyslog.Pki, repository: rsyslog.Rsyslog) -> None:
    t = trail(tmp_path)
    s = sender(t, repository, pki.ca)
    s.start()
    try:
        for n in range(40):
            assert alert(t, n)
        wait_for(lambda: s.last_error == "refused" and s.waiting == 40, 30, "refused, all waiting",
                 detail=lambda: str(s.status()))
        repository.start()
        wait_for(lambda: len(repository.messages()) >= 40 and s.waiting == 0, 30, "all 40 received",
                 detail=lambda: f"{s.status()}\n{repository.log_text()}")
        for n in range(40, 45):
            assert alert(t, n)
        wait_for(lambda: len(repository.messages()) >= 45, 30, "the later ones too")
    finally:
        s.stop()
    got = [target(m.msg) for m in repository.messages()]
    assert got == [f"appliance:queue/item-{n}" for n in range(45)]  # in order, none twice
    assert s.status()["sent"] == 45 and s.status()["connected"] is False


def test_a_restart_resends_nothing_already_sent(tmp_path: Path, pki: rsyslog.Pki,
                                                repository: rsyslog.Rsyslog) -> None:
    t = trail(tmp_path)
    repository.start()
    for n in range(10):
        assert alert(t, n)
    first = sender(t, repository, pki.ca)
    first.start()
    wait_for(lambda: len(repository.messages()) >= 10, 30, "the first ten")
    first.stop()
    for n in range(10, 15):
        assert alert(t, n)  # written while no sender runs
    second = sender(t, repository, pki.ca)  # the next start of the daemon
    second.start()
    try:
        wait_for(lambda: len(repository.messages()) >= 15, 30, "the next five")
    finally:
        second.stop()
    assert [target(m.msg) for m in repository.messages()] == [f"appliance:queue/item-{n}" for n in range(15)]
    assert second.sent == 5


def test_a_repository_whose_certificate_names_another_host_is_refused_and_says_so(
        tmp_path: Path, repository: rsyslog.Rsyslog) -> None:
    wrong = rsyslog.make_pki(tmp_path / "wrong", names=("audit.elsewhere.example",))
    r = rsyslog.Rsyslog(tmp_path / "rsyslog-wrong", wrong)
    r.start()
    t = trail(tmp_path)
    assert alert(t, 0)
    s = sender(t, r, wrong.ca)
    s.start()
    try:
        wait_for(lambda: s.last_error is not None, 30, "the handshake refused")
    finally:
        s.stop()
        r.stop()
    assert s.last_error == "certificate"
    assert re.search(r"mismatch.*127\.0\.0\.1", s.last_error_reason or ""), s.last_error_reason
    assert r.messages() == [] and s.sent == 0 and s.waiting == 1


def test_a_repository_that_wants_a_client_certificate_gets_this_boxs(tmp_path: Path,
                                                                     pki: rsyslog.Pki) -> None:
    r = rsyslog.Rsyslog(tmp_path / "rsyslog-x509", pki, client_certs=True).start()
    t = trail(tmp_path)
    for n in range(3):
        assert alert(t, n)
    s = Sender(Audit(syslog_host="127.0.0.1", syslog_port=r.port, syslog_ca=pki.ca,
                     syslog_cert=pki.client_cert, syslog_key=pki.client_key), t.dir, KEY, "box-1")
    s.start()
    try:
        wait_for(lambda: len(r.messages()) >= 3, 30, "the three received", detail=r.log_text)
    finally:
        s.stop()
        r.stop()
    assert [target(m.msg) for m in r.messages()] == [f"appliance:queue/item-{n}" for n in range(3)]


def test_without_the_client_certificate_it_wants_nothing_counts_as_sent(tmp_path: Path,
                                                                       pki: rsyslog.Pki) -> None:
    """rsyslog ends the session only after the handshake: what was written then would be
    lost without a word, so the sender waits a moment after each handshake."""
    r = rsyslog.Rsyslog(tmp_path / "rsyslog-x509", pki, client_certs=True).start()
    t = trail(tmp_path)
    for n in range(3):
        assert alert(t, n)
    s = sender(t, r, pki.ca)  # no client certificate
    s.start()
    try:
        wait_for(lambda: s.last_error is not None, 30, "the session ended", detail=lambda: str(s.status()))
    finally:
        s.stop()
        r.stop()
    assert s.last_error == "closed" and "client certificate" in (s.last_error_reason or "")
    assert s.sent == 0 and s.waiting == 3 and r.messages() == []


def test_a_repository_that_never_answers_times_out_and_writes_do_not_wait_for_it(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as mute:  # accepts connections (the backlog) and never says a word
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        t = trail(tmp_path)
        s = Sender(Audit(syslog_host="127.0.0.1", syslog_port=mute.getsockname()[1],
                         syslog_ca=rsyslog.make_pki(tmp_path / "pki").ca), t.dir, KEY, "box-1",
                   backoff_max_s=1.0, timeout_s=1.0)
        t.on_write = s.wake
        s.start()
        try:
            slowest = 0.0
            for n in range(20):
                started = time.monotonic()
                assert alert(t, n)
                slowest = max(slowest, time.monotonic() - started)
            wait_for(lambda: s.last_error == "timeout", 20, "the handshake timed out",
                     detail=lambda: str(s.status()))
        finally:
            s.stop()
    assert slowest < 0.5, slowest  # an fsync'ed append, never the repository's silence
    assert s.sent == 0 and s.status()["last_error_reason"] == "no answer within 1 s"


@pytest.mark.peers
def test_the_daemon_sends_its_trail_of_a_dcmtk_association_to_rsyslog(
        appliance_factory, tmp_path: Path, pki: rsyslog.Pki,  # type: ignore[no-untyped-def]
        repository: rsyslog.Rsyslog) -> None:
    repository.start()
    app = appliance_factory(start=False)
    app.cfg["audit"] = {"syslog_host": "127.0.0.1", "syslog_port": repository.port, "syslog_ca": str(pki.ca)}
    app.config_path.write_text(to_toml(app.cfg))
    app.start()
    files = sorted(CT_DIR.iterdir())[:2]
    assert storescu(app.port, files).returncode == 0
    local = app.state_dir / "audit" / "audit.log"

    def trail_messages() -> list[bytes]:
        return [m for m in read(local, _audit_key(app)) if m is not None]
    wait_for(lambda: any(b'csd-code="110104"' in m for m in trail_messages()), 30, "the store audited")
    wait_for(lambda: len(repository.messages()) >= len(trail_messages()), 30, "the trail received",
             detail=lambda: f"{app.status().get('audit')}\n{repository.log_text()}")
    got = repository.messages()
    assert [m.msg for m in got] == trail_messages()[:len(got)]  # the ATNA XML of the trail, in order
    assert {(m.pri, m.msgid, m.app, m.hostname) for m in got} == {(85, "IHE+RFC-3881", "appliance",
                                                                    "test-appliance")}
    status = app.status()["audit"]["repository"]
    assert status["connected"] is True and status["sent"] == len(got) and status["last_error"] is None
    assert app.status()["stages"]["audit"]["state"] in ("idle", "working")  # a supervised stage
    patient = _patient_id(files[0])
    assert patient not in app.log_text()


@pytest.mark.peers
@pytest.mark.field
def test_a_repository_away_and_a_daemon_killed_lose_nothing_and_resend_little(
        appliance_factory, tmp_path: Path, pki: rsyslog.Pki,  # type: ignore[no-untyped-def]
        repository: rsyslog.Rsyslog) -> None:
    from appliance.audit.repository import BATCH

    repository.start()
    app = appliance_factory(start=False)
    app.cfg["audit"] = {"syslog_host": "127.0.0.1", "syslog_port": repository.port, "syslog_ca": str(pki.ca)}
    app.config_path.write_text(to_toml(app.cfg))
    app.start()
    files = sorted(CT_DIR.iterdir())
    local = app.state_dir / "audit" / "audit.log"

    def trail_messages() -> list[bytes]:
        return [m for m in read(local, _audit_key(app)) if m is not None]
    for f in files[:3]:  # three associations: three messages of instances received
        assert storescu(app.port, [f]).returncode == 0
    wait_for(lambda: len(repository.messages()) >= len(trail_messages()) >= 5, 60, "the first ones sent")
    repository.stop()  # the repository goes away
    for f in files[3:6]:
        assert storescu(app.port, [f]).returncode == 0  # receiving does not wait for it
    wait_for(lambda: app.status()["audit"]["repository"]["waiting"] >= 3, 60, "messages waiting",
             detail=lambda: str(app.status()["audit"]))
    app.kill9()  # no clean stop: the cursor is what the last batch left
    app.start()
    back = rsyslog.Rsyslog(tmp_path / "rsyslog", pki, port=repository.port)  # same file, appended
    back.start()
    try:
        wait_for(lambda: {m.msg for m in back.messages()} >= set(trail_messages()), 120,
                 "every message of the trail in the repository",
                 detail=lambda: f"{app.status()['audit']}\n{back.log_text()}")
    finally:
        back.stop()
    got = [m.msg for m in back.messages()]
    first_seen = list(dict.fromkeys(got))
    assert first_seen == trail_messages()[:len(first_seen)]  # oldest first, nothing missing
    assert len(got) - len(first_seen) <= BATCH  # resent: at most the batch of the kill


def _audit_key(app: Any) -> bytes:
    from appliance.core import crypto
    return crypto.load_spool_key(Path(app.cfg["spool"]["key_file"])).audit_key()


def _patient_id(path: Path) -> str:
    import pydicom
    return str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)


# --- status, metrics, config check ----------------------------------------------------------


def test_the_repository_counters_are_metrics() -> None:
    from appliance.health import metrics

    snap = {"audit": {"written": 7, "failed": 1,
                      "repository": {"sent": 5, "waiting": 2, "connected": False}}}
    certs = metrics.Certificates({}, lambda paths: {})
    c = metrics.DaemonCollector(lambda: snap, lambda: {}, metrics.Tally([]), certs, [], [])
    got = {s.name: s.value for fam in c.collect() for s in fam.samples
           if s.name.startswith("appliance_audit")}
    assert got == {"appliance_audit_messages_written_total": 7, "appliance_audit_write_failures_total": 1,
                   "appliance_audit_repository_sent_total": 5, "appliance_audit_repository_waiting": 2,
                   "appliance_audit_repository_connected": 0}


@pytest.mark.peers
def test_a_daemon_whose_repository_is_down_exports_connected_0_and_messages_waiting(
        tmp_path: Path, pki: rsyslog.Pki, repository: rsyslog.Rsyslog) -> None:
    """What the alert ApplianceAuditRepositoryUnreachable (config/ops-center/alerts.yml)
    reads, scraped from a real daemon's /metrics: rsyslog not running yet (connection
    refused), the daemon's own messages (its start) wait; once it runs, they are sent."""
    from tests.mosquitto import fleet_ca, sign
    from tests.peers import Appliance, base_config, free_port
    from tests.test_metrics import samples, scrape_text, value

    ca = fleet_ca(tmp_path / "ca")
    box = tmp_path / "box"
    cfg = base_config(box, free_port())
    (box / "outbox").mkdir(parents=True)
    mport = free_port()
    cfg["operations"] = {"host": "127.0.0.1", "port": free_port(), "ca": str(ca / "ca.pem"),
                         "cert": str(box / "keys" / "mqtt.pem"), "key": str(box / "keys" / "mqtt.key"),
                         "metrics_bind": f"127.0.0.1:{mport}"}
    cfg["audit"] = {"syslog_host": "127.0.0.1", "syslog_port": repository.port, "syslog_ca": str(pki.ca)}
    app = Appliance(box, cfg)
    sign(ca, box / "keys" / "mqtt.csr")
    app.start()
    try:
        def audit() -> dict[str, float]:
            try:
                s = samples(scrape_text(mport))
            except OSError:
                return {}
            return {n: value(s, f"appliance_audit_repository_{n}")
                    for n in ("connected", "waiting", "sent_total")}
        down = wait_for(lambda: (a := audit()) and a["waiting"] > 0 and a, 60,
                        "messages waiting for the repository", poll=0.5,
                        detail=lambda: str(app.status()["audit"]))
        assert down["connected"] == 0 and down["sent_total"] == 0, down
        assert app.status()["audit"]["repository"]["last_error"] == "refused"
        repository.start()
        up = wait_for(lambda: (a := audit()) and a["waiting"] == 0 and a["connected"] == 1 and a, 120,
                      "the repository connected and nothing waiting", poll=0.5,
                      detail=lambda: f"{app.status()['audit']}\n{repository.log_text()}")
        assert up["sent_total"] >= down["waiting"], (down, up)
    finally:
        app.stop()
        app.kill9()


def test_status_says_why_the_repository_is_not_connected() -> None:
    from appliance.cli.status import audit_line

    line = audit_line({"host": "audit.example", "port": 6514, "connected": False, "sent": 3,
                       "waiting": 12, "gaps": 0, "last_error": "certificate",
                       "last_error_reason": "Hostname mismatch"})
    assert line == ("audit repo     audit.example:6514 not connected, 3 sent, 12 waiting;"
                    " last error certificate: Hostname mismatch")


def test_config_check_names_a_missing_syslog_ca(tmp_path: Path) -> None:
    from tests.peers import base_config, cli, free_port

    cfg = base_config(tmp_path, free_port())
    cfg["audit"] = {"syslog_host": "audit.example", "syslog_ca": str(tmp_path / "nowhere.pem")}
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    cli("keys", "init", "--config", str(path), check=True)
    r = cli("config", "check", "--config", str(path))
    assert r.returncode != 0 and "audit.syslog_ca" in r.stderr and "nowhere.pem" in r.stderr


def test_a_repository_failure_reaches_the_ops_center_as_its_class_only() -> None:
    from appliance.ops import messages as ops_messages

    body = ops_messages.event_body("audit.repository_failed", {
        "host": "audit.example", "port": 6514, "error": "certificate",
        "reason": "Hostname mismatch, certificate is not valid for 'audit.example'", "waiting": 4})
    assert body == {"kind": "audit.repository_failed", "error": "certificate", "waiting": 4}


"""The local audit trail (issue 13 item 6): DICOM audit messages, the durable log, and
what the real daemon writes when DCMTK stores, when an association is refused and when
an operator acts on the queue."""

from __future__ import annotations

import datetime
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest

from appliance.audit import AuditTrail, messages
from appliance.audit.messages import Participant, Study
from appliance.audit.trail import read
from tests.peers import SAMPLES, cli, storescu, wait_for

CT_DIR = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"
WHEN = datetime.datetime(2026, 12, 7, 5, 30, tzinfo=datetime.UTC)
KEY = bytes(range(32))


def xml(raw: bytes) -> ET.Element:
    return ET.fromstring(raw)  # noqa: S314 - our own output, read back


def parse_lines(path: Path, key: bytes = KEY) -> list[ET.Element]:
    out = []
    for message in read(path, key):
        assert message is not None, f"a line of {path} does not open"
        out.append(xml(message))
    return out


def event(m: ET.Element) -> tuple[str, str | None]:
    ident = m.find("EventIdentification")
    assert ident is not None
    eid, etype = ident.find("EventID"), ident.find("EventTypeCode")
    assert eid is not None
    return eid.get("csd-code", ""), None if etype is None else etype.get("csd-code")


# --- messages (pure) -------------------------------------------------------------------


def test_instances_transferred_names_both_nodes_each_study_and_its_patient() -> None:
    src = Participant("10.0.0.5", True, messages.SOURCE, "CT1", "10.0.0.5")
    dst = Participant("box-1", False, messages.DESTINATION, "EDGE")
    studies = [Study("1.2.3", "PID-1", {"1.2.840.10008.5.1.4.1.1.2": 3}),
               Study("1.2.4", "PID-1", {"1.2.840.10008.5.1.4.1.1.4": 1})]
    m = xml(messages.instances_transferred("C", src, dst, studies, "0", WHEN, "box-1"))
    assert event(m) == ("110104", None)
    ident = m.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "C"
    assert ident.get("EventDateTime") == "2026-12-07T05:30:00.000Z"
    parts = m.findall("ActiveParticipant")
    assert [(p.get("UserIsRequestor"), p.get("AlternativeUserID")) for p in parts] == [
        ("true", "AETITLES=CT1"), ("false", "AETITLES=EDGE")]
    assert [p.find("RoleIDCode").get("csd-code") for p in parts] == ["110153", "110152"]  # type: ignore[union-attr]
    objs = m.findall("ParticipantObjectIdentification")
    assert [(o.get("ParticipantObjectID"), o.get("ParticipantObjectTypeCode")) for o in objs] == [
        ("1.2.3", "2"), ("1.2.4", "2"), ("PID-1", "1")]  # the patient once
    sop = objs[0].find("SOPClass")
    assert sop is not None and sop.get("NumberOfInstances") == "3"
    source = m.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "box-1"


def test_values_from_a_peer_cannot_break_the_xml_or_the_line() -> None:
    src = Participant("10.0.0.5", True, messages.SOURCE, "A\x01B\nC", "10.0.0.5")
    raw = messages.instances_transferred("C", src, src, [Study("1.2", "P\x00<&>\"\n", {})], "0",
                                         WHEN, "box", description="two\nlines")
    assert b"\n" not in raw
    m = xml(raw)
    pid = m.findall("ParticipantObjectIdentification")[-1].get("ParticipantObjectID")
    assert pid == "P\ufffd<&>\"\n"  # the newline survives as &#10;, the NUL does not


def test_security_alert_carries_its_kind_outcome_and_subject() -> None:
    who = Participant("10.0.0.9", True, None, "ROGUE", "10.0.0.9")
    me = Participant("box", False, None, "EDGE")
    m = xml(messages.security_alert(messages.DCM.NodeAuthentication, who, me, "4",
                                              "association refused: calling AE title not recognised",
                                              "dicom:EDGE", WHEN, "box"))
    assert event(m) == ("110113", "110126")
    ident = m.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "4"
    assert "calling AE title" in (ident.findtext("EventOutcomeDescription") or "")


# --- the durable log ------------------------------------------------------------------------


def test_the_log_is_private_and_one_message_per_line(tmp_path: Path) -> None:
    os.umask(0o022)
    trail = AuditTrail(tmp_path / "audit", "box", "EDGE", KEY)
    assert trail.application(started=True) and trail.application(started=False)
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    assert stat.S_IMODE(trail.path.stat().st_mode) == 0o600
    assert [event(m)[1] for m in parse_lines(trail.path)] == ["110120", "110121"]


def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", "box", "EDGE", KEY, max_bytes=2000, files=3)
    for _ in range(40):
        assert trail.application(started=True)
    names = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all(p.stat().st_size <= 2000 for p in (tmp_path / "audit").iterdir())
    assert all(parse_lines(p) for p in (tmp_path / "audit").iterdir())


def test_the_log_is_sealed_at_rest_and_a_tampered_line_is_reported(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", "box", "EDGE", KEY)
    src = Participant("10.0.0.5", True, messages.SOURCE, "CT1", "10.0.0.5")
    trail.received("CT1", "10.0.0.5", [("k" * 16, Study("1.2.3.4.5", "PATIENT-X", {"1.2": 1}))], 0)
    trail.application(started=True)
    raw = trail.path.read_bytes()
    assert b"PATIENT-X" not in raw and b"1.2.3.4.5" not in raw and b"AuditMessage" not in raw
    assert b"PATIENT-X" not in (tmp_path / "audit" / "studies.db").read_bytes()
    assert trail.sent("k" * 16, src, 1, True, "x")  # the study is named from studies.db
    assert "PATIENT-X" in [o.get("ParticipantObjectID") for o in parse_lines(trail.path)[-1]
                           .findall("ParticipantObjectIdentification")]
    lines = trail.path.read_bytes().splitlines()
    lines[1] = lines[1][:-8] + b"AAAAAAAA"
    trail.path.write_bytes(b"\n".join(lines) + b"\n")
    opened = list(read(trail.path, KEY))
    assert opened[1] is None and opened[0] is not None and opened[2] is not None
    assert all(m is None for m in read(trail.path, bytes(32)))  # another key opens nothing


def test_a_write_that_fails_is_counted_and_never_raised(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", "box", "EDGE", KEY)
    trail.path.mkdir()  # the log cannot be opened for writing
    assert trail.application(started=True) is False
    assert trail.failed == 1 and trail.written == 0


def test_a_configuration_is_audited_once_until_it_changes(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", "box", "EDGE", KEY)
    trail.config_seen("a" * 64, ["/etc/appliance/appliance.toml"])
    trail.config_seen("a" * 64, ["/etc/appliance/appliance.toml"])
    trail.config_seen("b" * 64, ["/etc/appliance/appliance.toml"])
    alerts = [m for m in parse_lines(trail.path) if event(m) == ("110113", "110131")]
    assert len(alerts) == 2
    assert "(was " + "a" * 64 in (alerts[1].findtext("EventIdentification/EventOutcomeDescription") or "")


# --- the daemon, with DCMTK --------------------------------------------------------------------


@pytest.mark.peers
def test_the_daemon_audits_a_store_a_refusal_and_an_operator_hold(appliance_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = sorted(CT_DIR.iterdir())[:3]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    patient_id, study_uid = str(first.PatientID), str(first.StudyInstanceUID)
    app = appliance_factory()
    Path(app.cfg["destinations"][0]["path"]).mkdir(exist_ok=True)  # the outbox folder
    audit_log = app.state_dir / "audit" / "audit.log"

    def shown() -> list[ET.Element]:  # what `appliance audit show` prints, one message a line
        r = cli("audit", "show", "--config", str(app.config_path))
        assert r.returncode == 0, r.stderr
        return [xml(line.encode()) for line in r.stdout.splitlines()]
    r = storescu(app.port, files)
    assert r.returncode == 0, r.stderr
    storescu(app.port, files[:1], called="WRONG")

    def by_kind() -> dict[tuple[str, str | None], list[ET.Element]]:
        out: dict[tuple[str, str | None], list[ET.Element]] = {}
        for m in shown() if audit_log.exists() else []:
            out.setdefault(event(m), []).append(m)
        return out

    wait_for(lambda: ("110113", "110126") in by_kind() and ("110104", None) in by_kind(), 30,
             "the store and the refusal in the audit log")
    kinds = by_kind()
    assert ("110100", "110120") in kinds and ("110113", "110131") in kinds  # started; its config
    [got] = kinds[("110104", None)]
    objs = {o.get("ParticipantObjectTypeCode"): o for o in got.findall("ParticipantObjectIdentification")}
    assert objs["1"].get("ParticipantObjectID") == patient_id
    assert objs["2"].get("ParticipantObjectID") == study_uid
    assert [s.get("NumberOfInstances") for s in objs["2"].findall("SOPClass")] == ["3"]
    assert got.find("ActiveParticipant").get("AlternativeUserID") == "AETITLES=MODALITY"  # type: ignore[union-attr]

    # Sent on: DICOM Instances Transferred, action R, naming the study and its patient from
    # what was remembered at receive time, and the destination.
    wait_for(lambda: '"bundle.delivered"' in app.log_text(), 120, "the bundle delivered", detail=app.log_text)
    wait_for(lambda: any(m.find("EventIdentification").get("EventActionCode") == "R"  # type: ignore[union-attr]
                         for m in by_kind().get(("110104", None), [])), 10, "the delivery audited")
    [sent] = [m for m in by_kind()[("110104", None)]
              if m.find("EventIdentification").get("EventActionCode") == "R"]  # type: ignore[union-attr]
    ids = {o.get("ParticipantObjectTypeCode"): o.get("ParticipantObjectID")
           for o in sent.findall("ParticipantObjectIdentification")}
    assert ids == {"1": patient_id, "2": study_uid}
    roles = {p.find("RoleIDCode").get("csd-code"): p.get("UserID")  # type: ignore[union-attr]
             for p in sent.findall("ActiveParticipant")}
    assert roles == {"110153": "test-appliance", "110152": app.cfg["destinations"][0]["name"]}

    held = cli("queue", "hold", "--all", "--config", str(app.config_path))
    assert held.returncode == 0, held.stderr
    wait_for(lambda: ("110113", "110132") in by_kind(), 10, "the operator's command")
    [cmd] = by_kind()[("110113", "110132")]
    assert cmd.find("ActiveParticipant").get("UserID") == "root"  # type: ignore[union-attr]

    # The audit log holds the patient ID by design, sealed at rest; the daemon's own log
    # never holds it.
    assert patient_id not in app.log_text() and study_uid not in app.log_text()
    assert patient_id.encode() not in audit_log.read_bytes()
    app.stop()
    assert ("110100", "110121") in by_kind()


# --- key use, from the CLI -------------------------------------------------------------------


def _cli_config(tmp_path: Path) -> tuple[Path, Path]:
    from tests.peers import base_config, free_port, to_toml

    cfg = tmp_path / "appliance.toml"
    cfg.write_text(to_toml(base_config(tmp_path, free_port())))
    return cfg, tmp_path / "state" / "audit" / "audit.log"


def _spool_audit_key(tmp_path: Path) -> bytes:
    from appliance.core import crypto

    return crypto.load_spool_key(tmp_path / "keys" / "spool.key").audit_key()


def test_keys_init_audits_the_keys_it_made_and_not_those_it_kept(tmp_path: Path) -> None:
    cfg, log = _cli_config(tmp_path)
    cli("keys", "init", "--config", str(cfg), check=True)
    cli("keys", "init", "--config", str(cfg), check=True)  # everything kept: no change
    alerts = [m for m in parse_lines(log, _spool_audit_key(tmp_path)) if event(m) == ("110113", "110129")]
    assert len(alerts) == 1  # Security Alert, Security Configuration
    what = alerts[0].findtext("EventIdentification/EventOutcomeDescription") or ""
    assert "spool key" in what and "appliance key" in what and "created" in what
    import pwd
    assert alerts[0].find("ActiveParticipant").get("UserID") == pwd.getpwuid(os.getuid()).pw_name  # type: ignore[union-attr]


def test_reading_the_trail_is_audited_before_it_is_shown(tmp_path: Path) -> None:
    cfg, log = _cli_config(tmp_path)
    cli("keys", "init", "--config", str(cfg), check=True)
    r = cli("audit", "show", "--config", str(cfg), check=True)
    shown = [xml(line.encode()) for line in r.stdout.splitlines()]
    assert event(shown[-1]) == ("110101", None)  # Audit Log Used, the read itself
    [obj] = shown[-1].findall("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectTypeCodeRole") == "13" and obj.get("ParticipantObjectID") == log.as_uri()
    assert len(parse_lines(log, _spool_audit_key(tmp_path))) == len(shown)


@pytest.mark.root
def test_what_root_writes_stays_the_state_directorys_owners(tmp_path: Path) -> None:
    """`appliance update` (root) writes the trail too; the daemon's user must go on writing
    and rotating it."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4321, 4321)  # the appliance user
    trail = AuditTrail(state / "audit", "box", "EDGE", KEY)  # root makes the directory
    assert trail.application(started=True)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in (state / "audit", trail.path)} == {(4321, 4321)}

"""DICOM audit messages (PS3.15 A.5.1 schema, A.5.3 events), built as one-line XML.

Pure: data in, bytes out. Codes come from pydicom's DCM code dictionary
(`pydicom.sr.codedict.codes.DCM`), not typed by hand; the few RFC 3881 codes the DICOM
schema keeps (participant object ID types, audit source type) are named here.
Element and attribute names follow the DICOM schema (`csd-code`, `codeSystemName`,
`originalText` on coded values; SOPClass with NumberOfInstances inside a study's
ParticipantObjectIdentification).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.sr.codedict import codes

DCM = codes.DCM

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"  # EventOutcomeIndicator

# RFC 3881 codes the DICOM schema uses as they are
PATIENT_NUMBER = ("2", "RFC-3881", "Patient Number")
URI = ("12", "RFC-3881", "URI")
APPLICATION_SERVER = ("4", "RFC-3881", "Application Server")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a node (peer or this box) or a person (a local operator)."""

    user_id: str
    requestor: bool
    role: tuple[str, str, str] | None = None  # (code, scheme, meaning)
    ae_title: str | None = None
    address: str | None = None  # an IP address (NetworkAccessPointTypeCode 2) or a host name (1)
    user_name: str | None = None


@dataclass(frozen=True)
class Study:
    """A study one event touched: its UID, its patient's ID, SOP class -> instances."""

    uid: str
    patient_id: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)


def code(c: object) -> tuple[str, str, str]:
    """A pydicom Code as (value, scheme, meaning)."""
    return (str(getattr(c, "value")), str(getattr(c, "scheme_designator")),  # noqa: B009
            str(getattr(c, "meaning")))  # noqa: B009


SOURCE = code(DCM.SourceRoleID)
DESTINATION = code(DCM.DestinationRoleID)
APPLICATION = code(DCM.Application)


def application_activity(started: bool, app: Participant, when: datetime.datetime,
                         source_id: str) -> bytes:
    """A.5.3.1: the appliance started or stopped."""
    m = _message(code(DCM.ApplicationActivity), "E", SUCCESS, when,
                 code(DCM.ApplicationStart if started else DCM.ApplicationStop))
    _participant(m, app)
    _source(m, source_id)
    return _bytes(m)


def instances_transferred(action: str, source: Participant, destination: Participant,
                          studies: Sequence[Study], outcome: str, when: datetime.datetime,
                          source_id: str, description: str | None = None) -> bytes:
    """A.5.3.7 DICOM Instances Transferred: `action` C (received here: created) or R
    (sent on: read); one message may name several studies of one transfer."""
    m = _message(code(DCM.DICOMInstancesTransferred), action, outcome, when, None, description)
    _participant(m, source)
    _participant(m, destination)
    _source(m, source_id)
    for s in studies:
        o = _object(m, s.uid, "2", "3", code(DCM.StudyInstanceUID))
        for uid, n in sorted(s.sop_classes.items()):
            ET.SubElement(o, "SOPClass", UID=_clean(uid), NumberOfInstances=str(n))
    for pid in sorted({s.patient_id for s in studies}):
        _object(m, pid, "1", "1", PATIENT_NUMBER)
    return _bytes(m)


def security_alert(kind: object, who: Participant, reporter: Participant, outcome: str,
                   description: str, subject: str, when: datetime.datetime, source_id: str) -> bytes:
    """A.5.3.11 Security Alert of `kind` (a DCM code: NodeAuthentication,
    UseOfRestrictedFunction, SoftwareConfiguration ...): `who` did it, `reporter` is
    this box, `subject` (a URI) is what it was about."""
    m = _message(code(DCM.SecurityAlert), "E", outcome, when, code(kind), description)
    _participant(m, who)
    _participant(m, reporter)
    _source(m, source_id)
    _object(m, subject, "2", "13", URI)
    return _bytes(m)


def audit_log_used(who: Participant, app: Participant, log_uri: str, when: datetime.datetime,
                   source_id: str) -> bytes:
    """A.5.3.2 Audit Log Used: `who` read the audit log (at `log_uri`) through `app`."""
    m = _message(code(DCM.AuditLogUsed), "R", SUCCESS, when, None)
    _participant(m, app)
    _participant(m, who)
    _source(m, source_id)
    o = _object(m, log_uri, "2", "13", URI)  # system object, security resource
    o.set("ParticipantObjectName", "Security Audit Log")
    return _bytes(m)


# --- building blocks ----------------------------------------------------------------


def _coded(parent: ET.Element, tag: str, c: tuple[str, str, str]) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": c[0], "codeSystemName": c[1], "originalText": c[2]})


def _message(event_id: tuple[str, str, str], action: str, outcome: str, when: datetime.datetime,
             event_type: tuple[str, str, str] | None, description: str | None = None) -> ET.Element:
    m = ET.Element("AuditMessage")
    e = ET.SubElement(m, "EventIdentification", EventActionCode=action,
                      EventDateTime=_time(when), EventOutcomeIndicator=outcome)
    _coded(e, "EventID", event_id)
    if event_type is not None:
        _coded(e, "EventTypeCode", event_type)
    if description:
        ET.SubElement(e, "EventOutcomeDescription").text = _clean(_one_line(description))
    return m


def _participant(m: ET.Element, p: Participant) -> None:
    attrs = {"UserID": _clean(p.user_id), "UserIsRequestor": "true" if p.requestor else "false"}
    if p.ae_title:
        attrs["AlternativeUserID"] = f"AETITLES={_clean(p.ae_title)}"
    if p.user_name:
        attrs["UserName"] = _clean(p.user_name)
    if p.address:
        attrs["NetworkAccessPointID"] = _clean(p.address)
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.address) else "1"  # IP / machine name
    a = ET.SubElement(m, "ActiveParticipant", attrs)
    if p.role is not None:
        _coded(a, "RoleIDCode", p.role)


def _source(m: ET.Element, source_id: str) -> None:
    s = ET.SubElement(m, "AuditSourceIdentification", AuditSourceID=source_id)
    _coded(s, "AuditSourceTypeCode", APPLICATION_SERVER)


def _object(m: ET.Element, object_id: str, type_code: str, role: str,
            id_type: tuple[str, str, str]) -> ET.Element:
    o = ET.SubElement(m, "ParticipantObjectIdentification", ParticipantObjectID=_clean(object_id),
                      ParticipantObjectTypeCode=type_code, ParticipantObjectTypeCodeRole=role)
    _coded(o, "ParticipantObjectIDTypeCode", id_type)
    return o


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: str) -> str:
    """A value from a peer (an AE title, a patient ID) as XML 1.0 may hold it: characters
    it forbids (control characters, lone surrogates) become U+FFFD."""
    return _NOT_XML.sub("\ufffd", value)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bytes(m: ET.Element) -> bytes:
    """One line: attribute values with a newline are escaped by ElementTree, text is
    made one line by `_one_line`."""
    out: bytes = ET.tostring(m, encoding="utf-8", xml_declaration=False)
    return out

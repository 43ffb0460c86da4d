"""Audit: the local IHE ATNA audit trail (DICOM PS3.15 A.5), issue 13 item 6.

What happened to patient data, and who did what to the box, as DICOM audit messages
(`messages`: one XML AuditMessage per event, codes from pydicom's DCM code dictionary)
written to a durable log in `STATE/audit/` (`trail`). The audit log holds patient IDs
and study UIDs by design - that is what an audit trail is for - so, unlike every other
output of the appliance:

* it is sealed at rest: each message is AES-256-GCM under a key derived from the spool
  key, so a stolen disk shows no more of it than of the spool; `appliance audit show`
  opens it for the hospital's auditor;
* it is kept apart: `STATE/audit/` is 0700 and each file 0600 (the appliance user only);
* it never leaves the box over the ops link (MQTT) or in a diagnostics bundle; only the
  hospital's own audit record repository may receive it: syslog over TLS (RFC 5425,
  DICOM PS3.15 A.6, IHE ITI-20) when `audit.syslog_host` is set (`repository`: a thread
  of its own sends from a durable cursor on the sealed trail, oldest first; the stdlib's
  SysLogHandler does not do RFC 5425 over TLS);
* nothing of it is logged: the journal says "audit written / failed" with counts only.

Events (PS3.15 A.5.3) and when they are written:

* the appliance starts / stops: Application Activity (Application Start / Stop), when
  `run` is ready and at a clean stop;
* instances received: DICOM Instances Transferred, action C, one message per
  association naming each study (UID, patient ID, SOP classes and counts), when the
  association ends;
* a bundle delivered, or an instance parked (it could not be delivered): DICOM Instances
  Transferred, action R, this box the source and the destination as the config names
  it, outcome 0 or 4; the study and its patient are named from what was remembered when
  the study was received (`studies.db` in the audit directory, kept 90 days);
* an association refused: Security Alert (Node Authentication), outcome 4;
* an operator's command (hold, release, retry, delete), through the control socket
  (the operator named by SO_PEERCRED) or the CLI: Security Alert (Use of Restricted
  Function);
* a start with another configuration than the last start: Security Alert (Software
  Configuration), with the SHA-256 of the files; a remote config of the operations
  center, applied or refused: Security Alert (Use of Restricted Function, area "ops");
* key use, from the CLI (cli/audited.py, as the user running the command): keys made by
  `appliance keys init` (Security Alert, Security Configuration, DCM 110129; keys kept
  are no change, and `keys show` reads public files only: neither is audited); the
  trail opened by `appliance audit show` (Audit Log Used, A.5.3.2, DCM 110101);
* software updates (cli/update.py): an install started, finished or failed, and at the
  next boot the slot on trial kept or rejected by the health gate, or found failed
  (Security Alert, Software Configuration, DCM 110131: PS3.16 CID 403's code for a
  change of the software; outcome 8 for a failure: the action was ended).

Durability: each message is appended whole (one line: base64 of the sealed XML),
flushed and fsynced before the call returns; writes are per association, never per
instance, so the receive rate does not pay for it. A file over `audit.max_mb` is
rotated (`audit.log` -> `audit.log.1` ...; `audit.files` kept). The daemon and the CLI
both write: each write holds a flock of the directory. A write that fails
(disk full) is counted and logged, never raised into the receive or forward path: an
audit failure must not refuse images.
"""

from appliance.audit.trail import AuditTrail

__all__ = ["AuditTrail"]

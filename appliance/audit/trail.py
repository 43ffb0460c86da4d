"""The durable audit log: `STATE/audit/audit.log`, one sealed DICOM AuditMessage per line.

Each line is base64 of a record sealed with AES-256-GCM under the audit key (derived from
the spool key: `SpoolKey.audit_key`), so the patient IDs in it are no more readable on a
stolen disk than the spool; `read` (and `appliance audit show`) opens them again.

`AuditTrail.write(message)` appends, flushes and fsyncs before it returns,
under a lock (association threads, the control socket and the daemon write) and a flock
of the directory (the CLI writes too: `keys init`, `audit show`, `update`; a file root
makes is given to the directory's owner). The directory is made
0700 and every file 0600 whatever the umask. Rotation by size: when a write would take
`audit.log` past `max_bytes`, it becomes `audit.log.1` (`.1` -> `.2` ...; the oldest
beyond `files` is removed) and a new file is started; each rename is made durable. A
write that fails is counted (`failed`) and logged with the errno only, and `write`
returns False: the audit trail never stops the flow of images.

The trail also keeps `last-config` (the SHA-256 of the last configuration it saw at
start), so that a start with another configuration is audited as a change.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag

from appliance.audit import messages
from appliance.audit.messages import Participant, Study
from appliance.core import crypto, durable
from appliance.core.config import Config, Destination

log = structlog.get_logger("appliance.audit")

FILE = "audit.log"
AAD = b"appliance audit record v1"


class AuditTrail:
    """The audit log of one appliance (`source_id`: its name, the AuditSourceID)."""

    def __init__(self, directory: Path, source_id: str, ae_title: str, key: bytes,
                 max_bytes: int = 32 << 20, files: int = 8) -> None:
        self.dir = directory
        self.key = key
        self.source_id = source_id
        self.ae_title = ae_title
        self.max_bytes = max_bytes
        self.files = files
        self.written = 0
        self.failed = 0
        self._lock = threading.Lock()
        self.on_write: Callable[[], None] = lambda: None  # the repository sender's wake
        durable.make_dirs(self.dir)
        os.chmod(self.dir, 0o700)
        if os.geteuid() == 0:  # made by root (`appliance update`): the daemon's user keeps it
            parent = self.dir.parent.stat()
            if self.dir.stat().st_uid != parent.st_uid:
                os.chown(self.dir, parent.st_uid, parent.st_gid)
        self._studies = _Studies(self.dir / "studies.db", key)

    @property
    def path(self) -> Path:
        return self.dir / FILE

    # --- the events (see the package docstring) ---------------------------------------

    def me(self, requestor: bool = False, role: tuple[str, str, str] | None = None) -> Participant:
        return Participant(user_id=self.source_id, requestor=requestor, role=role,
                           ae_title=self.ae_title)

    def application(self, started: bool) -> bool:
        return self.write(messages.application_activity(
            started, self.me(role=messages.APPLICATION), _now(), self.source_id))

    def received(self, calling_ae: str, peer: str, keyed: list[tuple[str, Study]], refused: int,
                 unnamed: int = 0) -> bool:
        """Instances received on one association (action C: created here); `keyed`: each
        study with its study key (remembered, so that its delivery can name it);
        `unnamed`: instances of studies past the per-association limit (receive.audited)."""
        if not keyed:
            return True
        self._studies.remember({key: (s.uid, s.patient_id) for key, s in keyed})
        studies = [s for _, s in keyed]
        source = Participant(user_id=peer, requestor=True, role=messages.SOURCE,
                             ae_title=calling_ae, address=peer)
        outcome = messages.MINOR_FAILURE if refused else messages.SUCCESS
        notes = [f"{refused} instance(s) refused"] if refused else []
        notes += [f"{unnamed} instance(s) of further studies not listed"] if unnamed else []
        why = "; ".join(notes) or None
        return self.write(messages.instances_transferred(
            "C", source, self.me(role=messages.DESTINATION), studies, outcome, _now(),
            self.source_id, why))

    def sent(self, study_key: str, destination: Participant, instances: int, ok: bool,
             description: str) -> bool:
        """Instances of a study sent on (action R: read here, created there), or one that
        could not be (parked): the study named from what its receipt remembered."""
        uid, pid = self._studies.lookup(study_key) or (f"unknown (study key {study_key})", "unknown")
        study = Study(uid, pid, {})
        return self.write(messages.instances_transferred(
            "R", self.me(requestor=True, role=messages.SOURCE), destination, [study],
            messages.SUCCESS if ok else messages.MINOR_FAILURE, _now(), self.source_id,
            description))

    def refused_association(self, calling_ae: str, peer: str, reason: str) -> bool:
        who = Participant(user_id=peer, requestor=True, ae_title=calling_ae, address=peer)
        return self.write(messages.security_alert(
            messages.DCM.NodeAuthentication, who, self.me(), messages.MINOR_FAILURE,
            f"association refused: {reason}", f"dicom:{self.ae_title}", _now(), self.source_id))

    def command(self, operator: str, op: str, target: str, outcome_ok: bool, detail: str,
                area: str = "queue") -> bool:
        """An operator's command on the queue (through the control socket or the CLI), or
        (area "ops") a command of the operations center, run or refused."""
        who = Participant(user_id=operator, requestor=True, user_name=operator)
        return self.write(messages.security_alert(
            messages.DCM.UseOfRestrictedFunction, who, self.me(),
            messages.SUCCESS if outcome_ok else messages.MINOR_FAILURE,
            f"{area} {op} {target}: {detail}", f"appliance:{area}/{target}", _now(), self.source_id))

    def keys_created(self, operator: str, created: list[str]) -> bool:
        """`appliance keys init` made keys (the spool key, the appliance key pair, the ops
        link's key): Security Alert, Security Configuration (PS3.15 A.5.3.11, DCM 110129).
        A key kept as it was is no change and is not audited."""
        if not created:
            return True
        who = Participant(user_id=operator, requestor=True, user_name=operator)
        return self.write(messages.security_alert(
            messages.DCM.SecurityConfiguration, who, self.me(), messages.SUCCESS,
            "keys created: " + "; ".join(created), "appliance:keys", _now(), self.source_id))

    def log_used(self, operator: str) -> bool:
        """The trail opened for reading (`appliance audit show`, with the audit key):
        Audit Log Used (PS3.15 A.5.3.2, DCM 110101)."""
        who = Participant(user_id=operator, requestor=True, user_name=operator)
        return self.write(messages.audit_log_used(
            who, self.me(role=messages.APPLICATION), self.path.as_uri(), _now(), self.source_id))

    def software_update(self, operator: str, step: str, ok: bool, detail: str,
                        serious: bool = True) -> bool:
        """A software update (appliance/update/): an install started, finished or failed,
        the booted slot kept or rejected by the health gate, a slot that failed its trial.
        Security Alert, Software Configuration (PS3.15 A.5.3.11, DCM 110131: a change of
        the software); a failure is outcome 8 (serious: the action was ended) unless
        `serious` is False (4)."""
        who = Participant(user_id=operator, requestor=True, user_name=operator)
        failed = messages.SERIOUS_FAILURE if serious else messages.MINOR_FAILURE
        outcome = messages.SUCCESS if ok else failed
        return self.write(messages.security_alert(
            messages.DCM.SoftwareConfiguration, who, self.me(), outcome, f"update {step}: {detail}",
            f"appliance:update/{step}", _now(), self.source_id))

    def config_seen(self, digest: str, files: list[str]) -> bool:
        """At start: audit a configuration other than the last one seen (the first ever
        counts as a change)."""
        mark = self.dir / "last-config"
        try:
            last = mark.read_text().strip()
        except FileNotFoundError:
            last = ""
        except OSError:
            last = "?"
        if last == digest:
            return True
        ok = self.write(messages.security_alert(
            messages.DCM.SoftwareConfiguration, self.me(requestor=True), self.me(), messages.SUCCESS,
            f"configuration sha256 {digest} from {', '.join(files)} (was {last or 'none'})",
            "appliance:config", _now(), self.source_id))
        if ok:
            try:
                durable.atomic_write(mark, (digest + "\n").encode(), mode=0o600)
            except OSError as e:
                log.error("audit.write_failed", errno=e.errno, what="last-config")
        return ok

    # --- the file -------------------------------------------------------------------------

    def write(self, message: bytes) -> bool:
        line = base64.b64encode(crypto.seal_record(self.key, AAD, message)) + b"\n"
        with self._lock:
            try:
                with _locked(self.dir):
                    self._rotate_for(len(line))
                    with open(self.path, "ab", buffering=0, opener=_private) as f:
                        os.fchmod(f.fileno(), 0o600)
                        _own(f.fileno(), self.dir)
                        rest = memoryview(line)
                        while rest:  # a short write (a nearly full disk) goes on, or raises
                            n = f.write(rest)
                            if not n:
                                raise OSError(errno.ENOSPC, "no byte written")
                            rest = rest[n:]
                        durable.fsync_file(f)
            except OSError as e:
                self.failed += 1
                log.error("audit.write_failed", errno=e.errno, failed=self.failed)
                return False
            self.written += 1
        self.on_write()
        return True

    def _rotate_for(self, n: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + n <= self.max_bytes:
            return
        for i in range(self.files - 1, 0, -1):
            older = self.dir / f"{FILE}.{i}"
            if older.exists():
                if i + 1 >= self.files:
                    older.unlink()
                else:
                    older.rename(self.dir / f"{FILE}.{i + 1}")
        self.path.rename(self.dir / f"{FILE}.1")
        durable.fsync_dir(self.dir)
        log.info("audit.rotated", files=self.files)


def for_config(cfg: Config, key: crypto.SpoolKey | None = None) -> AuditTrail:
    """The appliance's audit trail, in STATE/audit/, sealed under the audit key derived
    from the spool key (loaded here unless given)."""
    key = key or crypto.load_spool_key(cfg.spool.key_file)
    return AuditTrail(cfg.appliance.state_dir / "audit", cfg.appliance.name, cfg.receive.ae_title,
                      key.audit_key(), cfg.audit.max_mb << 20, cfg.audit.files)


def read(path: Path, key: bytes) -> Iterator[bytes | None]:
    """The messages of one audit file, in order; None for a line that does not open
    (altered, truncated by a crash, or sealed under another key)."""
    with path.open("rb") as f:
        for line in f:
            yield open_line(line, key)


def open_line(line: bytes, key: bytes) -> bytes | None:
    """One line of an audit file opened; None if it does not open."""
    try:
        return crypto.open_record(key, AAD, base64.b64decode(line.strip(), validate=True))
    except (InvalidTag, ValueError):
        return None


class _Studies:
    """study key -> (Study Instance UID, patient ID), remembered when a study is received
    so that its delivery, hours later and after restarts, can be audited by name.
    SQLite in the audit directory (0600), each pair sealed like the log's lines; rows
    older than KEEP_S are removed."""

    KEEP_S = 90 * 86400

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self.key = key

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(self.path, timeout=10)
        conn.execute("CREATE TABLE IF NOT EXISTS studies (key TEXT PRIMARY KEY, sealed BLOB NOT NULL,"
                     " seen REAL NOT NULL)")
        return conn

    def remember(self, studies: dict[str, tuple[str, str]]) -> None:
        now = time.time()
        try:
            with contextlib.closing(self._connect()) as conn, conn:
                conn.executemany("INSERT OR REPLACE INTO studies VALUES (?,?,?)",
                                 [(k, self._seal(k, uid, pid), now) for k, (uid, pid) in studies.items()])
                conn.execute("DELETE FROM studies WHERE seen < ?", (now - self.KEEP_S,))
        except sqlite3.Error as e:
            log.error("audit.write_failed", what="studies", error=type(e).__name__)

    def lookup(self, key: str) -> tuple[str, str] | None:
        try:
            with contextlib.closing(self._connect()) as conn:
                row = conn.execute("SELECT sealed FROM studies WHERE key=?", (key,)).fetchone()
        except sqlite3.Error as e:
            log.error("audit.read_failed", what="studies", error=type(e).__name__)
            return None
        if row is None:
            return None
        try:
            uid, pid = json.loads(crypto.open_record(self.key, b"audit study " + key.encode(), row[0]))
        except (InvalidTag, ValueError):
            log.error("audit.read_failed", what="studies", error="does not open")
            return None
        return str(uid), str(pid)

    def _seal(self, key: str, uid: str, pid: str) -> bytes:
        return crypto.seal_record(self.key, b"audit study " + key.encode(), json.dumps([uid, pid]).encode())


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The audit directory flock'ed: the daemon and the CLI (`keys init`, `audit show`,
    `update`) both write the trail, and rotate it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _own(fd: int, directory: Path) -> None:
    """A file root made (`appliance update` and its gate write the trail too) goes to the
    directory's owner, the appliance user, who must go on writing and rotating it."""
    if os.geteuid() == 0:
        d = directory.stat()
        if os.fstat(fd).st_uid != d.st_uid:
            os.fchown(fd, d.st_uid, d.st_gid)


def destination(d: Destination) -> Participant:
    """A [[destinations]] entry as the audit names it: its name, its AE title (dicom),
    its host (or the folder of a directory destination)."""
    host = d.host or (urllib.parse.urlsplit(d.url).hostname if d.url else None)
    return Participant(user_id=d.name, requestor=False, role=messages.DESTINATION,
                       ae_title=d.ae_title if d.transport == "dicom" else None,
                       address=host or (str(d.path) if d.path else None))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)

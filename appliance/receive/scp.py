"""Receive: the DICOM C-ECHO / C-STORE SCP that feeds the spool.

On the wire: one plain listener (receive.bind:port) and optionally one DICOM TLS
listener with mutual authentication (TLS 1.2+). Any storage SOP class and any transfer
syntax the peer proposes is accepted (pynetdicom's unrestricted storage service), so the
modality never has to convert; the bytes are kept exactly as received.

Who may connect: before pynetdicom sees a connection, `core.listener.Gate` caps the
connections per address and in total, gives each one `acse_timeout_s` from accept to a
complete A-ASSOCIATE-RQ (TLS included) and checks every PDU's declared length against
`max_pdu` before reading it (`receive_limits`). Then the calling AE title must be on the
allowlist, and when the entry lists hosts, the peer address must be in one of them.
Anyone else is rejected at association time with "rejected permanent / calling AE title
not recognised" (the reason DICOM has for it), unless `accept_any_caller` is set
explicitly; an association addressed to another AE title than ours with "called AE title
not recognised" (unless `check_called_ae` is false). Each refusal is counted by class
in `ReceiveStats` (`appliance status`).

What the peer is told: Success only after `Spool.store` has returned (the instance is
sealed, fsynced and committed). Every other outcome maps to a status through one table,
`STATUS`, and an exception inside the handler becomes a status too, never a dropped
association. Log lines carry opaque ids and the study key hash, never a UID or a name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import sqlite3
import ssl
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom import config as pydicom_config
from pynetdicom import (
    AE,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance import __version__
from appliance.audit import AuditTrail
from appliance.core import pynetdicom_compat as compat
from appliance.core.config import Receive, Rule
from appliance.core.errors import SpoolFullError
from appliance.core.listener import Gate, Limits, listen_error
from appliance.health.supervisor import Stage
from appliance.queue.store import PRIORITY_STAT
from appliance.receive import intake
from appliance.receive import rules as routing
from appliance.receive.audited import Received
from appliance.receive.identify import Rejected, identify, leading, part10_header
from appliance.receive.intake import InstanceBuffer
from appliance.receive.tuning import mark_activity, shorten_polling, tune_malloc
from appliance.spool.store import InstanceMeta, Spool, Stored
from appliance.update import lock as update_lock

log = structlog.get_logger("appliance.receive")

# --- pure: status classification -----------------------------------------------------

# outcome -> (DIMSE status, meaning). The one place where our outcomes become statuses.
STATUS: dict[str, tuple[int, str]] = {
    "stored": (0x0000, "Success"),
    "duplicate": (0x0000, "Success (already stored)"),
    "spool_full": (0xA700, "Refused: Out of Resources (spool at its free-space reserve)"),
    "disk_error": (0xA701, "Refused: Out of Resources (unable to write the spool)"),
    "too_large": (0xA702, "Refused: Out of Resources (larger than receive.max_instance_mb)"),
    "unparseable": (0xC210, "Error: Cannot understand (data set cannot be parsed)"),
    "missing_uids": (0xC211, "Error: Cannot understand (Study/Series/SOP Instance UID missing or invalid)"),
    "uid_mismatch": (0xC212, "Error: Cannot understand (SOP Instance UID differs from the request)"),
    "internal": (0x0110, "Failure: Processing failure"),
}

# Association rejections: reason -> (result, source, diagnostic, text). Rejected
# permanent, by the service user (PS3.8 9.3.4).
REJECTIONS: dict[str, tuple[int, int, int, str]] = {
    "calling_ae": (0x01, 0x01, 0x03, "calling AE title not recognised"),
    "called_ae": (0x01, 0x01, 0x07, "called AE title not recognised"),
    # Rejected transient, by the service provider: temporary congestion (the scanner
    # tries again later, by then on the updated slot).
    "update": (0x02, 0x03, 0x01, "an update is rebooting the appliance"),
}
# How long a rejected peer has to close its connection after the A-ASSOCIATE-RJ.
REJECT_LINGER_S = 2.0


def association_refusal(cfg: Receive, calling_ae: str, called_ae: str, address: str) -> str | None:
    """Why an association request is rejected (a key of REJECTIONS), or None."""
    if not caller_allowed(cfg, calling_ae, address):
        return "calling_ae"
    if cfg.check_called_ae and called_ae.strip() != cfg.ae_title.strip():
        return "called_ae"
    return None


def receive_limits(cfg: Receive) -> Limits:
    """What a connection to the receive ports may do (core.listener)."""
    return Limits(max_connections=cfg.max_connections, max_per_host=cfg.max_connections_per_host,
                  handshake_s=cfg.acse_timeout_s, io_timeout_s=cfg.network_timeout_s,
                  max_pdu=cfg.max_pdu)


def caller_allowed(cfg: Receive, ae_title: str, address: str) -> bool:
    """Is this calling AE title, from this address, allowed to associate?"""
    if cfg.accept_any_caller:
        return True
    ae = ae_title.strip()
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for c in cfg.callers:
        if c.ae_title == ae:
            return not c.hosts or any(ip in ipaddress.ip_network(h) for h in c.hosts)
    return False


# --- I/O edge: the SCP --------------------------------------------------------------


@dataclass
class ReceiveStats:
    """Counters for `appliance status` and metrics; updated under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    associations_active: int = 0
    associations_total: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # associations, by REJECTIONS key
    connections_refused: Counter[str] = field(default_factory=Counter)  # by listener.REFUSALS key
    bytes_received: int = 0

    def count(self, outcome: str, nbytes: int = 0) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.bytes_received += nbytes

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def refuse_connection(self, reason: str) -> None:
        with self.lock:
            self.connections_refused[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            refused = {k: v for k, v in self.outcomes.items() if k not in ("stored", "duplicate")}
            return {
                "associations_active": self.associations_active,
                "associations_total": self.associations_total,
                "associations_rejected": sum(self.rejected.values()),
                "associations_rejected_by_reason": dict(self.rejected),
                "connections_refused": dict(self.connections_refused),
                "instances_received": self.outcomes["stored"] + self.outcomes["duplicate"],
                "instances_duplicate": self.outcomes["duplicate"],
                "instances_refused": refused,
                "bytes_received": self.bytes_received,
            }


def tls_server_context(cert: str, key: str, ca: str, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


# Two C-STOREs closer than this are one burst (at full speed they are ~4 ms apart; a
# scanner reconstructing as it sends leaves seconds between images).
BURST_GAP_S = 0.25


class Receiver:
    """Builds the AE, binds handlers with their dependencies, starts and stops listeners."""

    def __init__(self, cfg: Receive, spool: Spool, stats: ReceiveStats,
                 on_stored: Callable[[str], None] | None = None, stage: Stage | None = None,
                 rules: Sequence[Rule] = (), audit: AuditTrail | None = None,
                 update_lock: Path | None = None) -> None:
        self.cfg = cfg
        # update/lock.py: each established association holds it, so a reboot into an
        # updated slot waits for it; while a reboot waits, requests are rejected transient.
        self.update_lock = update_lock
        self._holds: dict[int, contextlib.ExitStack] = {}
        self.audit = audit
        self._audited = Received()  # per association and study, for the audit trail
        self.rules = tuple(rules)
        self._read_attributes = routing.needs_attributes(self.rules)
        self._decided: OrderedDict[str, Rule] = OrderedDict()  # recent studies' rule, bounded
        self.spool = spool
        self.stats = stats
        self.on_stored = on_stored
        self.stage = stage or Stage("receive", 120.0)  # the supervisor's, in the daemon
        self.gate = Gate("receive", receive_limits(cfg), refused=stats.refuse_connection)
        self._per_assoc: dict[int, Counter[str]] = {}  # id(association) -> outcomes, bytes
        self.last_store = 0.0  # time.monotonic() of the last C-STORE answered
        tune_malloc()  # process-wide; see MALLOC_MMAP_THRESHOLD
        shorten_polling()
        intake.install(spool, cfg.in_memory_limit_mb << 20, cfg.max_instance_mb << 20)
        compat.configure_scp()  # every storage SOP class; our own log lines, without identifiers
        # pydicom checks each value it decodes (our data sets, pynetdicom's command sets)
        # and reports a bad one with warnings.warn(text quoting the value), which goes to
        # stderr, i.e. the log: a UID or a name in clear. We check what we rely on
        # ourselves (`identify`) and never alter data, so decoding must not judge.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        ae = AE(ae_title=cfg.ae_title)
        ae.add_supported_context(Verification)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.implementation_version_name = f"APPLIANCE_{__version__}"[:16]
        self.ae = ae
        self.handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def start(self) -> list[tuple[str, int, bool]]:
        """Start the listeners; returns (host, port, tls) for each. ListenError if a port
        cannot be bound (nothing is left listening then)."""
        out = []
        try:
            if self.cfg.plain:
                out.append(self._listen(self.cfg.bind, self.cfg.port, None))
            if self.cfg.tls:
                t = self.cfg.tls
                ctx = tls_server_context(str(t.cert), str(t.key), str(t.ca), t.require_client_cert)
                out.append(self._listen(t.bind or self.cfg.bind, t.port, ctx))
        except BaseException:
            self.stop()
            raise
        self.gate.start()
        return out

    def _listen(self, host: str, port: int, ctx: ssl.SSLContext | None) -> tuple[str, int, bool]:
        what = "DICOM over TLS" if ctx else "DICOM"
        try:
            server = self.ae.make_server((host, port), ssl_context=ctx, evt_handlers=self.handlers,
                                         server_class=compat.GatedServer)
        except OSError as e:
            raise listen_error(e, what, host, port) from None
        self.gate.serve(server)
        bound = server.server_address
        return (str(bound[0]), int(bound[1]), ctx is not None)

    def listening(self) -> bool:
        """The gate's thread, which accepts for every listener, is alive (for the supervisor)."""
        return self.gate.alive()

    def stop(self) -> None:
        """Stop accepting (associations in progress run on)."""
        self.gate.stop()

    # --- event handlers (run on association threads) ---

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        reason = association_refusal(self.cfg, rq.calling_ae_title, rq.called_ae_title,
                                     assoc.requestor.address)
        if reason is None and self.update_lock is not None and update_lock.pending(self.update_lock):
            reason = "update"
        if reason is None:
            return
        self.stats.reject(reason)
        result, source, diagnostic, text = REJECTIONS[reason]
        log.warning("association.rejected", calling_ae=rq.calling_ae_title.strip(),
                    called_ae=rq.called_ae_title.strip(), peer=assoc.requestor.address, reason=text)
        if self.audit is not None:
            self.audit.refused_association(str(rq.calling_ae_title).strip(),
                                           str(assoc.requestor.address), text)
        # After the A-ASSOCIATE-RJ the peer should close the connection; wait for that at
        # most REJECT_LINGER_S (the ARTIM timer), so that a refused peer keeps neither
        # its connection nor an association slot for the whole ACSE timeout.
        assoc.acse_timeout = min(REJECT_LINGER_S, self.cfg.acse_timeout_s)
        assoc.acse.send_reject(result, source, diagnostic)
        # send_reject only queues the A-ASSOCIATE-RJ; right after this handler the
        # reactor closes the socket, usually before the DUL thread has sent it, and the
        # peer sees a dropped connection instead of the reason. kill() (as pynetdicom's
        # own rejections do) waits until the RJ is out and the peer has closed (or the
        # ARTIM timer expired).
        assoc.kill()

    def _on_established(self, event: Any) -> None:
        if self.update_lock is not None:
            hold = contextlib.ExitStack()
            # A reboot that began since the request: this association is not waited for.
            with contextlib.suppress(update_lock.UpdatePending):
                hold.enter_context(update_lock.work(self.update_lock))
            self._holds[id(event.assoc)] = hold
        with self.stats.lock:
            self.stats.associations_active += 1
            self.stats.associations_total += 1
            self._per_assoc[id(event.assoc)] = Counter()
        log.info("association.established", calling_ae=event.assoc.requestor.ae_title,
                 peer=event.assoc.requestor.address)

    def _on_closed(self, event: Any) -> None:
        # An instance cut off in the middle: remove its temp file now (see intake.py).
        msg = getattr(getattr(event.assoc, "dimse", None), "message", None)
        buf = getattr(msg, "_data_set_file", None)
        if isinstance(buf, InstanceBuffer):
            buf.abandon()
        with self.stats.lock:
            self.stats.associations_active = max(0, self.stats.associations_active - 1)
            counts = self._per_assoc.pop(id(event.assoc), Counter())
        hold = self._holds.pop(id(event.assoc), None)
        if hold is not None:
            hold.close()
        # One line per association at INFO (a CT study is hundreds of images: one line
        # each would bury everything else in the journal); per image at DEBUG.
        log.info("association.closed", calling_ae=event.assoc.requestor.ae_title,
                 how="released" if event.event is evt.EVT_RELEASED else "aborted",
                 stored=counts["stored"], duplicate=counts["duplicate"],
                 refused=sum(v for k, v in counts.items() if k not in ("stored", "duplicate", "bytes")),
                 bytes=counts["bytes"])
        studies, unnamed = self._audited.take(id(event.assoc))
        if self.audit is not None and (studies or unnamed):
            refused = sum(v for k, v in counts.items() if k not in ("stored", "duplicate", "bytes"))
            self.audit.received(str(event.assoc.requestor.ae_title).strip(),
                                str(event.assoc.requestor.address), studies, refused, unnamed)

    def in_burst(self, gap_s: float = BURST_GAP_S) -> bool:
        """Is a scanner sending images back to back right now?"""
        return bool(self.stats.associations_active) and time.monotonic() - self.last_store < gap_s

    def _count(self, event: Any, outcome: str, nbytes: int) -> None:
        self.last_store = time.monotonic()
        mark_activity(event.assoc)
        self.stats.count(outcome, nbytes)
        with self.stats.lock:
            c = self._per_assoc.get(id(event.assoc))
            if c is not None:
                c[outcome] += 1
                c["bytes"] += nbytes

    def _on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        buf = getattr(req, "_dataset_file", None)
        if not isinstance(buf, InstanceBuffer):  # intake not installed: pynetdicom's BytesIO
            data = req.DataSet.getbuffer() if hasattr(req.DataSet, "getbuffer") else req.DataSet.read()
            head = part10_header(str(req.AffectedSOPClassUID or ""), sop_uid,
                                 str(event.context.transfer_syntax), calling)
            buf, parts, nbytes = None, [head, data], len(data)
        else:
            parts, nbytes = buf.parts, buf.size - buf.head_size
        try:
            with self.stage.job("store"):
                stored = self._store(buf, parts, sop_uid, calling, req.Priority, id(event.assoc))
        except Rejected as r:
            return self._answer(event, r.outcome, nbytes)
        except SpoolFullError:
            return self._answer(event, "spool_full", nbytes)
        except OSError as e:
            log.error("store.disk_error", error=e.strerror, errno=e.errno)
            return self._answer(event, "disk_error", nbytes)
        except sqlite3.Error as e:
            # The index commit meeting a full or failing disk is a disk error (the sealed
            # file has been removed again), not a bug: say Out of Resources, retry later.
            if getattr(e, "sqlite_errorcode", 0) & 0xFF not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
                log.exception("store.internal_error", error_type=type(e).__name__)
                return self._answer(event, "internal", nbytes)
            log.error("store.disk_error", error=getattr(e, "sqlite_errorname", str(e)), errno=None)
            return self._answer(event, "disk_error", nbytes)
        except Exception as e:  # the boundary: an exception must become a status
            log.exception("store.internal_error", error_type=type(e).__name__)
            return self._answer(event, "internal", nbytes)
        outcome = "duplicate" if stored.duplicate else "stored"
        self._count(event, outcome, nbytes)
        log.debug("instance.stored" if not stored.duplicate else "instance.duplicate",
                 instance=stored.id, segment=stored.segment_id, study=stored.study_key, bytes=nbytes)
        if self.on_stored:
            self.on_stored(stored.segment_id)
        return STATUS[outcome][0]

    def _store(self, buf: InstanceBuffer | None, parts: list[bytes | memoryview], sop_uid: str,
               calling: str, cstore_priority: Any = 0, assoc: int = 0) -> Stored:
        """Identify and spool one instance; raises Rejected, SpoolFullError, OSError, ..."""
        if buf is not None and buf.failed:
            raise Rejected(buf.failed if buf.failed in STATUS else "internal")
        if buf is not None and buf.incoming is not None:
            prefix = bytes(buf.prefix)
            meta = self._prioritised(identify([prefix], sop_uid, calling, complete=buf.complete_prefix),
                                     lambda: prefix, cstore_priority)
            stored = self.spool.store_incoming(buf.incoming, meta)
            head: Callable[[], bytes] = lambda: prefix  # noqa: E731
        else:
            head = lambda: leading(parts, routing.FACTS_PREFIX)  # noqa: E731
            meta = self._prioritised(identify(parts, sop_uid, calling), head, cstore_priority)
            stored = self.spool.store(parts, meta)
        if self.audit is not None and not stored.duplicate:
            try:  # stored and committed: nothing about the audit may refuse it now
                self._audited.note(assoc, meta.study_uid, stored.study_key, meta.sop_class, head)
            except Exception:  # noqa: BLE001 - counted by the audit message's absence
                log.exception("audit.note_failed")
        return stored

    def _prioritised(self, meta: InstanceMeta, head: Callable[[], bytes],
                     cstore_priority: Any) -> InstanceMeta:
        """`meta` with the priority and route the routing rules give its study
        (receive/rules.py). A study a rule decided lately is not looked at again."""
        if not self.rules:
            return meta
        rule = self._decided.get(meta.study_uid)
        if rule is None:
            priority = routing.cstore_priority(cstore_priority)
            facts = (routing.read_facts(head(), meta.calling_ae, priority) if self._read_attributes
                     else routing.Facts(calling_ae=meta.calling_ae, cstore_priority=priority))
            rule = routing.first_match(self.rules, facts)
            if rule is None or (rule.priority != "stat" and not rule.destinations):
                return meta
            self._decided[meta.study_uid] = rule
            while len(self._decided) > 256:
                self._decided.popitem(last=False)
            log.info("study.stat" if rule.priority == "stat" else "study.routed", rule=rule.name,
                     destinations=list(rule.destinations) or None)
        return dataclasses.replace(meta, route=rule.destinations,
                                   priority=PRIORITY_STAT if rule.priority == "stat" else meta.priority)

    def _answer(self, event: Any, outcome: str, nbytes: int) -> int:
        status, meaning = STATUS[outcome]
        self._count(event, outcome, nbytes)
        log.warning("instance.refused", outcome=outcome, status=f"0x{status:04X}", meaning=meaning)
        return status

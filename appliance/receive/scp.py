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
import ctypes
import ctypes.util
import dataclasses
import io
import ipaddress
import re
import sqlite3
import ssl
import threading
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import structlog
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import BaseTag, Tag
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance import __version__
from appliance.audit import AuditTrail
from appliance.core import dicomscan, part10
from appliance.core import pynetdicom_compat as compat
from appliance.core.config import Receive, Rule
from appliance.core.errors import SpoolFullError
from appliance.core.listener import Gate, Limits, listen_error
from appliance.health.supervisor import Stage
from appliance.queue.store import PRIORITY_STAT
from appliance.receive import intake
from appliance.receive import rules as routing
from appliance.receive.audited import Received
from appliance.receive.intake import InstanceBuffer
from appliance.spool.store import InstanceMeta, Spool, Stored, reader
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

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64 and bool(_UID_RE.match(v))


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, "DICM" and the file meta group for a received data set.

    The same bytes pydicom's write_file_meta_info produces for these elements (a test
    checks it), written directly: on the receive path pydicom's general encoder cost
    ~0.5 ms per image, a tenth of the whole budget. Values come from the C-STORE request
    and the presentation context; they are only ever compared, never used as paths.
    """
    def enc(v: str) -> bytes:
        return v.encode("latin-1", "replace")

    return part10.file_meta([
        part10.element(0x00020001, b"OB", b"\x00\x01"),
        part10.element(0x00020002, b"UI", enc(sop_class)),
        part10.element(0x00020003, b"UI", enc(sop_instance)),
        part10.element(0x00020010, b"UI", enc(transfer_syntax)),
        part10.element(0x00020012, b"UI", enc(PYNETDICOM_IMPLEMENTATION_UID)),
        part10.element(0x00020013, b"SH", enc(PYNETDICOM_IMPLEMENTATION_VERSION)),
        part10.element(0x00020016, b"AE", enc(source_ae)),
    ])


class Rejected(Exception):
    """A data set we refuse; `outcome` is a key of STATUS."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


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


_IDENTIFYING_TAGS: list[BaseTag | int] = [Tag(k) for k in (
    "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]


# identify() parses this much of an instance first; the UIDs are near the start.
IDENTIFY_PREFIX = 64 << 10


def _read_identifiers(src: BinaryIO) -> tuple[Any, bool]:
    """Parse up to the first element after Series Instance UID; (dataset, got that far)."""
    reached = False

    def past_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal reached
        reached = bool(tag > 0x0020000E)
        return reached

    return read_partial(src, past_series_uid, specific_tags=_IDENTIFYING_TAGS), reached


def _prefix(parts: list[bytes | memoryview], n: int) -> bytes:
    out = bytearray()
    for p in parts:
        out += p[: n - len(out)]
        if len(out) >= n:
            break
    return bytes(out)


def identify(parts: list[bytes | memoryview], request_sop_uid: str, calling_ae: str,
             *, complete: bool = True) -> InstanceMeta:
    """Read the identifying UIDs of a Part-10 instance (given in pieces); raise Rejected if unusable.

    Parsing stops right after Series Instance UID (elements are in ascending tag order;
    the rest of the header cost ~4x as much), and first tries only the leading
    `IDENTIFY_PREFIX` bytes from a BytesIO: pydicom's many small reads through a Python
    file object cost more than the parse itself. If that prefix does not reach past the
    UIDs, all of `parts` is parsed. `complete=False` says `parts` is only the start of the
    instance (one sealed to disk as it arrived): the UIDs must then lie within it. A
    deflated data set is never inflated whole (see `_deflated_identifiers`).
    """
    return _checked(*_identifiers(parts, complete), request_sop_uid, calling_ae)


Identifiers = tuple[Any, Any, Any, str, str]  # study, series, SOP instance, syntax, SOP class


def _identifiers(parts: list[bytes | memoryview], complete: bool) -> Identifiers:
    total = sum(len(p) for p in parts)
    head = _prefix(parts, IDENTIFY_PREFIX)
    fast = dicomscan.scan_identifiers(head)
    if fast is not None:
        return (fast.get(dicomscan.STUDY_INSTANCE_UID), fast.get(dicomscan.SERIES_INSTANCE_UID),
                fast.get(dicomscan.SOP_INSTANCE_UID), fast[dicomscan.TRANSFER_SYNTAX],
                fast[dicomscan.MEDIA_SOP_CLASS])
    meta = dicomscan.file_meta(head)
    if meta is not None and meta[1][dicomscan.TRANSFER_SYNTAX] == dicomscan.DEFLATED:
        return _deflated_identifiers(parts, *meta)
    ds = None
    if len(head) < total or not complete:
        with contextlib.suppress(Exception):  # truncated prefix: any error means "parse it all"
            parsed, reached = _read_identifiers(io.BytesIO(head))
            ds = parsed if reached else None
    try:
        if ds is None:
            ds, reached = _read_identifiers(io.BytesIO(head) if len(head) == total else reader(parts))
            if not (complete or reached):
                raise EOFError("identifying UIDs not within the part of the instance kept")
        study, series, sop = (ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        ts = str(ds.file_meta.TransferSyntaxUID)
        sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
    except _PARSE_ERRORS:
        raise Rejected("unparseable") from None
    return study, series, sop, ts, sop_class


_PARSE_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError,
                 OverflowError, NotImplementedError, UnicodeError, IndexError, OSError, zlib.error)

# A deflated data set is inflated only this far to find its UIDs: first the short
# prefix, then (UIDs behind a long element or sequence) the long one, never more. pydicom
# would inflate it whole: 0.5 MiB on the wire can be 512 MiB inflated.
DEFLATED_PREFIXES = (64 << 10, 4 << 20)


def _deflated_identifiers(parts: list[bytes | memoryview], start: int, meta: dict[int, str]) -> Identifiers:
    for limit in DEFLATED_PREFIXES:
        try:
            data, whole = inflated_prefix(parts, start, limit)
            reached = False

            def past_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
                nonlocal reached
                reached = bool(tag > 0x0020000E)
                return reached

            ds = read_dataset(io.BytesIO(data), False, True, stop_when=past_series_uid,
                              specific_tags=_IDENTIFYING_TAGS)
        except _PARSE_ERRORS:
            raise Rejected("unparseable") from None
        if reached or whole:
            return (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"),
                    meta[dicomscan.TRANSFER_SYNTAX], meta[dicomscan.MEDIA_SOP_CLASS])
    log.warning("instance.unidentified", reason="identifying UIDs not within the first "
                f"{DEFLATED_PREFIXES[-1] >> 20} MiB of the inflated data set")
    raise Rejected("unparseable")


def inflated_prefix(parts: list[bytes | memoryview], start: int, limit: int) -> tuple[bytes, bool]:
    """Inflate (raw deflate, PS3.5 A.5) the bytes of `parts` from offset `start` until
    `limit` bytes came out; (those bytes, whether that is the whole data set). Memory and
    work stay proportional to `limit` whatever the input inflates to."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pos = 0
    for p in parts:
        skip, pos = max(0, start - pos), pos + len(p)
        chunk: bytes | memoryview = p[skip:] if skip < len(p) else b""
        while chunk and len(out) < limit and not d.eof:
            out += d.decompress(chunk, limit - len(out))
            chunk = d.unconsumed_tail
        if len(out) >= limit or d.eof:
            break
    return bytes(out[:limit]), d.eof


def _checked(study: Any, series: Any, sop: Any, ts: str, sop_class: str, request_sop_uid: str,
             calling_ae: str) -> InstanceMeta:
    study, series, sop = (str(v).strip("\x00 ") if v is not None else None for v in (study, series, sop))
    if not (valid_uid(study) and valid_uid(series) and valid_uid(sop)):
        raise Rejected("missing_uids")
    if sop != request_sop_uid.strip("\x00 "):
        raise Rejected("uid_mismatch")
    return InstanceMeta(study_uid=study, sop_instance_uid=sop, sop_class=sop_class,
                        transfer_syntax=ts, calling_ae=calling_ae)


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


# glibc malloc serves every allocation >= 128 KiB with a fresh mmap() and gives it back
# with munmap() (and trims the heap top above 128 KiB): each PDU, data set and sealed
# copy of a 0.5 MB CT slice then costs ~130 page faults plus zeroing, ~0.8 ms of system
# CPU per image on the bench machine. Serving such buffers from the heap and keeping
# freed memory for reuse cut the receiver's CPU by ~16 % and raised single-association
# throughput by ~30 % with no change in peak RSS (docs/benchmarks.md).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MALLOC_MMAP_THRESHOLD = 4 << 20   # below this, buffers come from the heap (CT/MR slices)
MALLOC_TRIM_THRESHOLD = 64 << 20  # free heap kept for reuse before it goes back to the OS


def tune_malloc() -> bool:
    """Apply the thresholds above with mallopt(3); False where that is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


# pynetdicom's reactors poll: the DUL thread sleeps `_run_loop_delay` (1 ms) whenever it
# finds nothing to do, and the association thread sleeps a fixed 1 ms per loop. C-STORE is
# one request in flight at a time, so each image waits for several of these sleeps (~2 ms,
# more than the rest of our handler). While images are arriving (a C-STORE answered in the
# last BUSY_WINDOW_S) both sleep POLL_BUSY_S instead; otherwise they keep pynetdicom's 1 ms,
# so an association a scanner keeps open between studies costs no more CPU than before.
# The same sleeps serve the forwarder's associations in this process.
POLL_BUSY_S = 0.00005
POLL_IDLE_S = 0.001
BUSY_WINDOW_S = 0.05
_last_activity = 0.0  # time.monotonic() of the last C-STORE answered (any association)
_busy_sleep_s = POLL_BUSY_S  # what a reactor sleeps within BUSY_WINDOW_S of _last_activity
_senders: dict[int, float] = {}  # id(association) -> time.monotonic() of its last C-STORE


def mark_activity(assoc: object = None) -> None:
    """A C-STORE was answered on `assoc`: poll fast for a while, unless several are sending.

    With two or more associations sending at once the CPUs are already busy with their
    images, so a reactor that sleeps its 1 ms loses no time, while a fast-polling one
    would only take CPU from them (measured: 4 associations at 50 us reached 0.77x the
    single association's rate; bench/receive_bench.py).
    """
    global _last_activity, _busy_sleep_s
    now = time.monotonic()
    _last_activity = now
    _senders[id(assoc)] = now
    for key, seen in list(_senders.items()):
        if now - seen >= BUSY_WINDOW_S:
            _senders.pop(key, None)
    _busy_sleep_s = POLL_BUSY_S if len(_senders) <= 1 else POLL_IDLE_S


class _AdaptiveSleepTime:
    """Stands in for the `time` module inside pynetdicom's reactors: shortens their sleeps."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        busy = time.monotonic() - _last_activity < BUSY_WINDOW_S
        time.sleep(min(seconds, _busy_sleep_s if busy else POLL_IDLE_S))


def shorten_polling() -> None:
    compat.replace_reactor_sleep(_AdaptiveSleepTime())


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
            head = lambda: _prefix(parts, routing.FACTS_PREFIX)  # noqa: E731
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


def identify_stored(part10: bytes, complete: bool = True) -> InstanceMeta:
    """Identify a Part-10 file the spool already holds (crash recovery of orphans), from
    all of it or, with `complete=False`, from its start only (the UIDs must lie within)."""
    try:
        study, series, sop, ts, sop_class = _identifiers([part10], complete)
        meta = dicomscan.file_meta(part10[:IDENTIFY_PREFIX])
        calling = meta[1].get(dicomscan.SOURCE_AE, "") if meta else ""
        return _checked(study, series, sop, ts, sop_class, str(sop or ""), calling.strip())
    except Rejected as r:
        raise ValueError(r.outcome) from None

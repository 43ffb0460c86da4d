"""The `dicom` transport: C-STORE SCU to a PACS over DICOM TLS, with optional Storage Commitment.

One `send` delivers one bundle: the bundle is verified and decrypted in memory (one
instance at a time, `bundle.iter_instances`; no plaintext on disk), and its instances are
sent over one association (several when a bundle needs more than pynetdicom's 128
presentation contexts; see `plan_groups`). The transport raises `Retryable` or
`Permanent` (appliance.forward) with a reason for the operator; reasons and log lines
name instances by their index in the bundle and SOP classes by name, never by UID or any
other patient data.

Presentation contexts and transfer syntaxes
-------------------------------------------
For each SOP class of the bundle we propose each transfer syntax its instances are in
(as transmitted: usually JPEG 2000 / JPEG-LS lossless, or what the modality sent; Explicit
VR LE too) in a context of its own, and separately one context with Explicit VR Little
Endian + Implicit VR Little Endian. Each instance is then sent

* as is, when a context with its own transfer syntax was accepted: the bytes are exactly
  the bundle's (the data set after the File Meta Information; nothing is re-encoded by
  pydicom or pynetdicom);
* else decompressed to Explicit VR Little Endian (`codec.decompress`, which keeps every
  UID and changes only what the syntax dictates) when the uncompressed context was
  accepted with Explicit VR LE;
* else (a peer that only takes Implicit VR LE) decompressed and re-encoded Implicit VR LE.

A SOP class for which the peer accepted no context at all is `Permanent` ("the PACS does
not accept SOP class <name>"), checked right after the association is established and
before anything of that association is sent. So is an instance the codec cannot turn into
something the peer accepts.

Status table (C-STORE response status, PS3.4 Annex B.2.3 and PS3.7 Annex C)
------------------------------------------------------------------------------
`classify_status` is the single, pure decision table:

* 0x0000 success.
* Warning class, delivered and logged as a warning: 0xB000-0xBFFF (B000 coercion of
  data elements, B006 elements discarded, B007 data set does not match SOP class; the
  rest of the Bxxx range is treated the same), 0x0001, 0x0107, 0x0116.
* 0x0111 "duplicate SOP instance": delivered with a warning. A PACS that answers it to a
  C-STORE already holds an instance with this SOP Instance UID, i.e. our own copy from an
  earlier, interrupted attempt (see idempotence below).
* Retryable: 0xA700-0xA7FF out of resources; 0x0213 resource limitation; 0x0110
  processing failure (decision: it is the PACS's catch-all for "something went wrong
  while storing" - a database lock, a full or failing disk - which usually goes away;
  retrying with back-off costs bandwidth, while holding would leave a stroke study
  waiting for a human); 0x0210 duplicate invocation; 0xFE00 cancel; pending statuses
  (invalid for C-STORE); no response, timeout, abort, connection lost.
* Permanent: 0xA900-0xA9FF data set does not match SOP class, 0xC000-0xCFFF cannot
  understand, 0x0122 SOP class not supported, 0x0124 not authorized, 0x0117 invalid SOP
  instance, 0x0211 unrecognized operation, 0x0212 mistyped argument, and the other
  PS3.7 Annex C failures that describe the request itself (0x0105, 0x0106, 0x0112-0x0115,
  0x0118-0x0121, 0x0123).
* Any other (unknown) status: Retryable (decision: a misclassified permanent error only
  costs retries with back-off and shows its status in `appliance status`; a
  misclassified transient one would hold a study until a human releases it).

Association set-up: connection refused, timed out, reset, or no answer to the
A-ASSOCIATE-RQ -> Retryable. A-ASSOCIATE-RJ with result "transient", or from the
presentation layer (congestion, local limit) -> Retryable; other permanent rejections ->
Permanent with the reason (e.g. "called AE title not recognized"). A peer that accepts
the association but none of its contexts -> Permanent naming the SOP classes.

TLS
---
Unless the destination says `plaintext = true` (then a warning is logged once, when the
transport is built), the transport speaks DICOM TLS with mutual authentication: TLS 1.2
or newer, this box's certificate and key from `tls.cert`/`tls.key`, and the PACS's
certificate verified against `tls.ca` only (not the system store). The host name is
checked against the certificate when `host` is a DNS name; when `host` is an IP address
it is not (decision: PACS certificates rarely carry IP SANs, and on the VPN the trust
anchor is `tls.ca`, which should be the reading center's own CA - a CA that signs only
its servers). The TLS files are read again for each bundle, so renewed certificates are
used without a restart; files that cannot be read are Retryable (a human fixes them and
the queue resumes by itself). The PACS's certificate failing verification (unknown CA,
expired, wrong host name) or the PACS refusing our client certificate (TLS alerts
unknown CA / bad / unknown / expired / revoked certificate, access denied, certificate
required) -> Permanent with the reason; TLS version or cipher mismatch, or a non-TLS
peer -> Permanent; a connection closed during the handshake -> Retryable.

Dead peers and slow links
-------------------------
pynetdicom 3.0 waits the whole DIMSE timeout for a response even when the connection is
gone, and starts that timeout when the request is *queued*, not when it has been sent,
so a 60 s timeout is both too long for a dead peer and too short for a 500 MB instance
on a 2 Mbit/s uplink. Here every DIMSE request is sent and its response awaited by
`_Link.request`, which polls every 50 ms: it fails at once when the connection is closed
or aborted (the DUL state machine is back in Sta1, or an A-ABORT/A-P-ABORT is queued),
and after `timeout_s` without progress, where progress is any PDU written to or read
from the socket. The socket itself has a `timeout_s` send/receive timeout, so a write to
a peer that stopped reading (a frozen PACS, a partitioned link) fails instead of
blocking. ACSE and connection timeouts are `timeout_s` too; pynetdicom's idle
(network) timeout is off, because it only counts received data and would abort a long
upload. Sockets have TCP_NODELAY (DIMSE writes a small command PDU before the data;
without it Nagle + delayed ACK stall each C-STORE ~40 ms).

Idempotence
-----------
A bundle is delivered whole or not at all from the queue's point of view: if an attempt
fails after some instances were stored (or the appliance crashes), the next attempt sends
the whole bundle again. That is safe: a PACS stores by SOP Instance UID, so the second
copy of an instance replaces (or is recognised as) the first, and the UIDs never change
on the way (the decompression fallback keeps them).

Storage Commitment (`storage_commitment = true`)
------------------------------------------------
After every C-STORE of the bundle has succeeded, an N-ACTION (Storage Commitment Push
Model, action type 1, a fresh random Transaction UID, the Referenced SOP Sequence of all
instances of the bundle) goes on the last association, and the bundle counts as
delivered only when N-EVENT-REPORT(s) for that transaction have accounted for every
instance and all of them are committed. Any failed reference -> Retryable (the bundle is
sent again) with the failure reason; no complete report within `timeout_s` -> Retryable.
The report is accepted both ways a PACS may send it:

* on the same association (the SCU role suffices for that; pynetdicom dispatches the
  N-EVENT-REPORT to our EVT_N_EVENT_REPORT handler, which answers Success);
* on a new association from the PACS to the appliance. That is what Orthanc does (1.6.0
  and later, checked with 1.10.1): it opens an association to the modality that its
  `DicomModalities` lists under our calling AE title, proposing the Push Model with role
  selection SCU=no/SCP=yes, and sends the report within milliseconds of the N-ACTION.
  An Orthanc that does not know our AE title aborts the N-ACTION association. For this
  the transport runs a small SCP (`commitment_port`, started at the first commitment,
  TLS with client certificates verified against `tls.ca` unless plaintext) that accepts
  only the Push Model and matches reports to waiting bundles by Transaction UID (random,
  128 bits: the report's authenticator, together with TLS when enabled; the calling AE
  title is not checked, PACS often report under another AE title). Reports for unknown
  transactions (a late report for an attempt that already gave up) are acknowledged and
  ignored. While such a listener exists we keep the association open for up to 2 s for a
  same-association report, then release it and keep waiting on the listener.

Progress: `progress(n)` after each instance, n = the sum of the bundle (manifest) sizes of
the instances sent so far.

The association's own reactor is paused for as long as we use the association (from
establishment to release): pynetdicom pauses it per request, which leaves a window after
each un-pause in which a fast response is taken off the queue and dropped.

This module relies on pynetdicom internals (pinned <3.1 in pyproject.toml):
`AE._create_socket`, `AssociationSocket._create_socket`, the association's reactor pause
(`_reactor_checkpoint`, `_is_paused`), `DIMSEServiceProvider.send_msg`/`msg_queue`, and
the DUL's `state_machine`/`to_provider_queue`. Check them when upgrading.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import queue
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_primitives import C_STORE, N_ACTION
from pynetdicom.dsutils import encode
from pynetdicom.transport import AddressInformation, AssociationSocket

from appliance import codec
from appliance.bundle import ManifestEntry, PrivateKey, iter_instances, read_manifest
from appliance.config import Destination
from appliance.errors import ConfigError, IntegrityError
from appliance.forward import Permanent, Retryable

log = structlog.get_logger("appliance.forward.dicom")

STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")  # the well-known SOP instance
MAX_CONTEXTS = 128  # pynetdicom (and PS3.8: odd context ids 1..255)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
REPORT_GRACE_S = 2.0  # how long to hold the association for a same-association report
_POLL_S = 0.05


# --- pure: status classification ------------------------------------------------------


class Outcome(enum.Enum):
    SUCCESS = "success"
    WARNING = "warning"  # delivered; log it
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    meaning: str


_S, _W, _R, _P = Outcome.SUCCESS, Outcome.WARNING, Outcome.RETRY, Outcome.PERMANENT

# PS3.7 Annex C (general) and PS3.4 B.2.3 (storage) statuses with a single code.
_STATUS: dict[int, tuple[Outcome, str]] = {
    0x0000: (_S, "success"),
    0x0001: (_W, "requested optional attributes are not supported"),
    0x0107: (_W, "attribute list error"),
    0x0116: (_W, "attribute value out of range"),
    0x0111: (_W, "duplicate SOP instance: the PACS already has it"),
    0x0105: (_P, "no such attribute"),
    0x0106: (_P, "invalid attribute value"),
    0x0110: (_R, "processing failure"),
    0x0112: (_P, "no such SOP instance"),
    0x0113: (_P, "no such event type"),
    0x0114: (_P, "no such argument"),
    0x0115: (_P, "invalid argument value"),
    0x0117: (_P, "invalid SOP instance"),
    0x0118: (_P, "no such SOP class"),
    0x0119: (_P, "class-instance conflict"),
    0x0120: (_P, "missing attribute"),
    0x0121: (_P, "missing attribute value"),
    0x0122: (_P, "SOP class not supported"),
    0x0123: (_P, "no such action"),
    0x0124: (_P, "not authorized"),
    0x0210: (_R, "duplicate invocation"),
    0x0211: (_P, "unrecognized operation"),
    0x0212: (_P, "mistyped argument"),
    0x0213: (_R, "resource limitation"),
    0xB000: (_W, "coercion of data elements"),
    0xB006: (_W, "elements discarded"),
    0xB007: (_W, "data set does not match SOP class"),
    0xFE00: (_R, "cancelled"),
    0xFF00: (_R, "pending (not a valid final status)"),
    0xFF01: (_R, "pending (not a valid final status)"),
}

# Ranges: (low, high, outcome, meaning). Single codes above win.
_RANGES: tuple[tuple[int, int, Outcome, str], ...] = (
    (0xA700, 0xA7FF, _R, "out of resources"),
    (0xA900, 0xA9FF, _P, "data set does not match SOP class"),
    (0xC000, 0xCFFF, _P, "cannot understand"),
    (0xB000, 0xBFFF, _W, "warning"),
)


def classify_status(status: int | None) -> Verdict:
    """The decision for a DIMSE response status; None means no (valid) response."""
    if status is None:
        return Verdict(_R, "no response")
    if status in _STATUS:
        outcome, meaning = _STATUS[status]
        return Verdict(outcome, meaning)
    for low, high, outcome, meaning in _RANGES:
        if low <= status <= high:
            return Verdict(outcome, meaning)
    return Verdict(_R, "unknown status")


# Storage Commitment Failure Reason (0008,1197), PS3.3 C.14.1.1 / PS3.4 J.3.
COMMITMENT_FAILURES: Mapping[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


# --- pure: association rejection and TLS errors ----------------------------------------

_REJECT_REASONS: Mapping[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def classify_rejection(result: int | None, source: int | None, reason: int | None) -> tuple[bool, str]:
    """(permanent, reason text) for an A-ASSOCIATE-RJ (PS3.8 9.3.4).

    Result 2 ("rejected-transient") is retryable. So is anything from the presentation
    layer (source 3: congestion, local limit), whatever its result says: by their nature
    these pass. Everything else the peer calls permanent is permanent.
    """
    text = _REJECT_REASONS.get((source or 0, reason or 0), f"source {source}, reason {reason}")
    permanent = result == 1 and source != 3
    return permanent, text


# OpenSSL reasons meaning "the peer does not accept our certificate" or "we cannot agree".
_CERT_REJECTED = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV1_ALERT_DECRYPT_ERROR": "decrypt error (wrong key for the certificate?)",
}
_NO_AGREEMENT = {
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version",
    "UNSUPPORTED_PROTOCOL": "no common TLS version",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake failure (no common cipher or version?)",
    "NO_SHARED_CIPHER": "no common cipher",
    "NO_CIPHERS_AVAILABLE": "no common cipher",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "insufficient security",
}


def classify_tls_error(exc: BaseException) -> tuple[bool, str]:
    """(permanent, reason text) for an error of our TLS client."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = exc.verify_message or exc.reason or "verification failed"
        return True, f"the PACS's TLS certificate was not accepted: {what}"
    reason = getattr(exc, "reason", None) or ""
    if reason in _CERT_REJECTED:
        return True, ("the PACS rejected this appliance's TLS client certificate "
                      f"({_CERT_REJECTED[reason]}): is tls.cert signed by a CA the PACS trusts?")
    if reason in _NO_AGREEMENT:
        return True, f"TLS handshake with the PACS failed: {_NO_AGREEMENT[reason]}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False, ("the PACS closed the TLS connection during set-up (if this persists: does "
                       "the PACS trust this appliance's certificate, and does it speak TLS on this port?)")
    return False, f"TLS connection to the PACS failed ({reason or type(exc).__name__})"


# --- pure: presentation contexts ------------------------------------------------------

ContextSpec = tuple[str, tuple[str, ...]]  # (abstract syntax, transfer syntaxes)


@dataclass(frozen=True)
class Group:
    """Instances [start, stop) of a bundle and the contexts one association needs for them."""

    start: int
    stop: int
    contexts: tuple[ContextSpec, ...]


def contexts_for(sop_class: str, transfer_syntax: str) -> list[ContextSpec]:
    """The contexts an instance needs: its own syntax alone, so that a peer that takes it
    gets the bytes as they are (even Explicit VR LE: offered only in the pair, a peer that
    prefers Implicit VR would pick that), and the uncompressed pair as the fallback."""
    return [(sop_class, (transfer_syntax,)), (sop_class, UNCOMPRESSED)]


def plan_groups(instances: Sequence[tuple[str, str]], commitment: bool = False,
                limit: int = MAX_CONTEXTS) -> list[Group]:
    """Split a bundle's (sop_class, transfer_syntax) list, in order, into runs whose
    contexts fit one association (`limit`, minus one reserved for Storage Commitment).
    Each group's context list starts with its contexts in first-use order."""
    room = limit - (1 if commitment else 0)
    if room < 2:
        raise ValueError("context limit too small")
    groups: list[Group] = []
    start = 0
    current: dict[ContextSpec, None] = {}
    for i, (sop, ts) in enumerate(instances):
        new = [c for c in contexts_for(sop, ts) if c not in current]
        if len(current) + len(new) > room:
            groups.append(Group(start, i, tuple(current)))
            start, current = i, {}
            new = contexts_for(sop, ts)
        for c in new:
            current[c] = None
    if instances:
        groups.append(Group(start, len(instances), tuple(current)))
    return groups


@dataclass(frozen=True)
class Choice:
    context_id: int
    how: str  # "as-is" | "explicit" | "implicit"
    transfer_syntax: str  # what goes on the wire


def uid_name(uid: str) -> str:
    """A SOP class / transfer syntax as people know it: "CT Image Storage (1.2...)"."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def choose_context(accepted: Mapping[str, Sequence[tuple[int, str]]], sop_class: str,
                   transfer_syntax: str) -> Choice:
    """Which accepted context carries an instance, and how; Permanent if none can.

    `accepted` maps SOP class -> [(context id, accepted transfer syntax)].
    """
    options = accepted.get(sop_class, ())
    if not options:
        raise Permanent(f"the PACS does not accept SOP class {uid_name(sop_class)}")
    for cx, ts in options:
        if ts == transfer_syntax:
            return Choice(cx, "as-is", ts)
    for wanted, how in ((ExplicitVRLittleEndian, "explicit"), (ImplicitVRLittleEndian, "implicit")):
        for cx, ts in options:
            if ts == wanted:
                return Choice(cx, how, ts)
    names = ", ".join(sorted({UID(ts).name for _, ts in options}))
    raise Permanent(f"the PACS accepts SOP class {uid_name(sop_class)} only as {names}, "
                    f"and this appliance cannot convert {UID(transfer_syntax).name} to that")


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})


def dataset_offset(part10: bytes | memoryview) -> int:
    """Where the data set starts in a Part-10 file (after preamble, DICM and group 2)."""
    n = len(part10)
    if n < 132 or bytes(part10[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part-10 file")
    pos = 132
    while pos < n:
        if pos + 8 > n:
            raise ValueError("the file meta information is truncated")
        (group,) = struct.unpack_from("<H", part10, pos)
        if group != 0x0002:
            break
        vr = bytes(part10[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise ValueError("the file meta information is truncated")
            (length,) = struct.unpack_from("<I", part10, pos + 8)
            if length == 0xFFFFFFFF:
                raise ValueError("undefined length in the file meta information")
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", part10, pos + 6)
            pos += 8 + length
    if pos > n:
        raise ValueError("the file meta information is truncated")
    return pos


# --- I/O: sockets that remember why they failed ----------------------------------------


class _Probe:
    """What one association's socket saw: the first connect / TLS error, last activity."""

    def __init__(self) -> None:
        self.connect_error: OSError | None = None
        self.tls_errors: list[ssl.SSLError] = []
        self.activity = time.monotonic()

    def note(self, e: OSError) -> None:
        if isinstance(e, ssl.SSLError):
            self.tls_errors.append(e)
        elif self.connect_error is None:
            self.connect_error = e

    @property
    def tls_error(self) -> ssl.SSLError | None:
        """The most telling TLS error seen: one that says why (a certificate, a version)
        rather than just that the connection closed, which may come first."""
        errors = list(self.tls_errors)
        for e in errors:
            if classify_tls_error(e)[0]:
                return e
        return errors[0] if errors else None


class _TCPSocket(socket.socket):
    probe: _Probe | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as e:
            if self.probe is not None:
                self.probe.note(e)
            raise


class _RecordingSSLSocket(ssl.SSLSocket):
    """Notes TLS errors (handshake, and alerts read later: in TLS 1.3 the server's
    verdict on our certificate arrives with the first read) in the context's probe."""

    def _note(self, e: OSError) -> None:
        probe = getattr(self.context, "probe", None)
        if isinstance(probe, _Probe):
            probe.note(e)

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except OSError as e:
            self._note(e)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - ssl's signature
        try:
            return super().read(len, buffer)
        except ssl.SSLError as e:
            self._note(e)
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except ssl.SSLError as e:
            self._note(e)
            raise


class _ClientContext(ssl.SSLContext):
    sslsocket_class = _RecordingSSLSocket
    probe: _Probe | None = None


class _Socket(AssociationSocket):
    """pynetdicom's socket plus: error capture, TCP_NODELAY, an I/O timeout, activity."""

    def __init__(self, assoc: Any, address: AddressInformation, probe: _Probe,
                 io_timeout: float) -> None:
        self.probe = probe
        self._io_timeout = io_timeout
        super().__init__(assoc, address=address)

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = _TCPSocket(family, socket.SOCK_STREAM)
        sock.probe = self.probe
        sock.bind(address.as_tuple)
        self._is_connected = False
        return sock

    def connect(self, primitive: Any) -> None:
        super().connect(primitive)
        sock = self.socket
        if sock is not None and self._is_connected:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # pynetdicom leaves the connected socket blocking forever: a write to a
                # peer that stopped reading would never return.
                sock.settimeout(self._io_timeout)

    def send(self, bytestream: bytes) -> None:
        super().send(bytestream)
        self.probe.activity = time.monotonic()

    def recv(self, nr_bytes: int) -> bytearray:
        data = super().recv(nr_bytes)
        if data:
            self.probe.activity = time.monotonic()
        return data


class _AE(AE):
    def __init__(self, ae_title: str, io_timeout: float) -> None:
        super().__init__(ae_title=ae_title)
        self._io_timeout = io_timeout

    def _create_socket(self, assoc: Any, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        probe = _Probe()
        if tls_args is not None and isinstance(tls_args[0], _ClientContext):
            tls_args[0].probe = probe  # one association at a time per transport
        sock = _Socket(assoc, address, probe, self._io_timeout)
        sock.tls_args = tls_args
        return sock


def _bounded(fn: Callable[[], object], limit: float) -> bool:
    """Run fn in a helper thread and wait at most `limit` s (pynetdicom's teardown can
    loop forever on a wedged reactor). True if it finished."""
    def run() -> None:
        with contextlib.suppress(Exception):
            fn()
    t = threading.Thread(target=run, name="dicom-teardown", daemon=True)
    t.start()
    t.join(limit)
    return not t.is_alive()


class _Lost(Exception):
    """The association is gone or the peer stopped answering."""


class _Link:
    """One established association and the DIMSE exchanges on it."""

    def __init__(self, assoc: Any, probe: _Probe, timeout_s: float) -> None:
        self.assoc = assoc
        self.probe = probe
        self.timeout = timeout_s
        self._msg_id = 0
        self.accepted: dict[str, list[tuple[int, str]]] = {}
        for cx in assoc.accepted_contexts:
            self.accepted.setdefault(str(cx.abstract_syntax), []).append(
                (int(cx.context_id), str(cx.transfer_syntax[0])))
        self.done = False
        self._pause_reactor()

    def next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def lost_reason(self) -> str | None:
        a = self.assoc
        tls = self.probe.tls_error
        if tls is not None:
            return classify_tls_error(tls)[1]
        if a.acse.is_aborted("a-abort"):
            return "the PACS aborted the association"
        dul = a.dul
        if (dul.state_machine.current_state == "Sta1" or not dul.is_alive()
                or a.acse.is_aborted() or not a.is_established):
            return "the connection to the PACS was lost"
        if a.acse.is_release_requested():
            return "the PACS released the association"
        return None

    def _pause_reactor(self) -> None:
        """Stop the association's own reactor for the life of the link, so that it never
        takes a response of ours off the DIMSE queue. (pynetdicom pauses it per request,
        which leaves a window right after each un-pause in which a fast response is taken
        and dropped as an "unexpected" message.) Nothing is lost: N-EVENT-REPORTs are
        dispatched by the DIMSE provider itself, aborts and releases are watched by
        `lost_reason`, and `release()` / `kill()` restart the reactor."""
        a = self.assoc
        a._reactor_checkpoint.clear()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if a._is_paused:
                time.sleep(0.002)  # still paused: it is really waiting, not passing by
                if a._is_paused:
                    return
            time.sleep(0.0005)

    def request(self, primitive: Any, context_id: int) -> Any:
        """Send a request and wait for its response; raise _Lost on a dead link or after
        `timeout` s without any traffic."""
        if (why := self.lost_reason()) is not None:
            raise _Lost(why)
        self.probe.activity = time.monotonic()
        self.assoc.dimse.send_msg(primitive, context_id)
        msg_id = primitive.MessageID
        while True:
            msg = self._next()
            if msg is None:
                if (why := self.lost_reason()) is not None:
                    raise _Lost(why)
                if time.monotonic() - self.probe.activity > self.timeout:
                    raise _Lost(f"no answer from the PACS within {self.timeout:g} s")
                continue
            if getattr(msg, "MessageIDBeingRespondedTo", None) == msg_id:
                return msg

    def wait(self, until: float, done: threading.Event) -> bool:
        """Wait for `done` (set by a report handler) until `until`, watching the link;
        False if the link was lost meanwhile."""
        while not done.wait(_POLL_S):
            if time.monotonic() >= until:
                return True
            if self.lost_reason() is not None:
                return False
        return True

    def _next(self) -> Any:
        """The next response on the queue; None if nothing came within one poll interval.
        (Requests from the peer do not come here: pynetdicom dispatches N-EVENT-REPORT
        itself, and a storage SCU is offered nothing else.)"""
        try:
            _, msg = self.assoc.dimse.msg_queue.get(timeout=_POLL_S)
        except queue.Empty:
            return None
        if msg is None or getattr(msg, "MessageIDBeingRespondedTo", None) is None:
            return None
        return msg

    # teardown

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        if self.lost_reason() is not None:
            self._kill()
            return
        a = self.assoc
        if not a._reactor_checkpoint.is_set():
            # The reactor is still waiting at our pause, but pynetdicom's handling of an
            # N-EVENT-REPORT (in a thread of its own) ends with `_is_paused = False`, and
            # release() would then wait for a pause that never comes.
            a._is_paused = True
        if not _bounded(a.release, self.timeout + 5):
            log.warning("dicom.release_stuck")

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.lost_reason() is not None:
            self._kill()
            return
        self._drop_pending()
        if not _bounded(self.assoc.abort, 10):
            log.warning("dicom.abort_stuck")

    def kill(self) -> None:
        if self.done:
            return
        self.done = True
        self._kill()

    def _kill(self) -> None:
        a = self.assoc
        sock = getattr(a.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2
        while a.dul.is_alive() and a.dul.state_machine.current_state != "Sta1" \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drop_pending()
        if not _bounded(a.kill, 5):
            log.warning("dicom.kill_stuck")
        _close_socket(a)

    def _drop_pending(self) -> None:
        # PDUs of an instance still queued for a dead socket would make the DUL replay
        # them into a closed state machine.
        q = self.assoc.dul.to_provider_queue
        with q.mutex:
            q.queue.clear()


# --- Storage Commitment ----------------------------------------------------------------


class _Waiter:
    def __init__(self, expected: Mapping[str, tuple[int, str]]) -> None:
        self.expected = dict(expected)  # SOP Instance UID -> (index, SOP class)
        self.committed: set[str] = set()
        self.failed: dict[str, int] = {}  # UID -> failure reason
        self.event = threading.Event()
        self.lock = threading.Lock()

    def add(self, ds: Dataset) -> None:
        with self.lock:
            for item in ds.get("ReferencedSOPSequence", None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", ""))
                if uid in self.expected:
                    if str(item.get("ReferencedSOPClassUID", "")) == self.expected[uid][1]:
                        self.committed.add(uid)
                        self.failed.pop(uid, None)
                    else:
                        self.failed[uid] = 0x0119
            for item in ds.get("FailedSOPSequence", None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", ""))
                if uid in self.expected and uid not in self.committed:
                    self.failed[uid] = int(item.get("FailureReason", 0x0110) or 0x0110)
            if set(self.expected) <= self.committed | set(self.failed):
                self.event.set()


class _Commitments:
    """Bundles waiting for a storage commitment report, by Transaction UID."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, _Waiter] = {}

    def expect(self, transaction_uid: str, expected: Mapping[str, tuple[int, str]]) -> _Waiter:
        w = _Waiter(expected)
        with self._lock:
            self._waiters[transaction_uid] = w
        return w

    def forget(self, transaction_uid: str) -> None:
        with self._lock:
            self._waiters.pop(transaction_uid, None)

    def deliver(self, ds: Dataset) -> bool:
        with self._lock:
            w = self._waiters.get(str(ds.get("TransactionUID", "")))
        if w is None:
            return False
        w.add(ds)
        return True


class _CommitmentListener:
    """A tiny SCP that only takes Storage Commitment N-EVENT-REPORTs from the PACS."""

    def __init__(self, ae_title: str, bind: str, port: int, commitments: _Commitments,
                 timeout_s: float, ssl_context: ssl.SSLContext | None, destination: str) -> None:
        self.commitments = commitments
        self.destination = destination
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, list(UNCOMPRESSED),
                                 scu_role=False, scp_role=True)
        ae.acse_timeout = timeout_s
        ae.dimse_timeout = timeout_s
        ae.network_timeout = timeout_s
        ae.maximum_associations = 4
        self.ae = ae
        server = ae.start_server(
            (bind, port), block=False, ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report),
                          (evt.EVT_CONN_OPEN, _nodelay)])
        assert server is not None  # non-blocking start_server returns the server
        self.server = server

    def _on_report(self, event: Any) -> tuple[int, None]:
        return _handle_report(event, self.commitments, self.destination, "listener")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()


def _handle_report(event: Any, commitments: _Commitments, destination: str,
                   via: str) -> tuple[int, None]:
    """An N-EVENT-REPORT (EVT_N_EVENT_REPORT handler): hand a storage commitment result
    to the bundle waiting for its Transaction UID. Unknown transactions (a late report for
    an attempt that gave up) are acknowledged and ignored."""
    req = event.request
    if req.AffectedSOPClassUID != STORAGE_COMMITMENT_PUSH:
        return 0x0118, None  # no such SOP class
    if req.EventTypeID not in (1, 2):
        return 0x0113, None  # no such event type
    try:
        ds = event.event_information
    except Exception:
        return 0x0110, None
    matched = commitments.deliver(ds)
    log.info("dicom.commitment_report", destination=destination, via=via, matched=matched,
             event_type=int(req.EventTypeID))
    return 0x0000, None


def _close_socket(assoc: Any) -> None:
    """Close what pynetdicom leaves open after a failed negotiation or a lost peer."""
    holder = getattr(assoc.dul, "socket", None)
    sock = getattr(holder, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _nodelay(event: Any) -> None:
    with contextlib.suppress(Exception):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- the transport ----------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class _Sent:
    count: int = 0
    bytes: int = 0
    converted: dict[str, int] = field(default_factory=dict)  # "from -> to" -> count


class DicomTransport:
    """C-STORE SCU to one PACS. See the module documentation for every decision.

    `dest` is the [[destinations]] entry (transport "dicom"); `private_key` opens the
    bundles (the appliance's own key, a recipient of every bundle). Optional:
    `local_ae_title` is the calling AE title when the destination sets none (the daemon
    should pass receive.ae_title); `commitment_port` / `commitment_bind` make the
    transport listen for storage commitment reports sent on a new association.
    """

    def __init__(self, dest: Destination, private_key: PrivateKey, *,
                 local_ae_title: str = "EDGE", commitment_port: int | None = None,
                 commitment_bind: str | None = None) -> None:
        if dest.host is None or dest.port is None or dest.ae_title is None:
            raise ConfigError([f"destination {dest.name}: host, port and ae_title are required"])
        self.name = dest.name
        self.dest = dest
        self.private_key = private_key
        self.calling_ae = dest.calling_ae_title or local_ae_title
        self.timeout = float(dest.timeout_s)
        self.commitment_port = commitment_port if commitment_port is not None else dest.commitment_port
        self.commitment_bind = commitment_bind if commitment_bind is not None else dest.commitment_bind
        self.commitment_timeout = float(dest.commitment_timeout_s)
        self._commitments = _Commitments()
        self._listener: _CommitmentListener | None = None
        self._listener_lock = threading.Lock()
        self._check_hostname = not _is_ip(dest.host)
        ae = _AE(self.calling_ae, self.timeout)
        ae.acse_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = None  # we watch progress ourselves (see module doc)
        self._ae = ae
        if dest.tls is None:
            if not dest.plaintext:
                raise ConfigError([f"destination {dest.name}: tls is required unless plaintext = true"])
            log.warning("dicom.plaintext", destination=dest.name,
                        detail="DICOM to this destination is not encrypted (plaintext = true)")
        else:
            try:
                self._client_context()
            except Retryable as e:
                raise ConfigError([f"destination {dest.name}: {e}"]) from None

    # --- TLS ---

    def _client_context(self) -> _ClientContext | None:
        tls = self.dest.tls
        if tls is None:
            return None
        ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = self._check_hostname
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as e:
            raise Retryable(f"cannot load the TLS client certificate {tls.cert} / key {tls.key}: "
                            f"{_err_text(e)}") from None
        try:
            ctx.load_verify_locations(cafile=str(tls.ca))
        except (OSError, ssl.SSLError) as e:
            raise Retryable(f"cannot load the TLS CA file {tls.ca}: {_err_text(e)}") from None
        return ctx

    def _server_context(self) -> ssl.SSLContext | None:
        tls = self.dest.tls
        if tls is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls.cert, tls.key)
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # --- Transport interface ---

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None]) -> None:
        try:
            f = bundle.open("rb")
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue") from None
        except OSError as e:
            raise Retryable(f"cannot read the bundle: {_err_text(e)}") from None
        with f:
            try:
                entries = read_manifest(f, self.private_key).instances
                f.seek(0)
            except IntegrityError as e:
                raise Permanent(f"bundle does not verify: {e}") from None
            if not entries:
                return
            commitment = self.dest.storage_commitment
            groups = plan_groups([(e.sop_class, e.transfer_syntax) for e in entries], commitment,
                                 limit=MAX_CONTEXTS)
            tls_ctx = self._client_context()
            instances = iter_instances(f, self.private_key)
            sent = _Sent()
            t0 = time.monotonic()
            try:
                for gi, group in enumerate(groups):
                    last = gi == len(groups) - 1
                    self._send_group(item_id, group, entries, instances, tls_ctx, sent, progress,
                                     commit_all=entries if (commitment and last) else None)
            except IntegrityError as e:
                raise Permanent(f"bundle does not verify: {e}") from None
        log.info("dicom.sent", destination=self.name, bundle=item_id, instances=sent.count,
                 bytes=sent.bytes, associations=len(groups), committed=commitment,
                 converted=sent.converted or None, seconds=round(time.monotonic() - t0, 3))

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    # --- one association ---

    def _send_group(self, item_id: str, group: Group, entries: Sequence[ManifestEntry],
                    instances: Iterable[tuple[ManifestEntry, bytes]], tls_ctx: _ClientContext | None,
                    sent: _Sent, progress: Callable[[int], None],
                    commit_all: Sequence[ManifestEntry] | None) -> None:
        specs = list(group.contexts)
        if commit_all is not None:
            specs.append((STORAGE_COMMITMENT_PUSH, UNCOMPRESSED))
        link = self._associate(specs, tls_ctx)
        where = ""
        try:
            mine = entries[group.start : group.stop]
            choices = [choose_context(link.accepted, e.sop_class, e.transfer_syntax) for e in mine]
            it = iter(instances)
            for entry, choice in zip(mine, choices, strict=True):
                where = f" while sending instance {entry.index} of {len(entries)}"
                got, data = next(it)
                if got.index != entry.index:
                    raise IntegrityError("bundle changed while it was being read")
                payload = self._payload(entry, data, choice, sent)
                self._store(link, item_id, entry, payload, choice.context_id)
                sent.count += 1
                sent.bytes += entry.size
                progress(sent.bytes)
            if commit_all is not None:
                where = " during storage commitment"
                self._commit(link, item_id, commit_all)
        except _Lost as e:
            link.kill()
            raise Retryable(f"{e}{where}") from None
        except (Retryable, Permanent):
            link.release()
            raise
        except BaseException:
            link.abort()
            raise
        link.release()

    def _associate(self, specs: Sequence[ContextSpec], tls_ctx: _ClientContext | None) -> _Link:
        host, port = self.dest.host, self.dest.port
        assert host is not None and port is not None and self.dest.ae_title is not None
        contexts = [build_context(abstract, list(ts)) for abstract, ts in specs]
        tls_args: Any = None
        if tls_ctx is not None:
            # pynetdicom passes the name on as wrap_socket(server_hostname=...): None is fine.
            tls_args = (tls_ctx, host if self._check_hostname else None)
        try:
            assoc = self._ae.associate(
                host, port, contexts=contexts, ae_title=self.dest.ae_title, tls_args=tls_args,
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._same_association_report)])
        except socket.gaierror:
            raise Retryable(f"cannot resolve the PACS host name {host!r}") from None
        except OSError as e:
            raise Retryable(f"cannot connect to the PACS at {host}:{port}: {_err_text(e)}") from None
        sock = assoc.dul.socket
        probe = sock.probe if isinstance(sock, _Socket) else _Probe()
        if assoc.is_established:
            link = _Link(assoc, probe, self.timeout)
            if (why := link.lost_reason()) is not None:  # TLS 1.3: alert after "success"
                link.kill()
                raise self._failure_from_probe(probe) or Retryable(why)
            return link
        with contextlib.suppress(Exception):
            if assoc.is_alive() or assoc.dul.is_alive():
                _bounded(assoc.kill, 5)
        _close_socket(assoc)
        raise self._failure_from_probe(probe) or self._negotiation_failure(assoc, specs)

    def _failure_from_probe(self, probe: _Probe) -> Retryable | Permanent | None:
        host, port = self.dest.host, self.dest.port
        if probe.tls_error is not None:
            permanent, text = classify_tls_error(probe.tls_error)
            return Permanent(text) if permanent else Retryable(text)
        e = probe.connect_error
        if e is None:
            return None
        if isinstance(e, TimeoutError | socket.timeout):
            return Retryable(f"connecting to the PACS at {host}:{port} timed out after {self.timeout:g} s")
        if isinstance(e, ConnectionRefusedError):
            return Retryable(f"the PACS at {host}:{port} refused the connection "
                             "(not running, or not listening on this port?)")
        return Retryable(f"cannot connect to the PACS at {host}:{port}: {_err_text(e)}")

    def _negotiation_failure(self, assoc: Any, specs: Sequence[ContextSpec]) -> Exception:
        prim = assoc.acceptor.primitive
        if assoc.is_rejected and prim is not None:
            permanent, text = classify_rejection(prim.result, prim.result_source, prim.diagnostic)
            hint = ""
            if "calling AE" in text:
                hint = f" (this appliance calls as {self.calling_ae!r}: is it declared on the PACS?)"
            elif "called AE" in text:
                hint = f" (ae_title is {self.dest.ae_title!r}: is that the PACS's AE title?)"
            if permanent:
                return Permanent(f"the PACS rejected the association permanently: {text}{hint}")
            return Retryable(f"the PACS rejected the association for now: {text}{hint}")
        if assoc.is_aborted and prim is not None and prim.result == 0x00:
            classes = sorted({uid_name(a) for a, _ in specs if a != STORAGE_COMMITMENT_PUSH})
            return Permanent("the PACS accepted none of the proposed presentation contexts: "
                             f"it does not accept SOP class {', '.join(classes)}")
        if assoc.is_aborted:
            return Retryable("the PACS aborted the association request")
        return Retryable(f"no answer from the PACS to the association request within {self.timeout:g} s")

    # --- instances ---

    def _payload(self, entry: ManifestEntry, data: bytes, choice: Choice, sent: _Sent) -> bytes:
        """The data set bytes to send (Part-10 header removed), converted if the peer
        needs another transfer syntax."""
        if choice.how != "as-is":
            src = UID(entry.transfer_syntax).name
            try:
                data = codec.decompress(data) if entry.transfer_syntax != ExplicitVRLittleEndian else data
            except codec.CodecError as e:
                raise Permanent(f"instance {entry.index}: the PACS does not accept {src} for "
                                f"{UID(entry.sop_class).name}, and it cannot be decompressed ({e})") from None
            key = f"{src} -> {UID(choice.transfer_syntax).name}"
            sent.converted[key] = sent.converted.get(key, 0) + 1
        try:
            start = dataset_offset(data)
        except ValueError as e:
            raise Permanent(f"instance {entry.index}: {e}") from None
        if choice.how == "implicit":
            return _to_implicit(data, entry.index)
        return data[start:]

    def _store(self, link: _Link, item_id: str, entry: ManifestEntry, payload: bytes,
               context_id: int) -> None:
        req = C_STORE()
        req.MessageID = link.next_id()
        req.Priority = 2
        try:
            req.AffectedSOPClassUID = entry.sop_class
            req.AffectedSOPInstanceUID = entry.sop_instance_uid
        except ValueError:
            raise Permanent(f"instance {entry.index} has an invalid SOP class or instance UID") from None
        req.DataSet = BytesIO(payload)
        rsp = link.request(req, context_id)
        status = rsp.Status if rsp.is_valid_response else None
        verdict = classify_status(status)
        if verdict.outcome is Outcome.SUCCESS:
            return
        code = "no valid response" if status is None else f"0x{status:04X}"
        if verdict.outcome is Outcome.WARNING:
            log.warning("dicom.store_warning", destination=self.name, bundle=item_id,
                        instance=entry.index, status=code, meaning=verdict.meaning)
            return
        text = (f"the PACS answered {code} ({verdict.meaning}) to instance {entry.index} "
                f"({UID(entry.sop_class).name})")
        if verdict.outcome is Outcome.PERMANENT:
            raise Permanent(text)
        raise Retryable(text)

    # --- storage commitment ---

    def _ensure_listener(self) -> bool:
        if self.commitment_port is None:
            return False
        with self._listener_lock:
            if self._listener is None:
                try:
                    self._listener = _CommitmentListener(
                        self.calling_ae, self.commitment_bind, self.commitment_port,
                        self._commitments, self.timeout, self._server_context(), self.name)
                except (OSError, ssl.SSLError) as e:
                    where = f"{self.commitment_bind}:{self.commitment_port}"
                    raise Retryable(f"cannot listen for storage commitment reports on {where}: "
                                    f"{_err_text(e)}") from None
            return True

    def _commit(self, link: _Link, item_id: str, entries: Sequence[ManifestEntry]) -> None:
        listening = self._ensure_listener()
        options = link.accepted.get(STORAGE_COMMITMENT_PUSH)
        if not options:
            raise Permanent("the PACS does not accept Storage Commitment Push Model "
                            "(turn storage_commitment off for this destination?)")
        cx_id, ts = options[0]
        tuid = generate_uid(prefix=None)  # 2.25.<random 128-bit>: the report's authenticator
        expected = {e.sop_instance_uid: (e.index, e.sop_class) for e in entries}
        waiter = self._commitments.expect(tuid, expected)
        try:
            ds = Dataset()
            ds.TransactionUID = tuid
            refs = []
            for e in entries:
                item = Dataset()
                item.ReferencedSOPClassUID = e.sop_class
                item.ReferencedSOPInstanceUID = e.sop_instance_uid
                refs.append(item)
            ds.ReferencedSOPSequence = refs
            syntax = UID(ts)
            req = N_ACTION()
            req.MessageID = link.next_id()
            req.RequestedSOPClassUID = STORAGE_COMMITMENT_PUSH
            req.RequestedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
            req.ActionTypeID = 1
            req.ActionInformation = BytesIO(encode(ds, syntax.is_implicit_VR, syntax.is_little_endian,
                                                   syntax.is_deflated) or b"")
            t0 = time.monotonic()
            try:
                rsp = link.request(req, cx_id)
            except _Lost as e:
                # Orthanc, for one, aborts an N-ACTION from an AE title it does not know.
                raise _Lost(f"{e} (does the PACS know this appliance's AE title "
                            f"{self.calling_ae!r} and allow it storage commitment?)") from None
            status = rsp.Status if rsp.is_valid_response else None
            verdict = classify_status(status)
            if verdict.outcome not in (Outcome.SUCCESS, Outcome.WARNING):
                code = "no valid response" if status is None else f"0x{status:04X}"
                text = f"the PACS answered {code} ({verdict.meaning}) to the storage commitment request"
                raise Permanent(text) if verdict.outcome is Outcome.PERMANENT else Retryable(text)
            deadline = t0 + self.commitment_timeout
            grace = min(deadline, time.monotonic() + REPORT_GRACE_S) if listening else deadline
            alive = link.wait(grace, waiter.event)
            if not waiter.event.is_set():
                if not listening and not alive:
                    raise _Lost("the connection to the PACS was lost before its storage commitment report")
                if listening:
                    link.release()
                    waiter.event.wait(max(0.0, deadline - time.monotonic()))
            self._judge(item_id, waiter, len(entries), listening)
        finally:
            self._commitments.forget(tuid)

    def _judge(self, item_id: str, waiter: _Waiter, n: int, listening: bool) -> None:
        with waiter.lock:
            complete = waiter.event.is_set()
            failed = dict(waiter.failed)
            committed = len(waiter.committed)
        if not complete:
            where = (f"on port {self.commitment_port} or on the association" if listening
                     else "on the association (no commitment_port is set, and the PACS may "
                          "send its report on a new association)")
            raise Retryable(f"no complete storage commitment report within {self.commitment_timeout:g} s: "
                            f"{committed} of {n} instances confirmed; waited {where}")
        if failed:
            detail = ", ".join(
                f"instance {waiter.expected[uid][0]}: "
                f"{COMMITMENT_FAILURES.get(reason, f'reason 0x{reason:04X}')}"
                for uid, reason in sorted(failed.items(), key=lambda kv: waiter.expected[kv[0]][0])[:5])
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise Retryable(f"the PACS did not commit {len(failed)} of {n} instances ({detail}{more}); "
                            "the bundle will be sent again")
        log.info("dicom.committed", destination=self.name, bundle=item_id, instances=n)

    def _same_association_report(self, event: Any) -> tuple[int, None]:
        # pynetdicom dispatches an N-EVENT-REPORT on our association in a thread of its
        # own, whether or not we are waiting for a response.
        return _handle_report(event, self._commitments, self.name, "association")


def _to_implicit(part10_explicit: bytes, index: int) -> bytes:
    """Re-encode an Explicit VR LE instance as Implicit VR LE (for a peer that takes
    nothing else). pydicom re-encodes the elements; values do not change."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(BytesIO(part10_explicit), force=True)
            out = encode(ds, True, True)
        except Exception as e:
            raise Permanent(f"instance {index}: cannot be re-encoded as Implicit VR Little Endian "
                            f"({type(e).__name__})") from None
    if out is None:
        raise Permanent(f"instance {index}: cannot be re-encoded as Implicit VR Little Endian")
    return out


def _err_text(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__

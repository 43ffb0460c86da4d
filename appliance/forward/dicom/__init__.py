"""The `dicom` transport: C-STORE SCU to a PACS over DICOM TLS, with optional Storage Commitment.

Modules: `status` (the pure status / rejection tables), `contexts` (pure: presentation
contexts, association groups, Part-10 offsets), `tls` (TLS contexts, error
classification, sockets that record failures), `link` (one association: requests,
responses, streamed C-STOREs, teardown), `commitment` (Storage Commitment waiters and listener),
`transport` (`DicomTransport`, put together from `association`: opening one and why it
did not open, `committing`: the storage commitment request and its report, and
`instances`: one instance's request, data set and context). This docstring holds the
decisions for all of them.

One `send` delivers one bundle: the bundle is verified in a first pass, then decrypted
again instance by instance (`bundle.VerifiedBundle`; no plaintext on disk; large instances
streamed, see below), and its instances are sent over one association (several when a
bundle needs more than pynetdicom's 128 presentation contexts; see `plan_groups`). The
transport raises `Retryable` or `Permanent` (appliance.forward) with a reason for the
operator; reasons and log lines name instances by their index in the bundle and SOP
classes by name, never by UID or any other patient data.

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
  UID and changes only what the syntax dictates; for a large instance its streaming
  counterpart, below) when the uncompressed context was accepted with Explicit VR LE;
* else (a peer that only takes Implicit VR LE) decompressed and re-encoded Implicit VR LE.

Every conversion runs in a conversion worker process (`forward.conversion`), never in
the daemon: the decoders run on data a scanner sent. Its output is capped at
`receive.max_instance_mb` (checked before decoding), its time and memory are limited,
and a worker that crashes, hangs or balloons is killed: that instance is Permanent
("cannot be converted for this PACS: ..."), the daemon goes on.

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
upload.

A silent link (a cut line: nothing refused, nothing acknowledged) is noticed sooner:
after `link_timeout_s` (at most `timeout_s`) without an acknowledgement while data is in
flight, or without an answer to the keep-alives sent every second while waiting
(forward/netlink.py: watch_link, link_silent, read from TCP_INFO at each poll). A PACS that keeps
its window shut (slow to read) still answers the window probes: that is `timeout_s`'s
call, so TCP_USER_TIMEOUT (which would end it too) is not used. A silent link is the
destination's failure, never the instance's being sent.
The TCP connect is bounded by `link_timeout_s` as well (the SYN is answered by the
PACS's machine); the TLS handshake after it keeps `timeout_s` (dicom/tls.py: Probe.bounded_connect).

Sockets have TCP_NODELAY (DIMSE writes a small command PDU before the data; without it
Nagle + delayed ACK stall each C-STORE ~40 ms).

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
  the transport runs a small SCP (`commitment_port` on `commitment_bind`, started at the
  first commitment, TLS with client certificates verified against `tls.ca` unless
  plaintext) that accepts only the Push Model and matches reports to waiting bundles by
  Transaction UID (random, 128 bits: the report's authenticator, together with TLS when
  enabled; the calling AE title is not checked, PACS often report under another AE
  title). It sits behind the receive ports' gate (core.listener): only the addresses
  `host` resolves to when the listener starts may connect (others are closed at accept),
  at most 4 connections, `timeout_s` from accept to a complete association request and
  per PDU, no PDU longer than announced. Reports for unknown
  transactions (a late report for an attempt that already gave up) are acknowledged and
  ignored. While such a listener exists we keep the association open for up to 2 s for a
  same-association report, then release it and keep waiting on the listener.

Large instances
---------------
An instance of at least `transport.STREAM_THRESHOLD` bytes (64 MiB) that the PACS takes in
its own transfer syntax is never held whole in memory: `Link.store_streamed` reads its
data set from the bundle's `InstanceStream` as it goes out, and queues P-DATA for the
DUL thread with at most `link.IN_FLIGHT_BYTES` (4 MiB) waiting, so memory stays at a few
MiB whatever the instance size. The C-STORE command set is pynetdicom's own encoding
(`C_STORE_RQ.primitive_to_message`/`encode_msg` without a data set, Command Data Set Type
set to "present"); the data set fragments are cut and flagged as pynetdicom cuts them
(peer's maximum PDU length minus 6, at most 256 KiB).
The stream proves the instance whole only at its end (size and SHA-256 against the
verified manifest), so the last fragment of the data set is queued only after the stream
reported that end. If the bundle changed after the first pass, the stream raises
`IntegrityError` first: the association is aborted with the message unfinished (the PACS
drops what it got), and the send is `Unreadable` ("bundle does not verify"), so the
scheduler moves the bundle to quarantine.

A large instance in an encapsulated (compressed) syntax that the PACS refuses, sent
decompressed to Explicit VR LE, is streamed too: `stream_convert` decodes it frame by frame
as it goes out (the first frame before the header, whose Photometric Interpretation etc.
depend on it), producing byte for byte the data set `codec.decompress` would, in a chunk
and a frame or two of memory. Its frames must be found from the fragments while reading
forward (an offset table with one entry per frame, one fragment per frame, or a single
frame). What it cannot take, found out before the first byte is sent (an offset table
with another number of entries, a header out of order...), goes the whole way below, and
the log says so (`dicom.convert_whole`). What turns out wrong midway (a frame that does
not decode or decodes to another size, more or fewer fragments than frames without an
offset table) aborts the association, so the PACS drops the partial instance, and the
send is `Permanent` ("instance N: cannot be converted for this PACS: ..."). Counted in
`converted` of the `dicom.sent` log line like any conversion.

Smaller instances, a large one that must be re-encoded Implicit VR LE (the PACS takes no
Explicit VR LE) or that comes deflated, and the conversions that cannot stream, are read
whole (verified before a byte is sent); the conversions among them cost a few times the
instance's size in the conversion worker (`codec.decompress` and pydicom's writer work on
whole instances), and what comes out is sent with pynetdicom's `send_msg` when it is
under `STREAM_THRESHOLD`, else streamed on as the worker hands it over.

Progress: `progress(n)` after each instance, n = the sum of the bundle (manifest) sizes of
the instances sent so far; during a streamed instance also every ~4 MiB queued, adding
the data set bytes of that instance queued so far (for a streamed conversion: the bundle
bytes of the instance read so far).

The association's own reactor is paused for as long as we use the association (from
establishment to release): pynetdicom pauses it per request, which leaves a window after
each un-pause in which a fast response is taken off the queue and dropped.

This module relies on pynetdicom internals (pinned <3.1 in pyproject.toml). The private
ones are used through `core.pynetdicom_compat` (`AE._create_socket`,
`AssociationSocket._create_socket`, the association's reactor pause); besides those,
`DIMSEServiceProvider.send_msg`/`msg_queue`/
`maximum_pdu_size`, the DUL's `state_machine`/`to_provider_queue` (a `queue.Queue` that
DT-1 takes PDUs from), and `C_STORE_RQ.primitive_to_message`/`encode_msg` (streaming).
Check them when upgrading; tests/test_forward_dicom_stream.py fails if the streamed
P-DATA stop matching what pynetdicom itself sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.forward.dicom.contexts import (
    MAX_CONTEXTS,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    UNCOMPRESSED,
    Choice,
    ContextSpec,
    Group,
    choose_context,
    contexts_for,
    dataset_offset,
    plan_groups,
    uid_name,
)
from appliance.forward.dicom.status import (
    COMMITMENT_FAILURES,
    Outcome,
    Verdict,
    classify_rejection,
    classify_status,
)
from appliance.forward.dicom.tls import classify_tls_error
from appliance.forward.dicom.transport import DicomTransport

if TYPE_CHECKING:
    from appliance.core.config import Destination
    from appliance.forward.registry import Context


def build(dest: Destination, context: Context) -> DicomTransport:
    """The registry's factory (`forward.registry`)."""
    return DicomTransport(dest, context.key, local_ae_title=context.local_ae_title,
                          max_instance_bytes=context.max_instance_bytes)


__all__ = [
    "COMMITMENT_FAILURES",
    "MAX_CONTEXTS",
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH",
    "UNCOMPRESSED",
    "Choice",
    "ContextSpec",
    "DicomTransport",
    "Group",
    "Outcome",
    "Verdict",
    "choose_context",
    "classify_rejection",
    "classify_status",
    "classify_tls_error",
    "contexts_for",
    "dataset_offset",
    "build",
    "plan_groups",
    "uid_name",
]

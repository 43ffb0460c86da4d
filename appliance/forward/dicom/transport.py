"""The transport itself: `DicomTransport.send` and what one association does.
See the package docstring for every decision.

`DicomTransport` is put together from three modules beside this one: `association`
(`Requester`: opening an association, and why it did not open), `committing`
(`Committer`: the storage commitment request and its report) and `instances` (one
instance's C-STORE request, its data set read past the meta, the context it goes in).
This module keeps `send`, the batches and groups of one bundle, storing each instance
(as is, streamed or converted), and re-exports the names others import from the three.
"""

from __future__ import annotations

import functools
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import structlog
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
)
from pynetdicom.dimse_primitives import C_ECHO

from appliance.bundle.format import InstanceStream, ManifestEntry, PrivateKey, VerifiedBundle
from appliance.core.config import Destination, Receive
from appliance.core.errors import ConfigError, IntegrityError
from appliance.forward import Answer, Permanent, Plan, Retryable, Unreadable, bandwidth, conversion
from appliance.forward.dicom.association import NoContextAccepted, Requester
from appliance.forward.dicom.commitment import (
    CommitmentListener,
    Commitments,
)
from appliance.forward.dicom.committing import Committer
from appliance.forward.dicom.contexts import (
    MAX_CONTEXTS,
    STORAGE_COMMITMENT_PUSH,
    UNCOMPRESSED,
    VERIFICATION,
    Choice,
    Group,
    dataset_offset,
    plan_groups,
)
from appliance.forward.dicom.instances import (
    MAX_META,
    META_READ,
    _choices,
    _count_conversion,
    _DataSet,
    _progress_from,
    _read_past_meta,
    _Sent,
    _store_request,
    _unconvertible,
)
from appliance.forward.dicom.link import Link, Lost
from appliance.forward.dicom.status import Outcome, classify_status
from appliance.forward.dicom.tls import (
    ClientContext,
    ProbedAE,
    client_context,
    err_text,
    is_ip,
    server_context,
)
from appliance.pack import codec

__all__ = ["MAX_CONTEXTS", "MAX_META", "META_READ", "STREAM_THRESHOLD", "DicomTransport",
           "NoContextAccepted"]

log = structlog.get_logger("appliance.forward.dicom")

# An instance of at least this many bytes (its size in the bundle) that the PACS takes in
# its own transfer syntax is streamed from the bundle to the association, never held
# whole in memory (see "Large instances" in the package docstring); one it must
# decompress for the PACS is decompressed frame by frame as it is sent (stream_convert).
# Smaller ones, and the conversions that cannot stream, are read whole and sent with
# pynetdicom's own send_msg.
STREAM_THRESHOLD = 64 << 20

# --- the transport ----------------------------------------------------------------------


class DicomTransport(Requester, Committer):
    """C-STORE SCU to one PACS. See the module documentation for every decision.

    `dest` is the [[destinations]] entry (transport "dicom"); `private_key` opens the
    bundles (the appliance's own key, a recipient of every bundle). Optional:
    `local_ae_title` is the calling AE title when the destination sets none (the daemon
    should pass receive.ae_title); `commitment_port` / `commitment_bind` make the
    transport listen for storage commitment reports sent on a new association.
    """

    def __init__(self, dest: Destination, private_key: PrivateKey, *,
                 local_ae_title: str = "EDGE", commitment_port: int | None = None,
                 commitment_bind: str | None = None,
                 max_instance_bytes: int = Receive.max_instance_mb << 20,
                 converter: conversion.Converter | None = None) -> None:
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
        self._commitments = Commitments()
        self.max_output = max_instance_bytes  # most bytes a conversion may give
        self._converter = converter
        self._converter_lock = threading.Lock()
        self._listener: CommitmentListener | None = None
        self._listener_lock = threading.Lock()
        self._check_hostname = not is_ip(dest.host)
        self.cap = bandwidth.for_destination(dest)  # shared by every lane sending here
        self.link_timeout = min(float(dest.link_timeout_s), self.timeout)
        ae = ProbedAE(self.calling_ae, self.timeout, self.cap, self.link_timeout)
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

    def _client_context(self) -> ClientContext | None:
        return None if self.dest.tls is None else client_context(self.dest.tls, self._check_hostname)

    def _server_context(self) -> ssl.SSLContext | None:
        return None if self.dest.tls is None else server_context(self.dest.tls)

    # --- Transport interface ---

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None],
             plan: Plan | None = None) -> None:
        plan = plan or Plan()
        try:
            f = bundle.open("rb")
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue", bundle=True) from None
        except OSError as e:
            raise Retryable(f"cannot read the bundle: {err_text(e)}", bundle=True) from None
        with f:
            try:
                verified = VerifiedBundle(f, self.private_key)
            except IntegrityError as e:
                raise Unreadable(f"bundle does not verify: {e}") from None
            wanted = [e for e in verified.manifest.instances if plan.wants(e.index)]
            # Suspects of an earlier failure go last, on associations of their own: the
            # healthy instances are delivered first, and a failure of a suspect is then
            # known to be its own (the PACS took the others).
            batches = [b for b in ([e for e in wanted if e.index not in plan.last],
                                   [e for e in wanted if e.index in plan.last]) if b]
            sent = _Sent()
            t0 = time.monotonic()
            tls_ctx = self._client_context()
            associations = 0
            try:
                for batch in batches:
                    associations += self._send_batch(item_id, verified, batch, tls_ctx, sent,
                                                     progress, plan)
            except IntegrityError as e:
                raise Unreadable(f"bundle does not verify: {e}") from None
        if batches:
            log.info("dicom.sent", destination=self.name, bundle=item_id, instances=sent.count,
                     bytes=sent.bytes, associations=associations,
                     committed=self.dest.storage_commitment, converted=sent.converted or None,
                     seconds=round(time.monotonic() - t0, 3))

    def _send_batch(self, item_id: str, verified: VerifiedBundle, batch: list[ManifestEntry],
                    tls_ctx: ClientContext | None, sent: _Sent, progress: Callable[[int], None],
                    plan: Plan) -> int:
        """Send `batch` (in manifest order) over as many associations as its contexts
        need, committing it at the end when storage commitment is on; returns the
        number of associations. Each instance the PACS now holds is reported to
        `plan.delivered` (after the commitment report, when there is one)."""
        commitment = self.dest.storage_commitment
        groups = plan_groups([(e.sop_class, e.transfer_syntax) for e in batch], commitment,
                             limit=MAX_CONTEXTS)
        indexes = {e.index for e in batch}
        instances = ((e, s) for e, s in verified.streams() if e.index in indexes)
        stored: list[ManifestEntry] | None = [] if commitment else None
        for gi, group in enumerate(groups):
            last = gi == len(groups) - 1
            self._send_group(item_id, group, batch, instances, tls_ctx, sent, progress, plan,
                             stored, commit_all=batch if (commitment and last) else None,
                             total=len(verified.manifest.instances))
        if stored is not None:
            for e in stored:
                plan.delivered(e.index)
        return len(groups)

    def probe(self) -> bool:
        return self.check().ok

    def check(self) -> Answer:
        """A C-ECHO on an association of its own, within `timeout_s`: does the PACS answer?
        A PACS that answers the association but does not offer Verification answers too
        (else a destination marked down would never come back)."""
        try:
            link = self._associate([(VERIFICATION, UNCOMPRESSED)], self._client_context())
        except NoContextAccepted:
            return Answer(True, "the association was accepted (without Verification: no C-ECHO)")
        except (Retryable, Permanent) as e:
            return Answer(False, str(e))
        try:
            options = link.accepted.get(VERIFICATION)
            if not options:
                return Answer(False, "the association was accepted but not Verification")
            req = C_ECHO()
            req.MessageID = link.next_id()
            req.AffectedSOPClassUID = VERIFICATION
            rsp = link.request(req, options[0][0])
            if rsp.is_valid_response and rsp.Status == 0x0000:
                return Answer(True, "C-ECHO answered Success")
            status = f"status 0x{int(rsp.Status):04X}" if rsp.is_valid_response else "no valid response"
            return Answer(False, f"C-ECHO answered with {status}")
        except Lost:
            link.kill()
            return Answer(False, "the connection was lost during the C-ECHO")
        finally:
            link.release()

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        with self._converter_lock:
            if self._converter is not None:
                self._converter.close()

    def converter(self) -> conversion.Converter:
        """The conversion workers, started at the first instance the PACS takes only
        in another syntax."""
        with self._converter_lock:
            if self._converter is None:
                self._converter = conversion.Converter()
            return self._converter

    # --- one association ---

    def _send_group(self, item_id: str, group: Group, entries: Sequence[ManifestEntry],
                    instances: Iterator[tuple[ManifestEntry, InstanceStream]],
                    tls_ctx: ClientContext | None,
                    sent: _Sent, progress: Callable[[int], None], plan: Plan,
                    stored: list[ManifestEntry] | None,
                    commit_all: Sequence[ManifestEntry] | None, total: int) -> None:
        specs = list(group.contexts)
        if commit_all is not None:
            specs.append((STORAGE_COMMITMENT_PUSH, UNCOMPRESSED))
        try:
            link = self._associate(specs, tls_ctx, plan.cancelled)
        except NoContextAccepted as e:  # refused for what these instances are: park them
            mine = entries[group.start : group.stop]
            raise Permanent(str(e), instances=tuple(en.index for en in mine)) from None
        where, current = "", None
        try:
            mine = entries[group.start : group.stop]
            choices = _choices(link, mine)
            for entry, choice in zip(mine, choices, strict=True):
                where = f" while sending instance {entry.index} of {total}"
                current = entry
                got, stream = next(instances)
                if got.index != entry.index:
                    raise IntegrityError("bundle changed while it was being read")
                at = functools.partial(_progress_from, progress, sent.bytes)
                if choice.how == "as-is" and entry.size >= STREAM_THRESHOLD:
                    self._store_streamed(link, item_id, entry, stream, choice.context_id, at)
                elif choice.how == "as-is" or (choice.how == "explicit"
                                               and entry.transfer_syntax == ExplicitVRLittleEndian):
                    payload = self._payload(entry, stream.read(), choice, sent)
                    self._store(link, item_id, entry, payload, choice.context_id)
                else:
                    self._store_converted(link, item_id, entry, stream, choice, sent, at)
                current = None
                sent.count += 1
                sent.bytes += entry.size
                progress(sent.bytes)
                if stored is None:
                    plan.delivered(entry.index)
                else:
                    stored.append(entry)
            if commit_all is not None:
                where = " during storage commitment"
                self._commit(link, item_id, stored or [])
        except Lost as e:
            link.kill()
            # A PACS that stopped answering while sending an instance may have choked on
            # it; a silent link (its machine acknowledged nothing) is no instance's doing.
            blame = (current.index,) if current is not None and not link.probe.link_silent else ()
            if link.probe.link_silent:
                log.warning("dicom.link_silent", destination=self.name, bundle=item_id,
                            link_timeout_s=self.link_timeout)
            raise Retryable(f"{e}{where}", instances=blame) from None
        except (Retryable, Permanent) as e:
            link.release()
            if current is not None and not e.instances and not isinstance(e, Unreadable):
                e.instances = (current.index,)
            raise
        except BaseException:
            link.abort()
            raise
        link.release()

    # --- instances ---

    def _payload(self, entry: ManifestEntry, data: bytes, choice: Choice, sent: _Sent) -> bytes:
        """The data set bytes to send as they are (Part-10 header removed): the instance
        in its own syntax, or in Explicit VR LE already for a PACS that wants that."""
        if choice.how != "as-is":
            _count_conversion(sent, entry, choice)
        try:
            start = dataset_offset(data)
        except ValueError as e:
            raise Permanent(f"instance {entry.index}: {e}") from None
        return data[start:]

    def _store(self, link: Link, item_id: str, entry: ManifestEntry, payload: bytes,
               context_id: int) -> None:
        req = _store_request(link, entry)
        req.DataSet = BytesIO(payload)
        self._judge_store(link.request(req, context_id), item_id, entry)

    def _store_streamed(self, link: Link, item_id: str, entry: ManifestEntry, stream: InstanceStream,
                        context_id: int, progress: Callable[[int], None]) -> None:
        """Send the data set of `stream` as it is read from the bundle; its last P-DATA
        fragment goes out only once the stream has verified the whole instance (an
        IntegrityError propagates before, and `_send_group` aborts the association)."""
        source = _DataSet(_read_past_meta(stream, entry.index), stream)
        rsp = link.store_streamed(_store_request(link, entry), context_id, source, progress)
        self._judge_store(rsp, item_id, entry)

    def _store_converted(self, link: Link, item_id: str, entry: ManifestEntry, stream: InstanceStream,
                         choice: Choice, sent: _Sent, progress: Callable[[int], None]) -> None:
        """Send an instance the PACS takes only decompressed (or Implicit VR LE),
        converted in a worker process (`conversion`): a large one decoded frame by frame
        as it is sent (`stream_convert`), else whole. Either way its last P-DATA fragment
        goes out only once the stream has verified the whole instance. What cannot be
        converted (refused by the codec, the worker crashing, hanging or ballooning) is
        Permanent for this bundle; found out midway, the association is aborted so that
        the PACS drops what it got."""
        job = conversion.Job(how=choice.how, transfer_syntax=entry.transfer_syntax, size=entry.size,
                             streamed=(choice.how == "explicit" and entry.size >= STREAM_THRESHOLD
                                       and UID(entry.transfer_syntax).is_encapsulated),
                             max_output=self.max_output)
        try:
            conv = self.converter().open(job, stream.read)
        except conversion.ConversionFailed as e:
            raise _unconvertible(entry, e) from None
        except conversion.Unavailable as e:
            raise Retryable(f"instance {entry.index} needs converting for this PACS: {e}") from None
        with conv:
            if conv.whole_reason is not None:
                log.info("dicom.convert_whole", destination=self.name, bundle=item_id,
                         instance=entry.index, reason=conv.whole_reason)
            _count_conversion(sent, entry, choice)
            if not conv.streaming and conv.length is not None and conv.length < STREAM_THRESHOLD:
                try:
                    payload = conv.read_all()
                except codec.CodecError as e:
                    raise _unconvertible(entry, e) from None
                self._store(link, item_id, entry, payload, choice.context_id)
                return
            # progress in bundle bytes of the instance, as for every other instance
            def report(_: int) -> None:
                progress(min(conv.bytes_read, entry.size))
            try:
                rsp = link.store_streamed(_store_request(link, entry), choice.context_id, conv, report)
            except codec.CodecError as e:
                link.abort()
                raise Permanent(f"instance {entry.index}: cannot be converted for this PACS: {e}") from None
        self._judge_store(rsp, item_id, entry)

    def _judge_store(self, rsp: Any, item_id: str, entry: ManifestEntry) -> None:
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


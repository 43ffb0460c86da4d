"""Storage Commitment on the sending side: the N-ACTION after a batch, and judging the report.

`Committer` is the part of `DicomTransport` (transport.py) that asks the PACS to commit
the instances just stored (one N-ACTION with a fresh Transaction UID), waits for the
report on the same association or, when `commitment_port` is set, on the small listener
it starts once (`commitment.CommitmentListener`), and judges it. Owns no state of its
own: the attributes it reads are set by `DicomTransport.__init__`; the waiters are in
`commitment.Commitments`. See the package docstring, "Storage Commitment".

How it fails: `Permanent` when the PACS does not take Storage Commitment or refuses the
request for good, `Retryable` when no complete report came in time or the PACS did not
commit some instances (named by index, never by UID), `link.Lost` when the connection
went before the report.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.dsutils import encode

from appliance.bundle.format import ManifestEntry
from appliance.core.config import Destination
from appliance.core.errors import ListenError
from appliance.core.listener import resolve
from appliance.forward import Permanent, Retryable
from appliance.forward.dicom.commitment import (
    REPORT_GRACE_S,
    CommitmentListener,
    Commitments,
    Waiter,
    handle_report,
)
from appliance.forward.dicom.contexts import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from appliance.forward.dicom.link import Link, Lost
from appliance.forward.dicom.status import COMMITMENT_FAILURES, Outcome, classify_status
from appliance.forward.dicom.tls import err_text

log = structlog.get_logger("appliance.forward.dicom")


class Committer:
    """Storage commitment for `DicomTransport` (which sets the attributes below)."""

    name: str
    dest: Destination
    calling_ae: str
    timeout: float
    commitment_port: int | None
    commitment_bind: str
    commitment_timeout: float
    _commitments: Commitments
    _listener: CommitmentListener | None
    _listener_lock: threading.Lock
    _server_context: Callable[[], ssl.SSLContext | None]  # transport.DicomTransport

    def _ensure_listener(self) -> bool:
        if self.commitment_port is None:
            return False
        with self._listener_lock:
            if self._listener is None:
                where = f"{self.commitment_bind}:{self.commitment_port}"
                assert self.dest.host is not None
                try:
                    # Who may send reports: the PACS, at what its host name resolves to now.
                    pacs = resolve(self.dest.host)
                except OSError:
                    raise Retryable(f"cannot resolve the PACS host name {self.dest.host!r} "
                                    "(needed to admit its storage commitment reports)") from None
                try:
                    self._listener = CommitmentListener(
                        self.calling_ae, self.commitment_bind, self.commitment_port,
                        self._commitments, self.timeout, self._server_context(), self.name, pacs)
                except ListenError as e:
                    raise Retryable(str(e)) from None
                except (OSError, ssl.SSLError) as e:
                    raise Retryable(f"cannot listen for storage commitment reports on {where}: "
                                    f"{err_text(e)}") from None
            return True

    def _commit(self, link: Link, item_id: str, entries: Sequence[ManifestEntry]) -> None:
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
            except Lost as e:
                # Orthanc, for one, aborts an N-ACTION from an AE title it does not know.
                raise Lost(f"{e} (does the PACS know this appliance's AE title "
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
                    raise Lost("the connection to the PACS was lost before its storage commitment report")
                if listening:
                    link.release()
                    waiter.event.wait(max(0.0, deadline - time.monotonic()))
            self._judge(item_id, waiter, len(entries), listening)
        finally:
            self._commitments.forget(tuid)

    def _judge(self, item_id: str, waiter: Waiter, n: int, listening: bool) -> None:
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
        return handle_report(event, self._commitments, self.name, "association")

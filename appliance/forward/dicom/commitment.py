"""Storage Commitment: waiters by Transaction UID, the report handler, and the small SCP
that takes reports the PACS sends on a new association (see the package docstring),
behind the same gate as the receive ports, admitting only the PACS's address.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Collection, Mapping
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from appliance.core import pynetdicom_compat as compat
from appliance.core.listener import Gate, Limits, listen_error
from appliance.forward.dicom.contexts import STORAGE_COMMITMENT_PUSH, UNCOMPRESSED

log = structlog.get_logger("appliance.forward.dicom")

REPORT_GRACE_S = 2.0  # how long to hold the association for a same-association report

# --- Storage Commitment ----------------------------------------------------------------


class Waiter:
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


class Commitments:
    """Bundles waiting for a storage commitment report, by Transaction UID."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, Waiter] = {}

    def expect(self, transaction_uid: str, expected: Mapping[str, tuple[int, str]]) -> Waiter:
        w = Waiter(expected)
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


# The listener's own limits: the PACS opens one association per report, rarely more.
LISTENER_CONNECTIONS = 4


class CommitmentListener:
    """A tiny SCP that only takes Storage Commitment N-EVENT-REPORTs from the PACS.

    Behind the same gate as the receive ports (core.listener): only `pacs_addresses` may
    connect, at most LISTENER_CONNECTIONS at once, each with `timeout_s` from accept to a
    complete association request and per PDU, and no PDU longer than we announced.
    ListenError if the port cannot be bound."""

    def __init__(self, ae_title: str, bind: str, port: int, commitments: Commitments,
                 timeout_s: float, ssl_context: ssl.SSLContext | None, destination: str,
                 pacs_addresses: Collection[str]) -> None:
        self.commitments = commitments
        self.destination = destination
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, list(UNCOMPRESSED),
                                 scu_role=False, scp_role=True)
        ae.acse_timeout = timeout_s
        ae.dimse_timeout = timeout_s
        ae.network_timeout = timeout_s
        ae.maximum_associations = LISTENER_CONNECTIONS
        self.ae = ae
        allowed = frozenset(pacs_addresses)
        limits = Limits(max_connections=LISTENER_CONNECTIONS, max_per_host=LISTENER_CONNECTIONS,
                        handshake_s=timeout_s, io_timeout_s=timeout_s, max_pdu=ae.maximum_pdu_size)
        self.gate = Gate(f"commitment:{destination}", limits, admit_host=allowed.__contains__)
        try:
            server = ae.make_server((bind, port), ssl_context=ssl_context, server_class=compat.GatedServer,
                                    evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])
        except OSError as e:
            raise listen_error(e, f"storage commitment reports from {destination}", bind, port) from None
        self.gate.serve(server)
        self.gate.start()
        self.server = server

    def _on_report(self, event: Any) -> tuple[int, None]:
        return handle_report(event, self.commitments, self.destination, "listener")

    def close(self) -> None:
        self.gate.stop()


def handle_report(event: Any, commitments: Commitments, destination: str,
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


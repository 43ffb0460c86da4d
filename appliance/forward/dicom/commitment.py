"""Storage Commitment: waiters by Transaction UID, the report handler, and the small SCP
that takes reports the PACS sends on a new association (see the package docstring).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Mapping
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from appliance.forward.dicom.contexts import STORAGE_COMMITMENT_PUSH, UNCOMPRESSED
from appliance.forward.dicom.link import nodelay

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


class CommitmentListener:
    """A tiny SCP that only takes Storage Commitment N-EVENT-REPORTs from the PACS."""

    def __init__(self, ae_title: str, bind: str, port: int, commitments: Commitments,
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
                          (evt.EVT_CONN_OPEN, nodelay)])
        assert server is not None  # non-blocking start_server returns the server
        self.server = server

    def _on_report(self, event: Any) -> tuple[int, None]:
        return handle_report(event, self.commitments, self.destination, "listener")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()


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


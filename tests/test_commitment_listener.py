"""The storage commitment listener (forward/dicom/commitment.py) behind the receive ports'
gate: only the PACS's address may connect, a stalled connection is closed on time, a PDU
longer than announced is refused unread, and it binds only the configured address.
pynetdicom plays the PACS sending its N-EVENT-REPORT; raw sockets play the rest."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from appliance.core.config import Destination
from appliance.forward.dicom import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH, DicomTransport
from appliance.forward.dicom.commitment import CommitmentListener, Commitments
from appliance.forward.dicom.link import close_socket
from tests.hostile import connect_from
from tests.peers import free_port
from tests.test_forward_dicom import KEY

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def listener() -> Iterator[CommitmentListener]:
    lst = CommitmentListener("EDGE", "127.0.0.1", free_port(), Commitments(), timeout_s=2,
                             ssl_context=None, destination="pacs", pacs_addresses={"127.0.0.1"})
    yield lst
    lst.close()


def port(lst: CommitmentListener) -> int:
    return int(lst.server.server_address[1])


def report(port: int, transaction: str, uid: str, source: str = "127.0.0.1") -> int | None:
    """Send a storage commitment result as the PACS does (a new association, Push Model
    with the SCP role); the N-EVENT-REPORT's status, or None if not associated."""
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE", ext_neg=[role], bind_address=(source, 0))
    if not assoc.is_established:
        close_socket(assoc)  # pynetdicom leaves it open when the peer closed first
        return None
    ds = Dataset()
    ds.TransactionUID = transaction
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = SOP_CLASS, uid
    ds.ReferencedSOPSequence = [item]
    try:
        status, _ = assoc.send_n_event_report(ds, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
        return int(status.Status)
    finally:
        assoc.release()


def closed_at_once(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_report_from_the_pacs_address_reaches_its_bundle(listener: CommitmentListener) -> None:
    waiter = listener.commitments.expect("2.25.1", {"1.2.3": (0, SOP_CLASS)})
    assert report(port(listener), "2.25.1", "1.2.3") == 0x0000
    assert waiter.event.wait(10) and waiter.committed == {"1.2.3"}


def test_another_address_is_closed_at_accept(listener: CommitmentListener) -> None:
    """127.0.0.2 is not the PACS: its connection is closed before a byte is read, and a
    real association attempt from there fails; both are counted."""
    with connect_from("127.0.0.2", port(listener)) as s:
        assert closed_at_once(s, within=2)
    waiter = listener.commitments.expect("2.25.2", {"1.2.3": (0, SOP_CLASS)})
    assert report(port(listener), "2.25.2", "1.2.3", source="127.0.0.2") is None
    assert not waiter.event.is_set()
    assert listener.gate.refusals == {"caller_address": 2}


def test_a_stalled_connection_from_the_pacs_is_closed_after_timeout_s(listener: CommitmentListener) -> None:
    with connect_from("127.0.0.1", port(listener)) as s:
        s.sendall(b"\x01")
        t0 = time.monotonic()
        assert closed_at_once(s, within=20)
        elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 2 + 5, f"closed after {elapsed:.1f} s"
    assert listener.gate.refusals == {"handshake_timeout": 1}


def test_an_oversized_association_request_is_refused_unread(listener: CommitmentListener) -> None:
    with connect_from("127.0.0.1", port(listener)) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))
        assert closed_at_once(s, within=5)
    assert listener.gate.refusals == {"pdu_too_long": 1}


def test_the_listener_binds_only_the_configured_address(listener: CommitmentListener) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port(listener)), timeout=5).close()


def test_the_transport_admits_what_the_pacs_host_name_resolves_to() -> None:
    """A destination named by host name: what it resolves to (localhost: 127.0.0.1) may
    send reports to the listener the transport starts."""
    listen = free_port()
    dest = Destination(name="pacs", transport="dicom", host="localhost", port=free_port(),
                       ae_title="ORTHANC", plaintext=True, storage_commitment=True,
                       commitment_port=listen, commitment_bind="127.0.0.1", timeout_s=2)
    t = DicomTransport(dest, KEY)
    try:
        assert t._ensure_listener()
        assert report(listen, "2.25.3", "1.2.3") == 0x0000  # an unknown transaction: acknowledged
    finally:
        t.close()

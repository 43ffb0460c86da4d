"""The pure pieces of core/listener.py: admission (caps and eviction), PDU header checks,
the P-DATA item checks of a handed-over connection, and the bind error messages."""

from __future__ import annotations

import errno
import struct

import pytest

from appliance.core.errors import EX_NOPERM, EX_TEMPFAIL
from appliance.core.listener import (
    ASSOCIATE_FLOOR,
    MAX_COMMAND,
    MAX_OTHER_DATA_SET,
    REFUSALS,
    Admission,
    Limits,
    PduPolicy,
    command_field,
    host_key,
    listen_error,
    pdu_refusal,
)

LIMITS = Limits(max_connections=4, max_per_host=2, handshake_s=5, io_timeout_s=5, max_pdu=16384)


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def test_admission_caps_connections_per_host() -> None:
    a = Admission(max_total=4, max_per_host=2)
    assert a.admit(1, "10.0.0.1", 0).refusal is None
    assert a.admit(2, "10.0.0.1", 1).refusal is None
    assert a.admit(3, "10.0.0.1", 2).refusal == "per_host_cap"
    assert a.admit(4, "10.0.0.2", 3).refusal is None  # another address still gets in
    a.closed(1)
    assert a.admit(5, "10.0.0.1", 4).refusal is None  # a closed one frees its place


def test_admission_at_the_total_cap_evicts_the_oldest_connection_without_an_association() -> None:
    a = Admission(max_total=3, max_per_host=3)
    for cid, host in ((1, "10.0.0.1"), (2, "10.0.0.2"), (3, "10.0.0.3")):
        assert a.admit(cid, host, float(cid)).refusal is None
    a.established(1, True)  # the oldest is an association: never evicted
    d = a.admit(4, "10.0.0.4", 10)
    assert d.refusal is None and d.evict == 2
    assert set(a.conns) == {1, 3, 4}


def test_admission_refuses_when_every_connection_is_an_association() -> None:
    a = Admission(max_total=2, max_per_host=2)
    a.admit(1, "10.0.0.1", 0)
    a.admit(2, "10.0.0.2", 1)
    a.established(1, True)
    a.established(2, True)
    assert a.admit(3, "10.0.0.3", 2).refusal == "total_cap"
    a.established(2, False)  # released, not yet gone: may make room
    assert a.admit(3, "10.0.0.3", 2).evict == 2


@pytest.mark.parametrize(("head", "first", "why"), [
    (header(0x01, 200), True, None),
    (header(0x01, ASSOCIATE_FLOOR), True, None),  # an association request may exceed max_pdu
    (header(0x01, ASSOCIATE_FLOOR + 1), True, "pdu_too_long"),
    (header(0x01, 1 << 30), True, "pdu_too_long"),  # checked before a byte of the body is read
    (header(0x01, 10), True, "protocol"),  # shorter than the fixed fields
    (header(0x04, 100), True, "protocol"),  # the first PDU must be an association request
    (header(0x09, 100), False, "protocol"),  # no such PDU type
    (header(0x04, 16384), False, None),  # a P-DATA-TF of exactly max_pdu
    (header(0x04, 16385), False, "pdu_too_long"),
    (header(0x05, 4), False, None),  # A-RELEASE-RQ
])
def test_pdu_header_checks(head: bytes, first: bool, why: str | None) -> None:
    assert pdu_refusal(head, LIMITS, first) == why
    assert why is None or why in REFUSALS


def pdv(data: bytes, command: bool, last: bool, context: int = 1) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context, int(command) | int(last) << 1) + data


def command_set(field: int) -> bytes:
    """A minimal command set: (0000,0002) and (0000,0100)."""
    uid = b"1.2.840.10008.5.1.4.1.1.2\x00"
    return (struct.pack("<HHL", 0, 2, len(uid)) + uid + struct.pack("<HHLH", 0, 0x0100, 2, field))


class Refused(list[str]):
    pass


def policy() -> tuple[PduPolicy, Refused]:
    refused = Refused()
    return PduPolicy(LIMITS, refused.append), refused


def feed(p: PduPolicy, chunk: bytes, times: int) -> int | None:
    """Give `p` the same P-DATA body `times` times; the index of the first refused, or None."""
    for i in range(times):
        if not p.body(0x04, chunk):
            return i
    return None


def test_command_field_is_read_from_an_encoded_command_set() -> None:
    assert command_field(command_set(0x0001)) == 0x0001
    assert command_field(command_set(0x0030)) == 0x0030
    assert command_field(b"") is None


def test_a_c_store_data_set_is_not_capped_here() -> None:
    """receive.intake refuses an oversized C-STORE with a status; the socket lets it through."""
    p, refused = policy()
    assert p.body(0x04, pdv(command_set(0x0001), command=True, last=True))
    assert feed(p, pdv(b"\0" * 16000, command=False, last=False), MAX_OTHER_DATA_SET // 16000 + 2) is None
    assert refused == []


def test_another_message_data_set_is_capped() -> None:
    p, refused = policy()
    assert p.body(0x04, pdv(command_set(0x0030), command=True, last=True))  # C-ECHO-RQ
    n = MAX_OTHER_DATA_SET // 16000
    assert feed(p, pdv(b"\0" * 16000, command=False, last=False), n + 2) == n
    assert refused == ["message_too_long"]


def test_a_command_set_that_never_ends_is_capped() -> None:
    p, refused = policy()
    n = MAX_COMMAND // 16000
    assert feed(p, pdv(b"\0" * 16000, command=True, last=False), n + 2) == n
    assert refused == ["message_too_long"]


def test_a_data_set_counter_restarts_with_each_message() -> None:
    p, refused = policy()
    for _ in range(3):
        assert p.body(0x04, pdv(command_set(0x0030), command=True, last=True))
        assert p.body(0x04, pdv(b"\0" * (MAX_OTHER_DATA_SET // 2), command=False, last=True))
    assert refused == []


@pytest.mark.parametrize("body", [
    struct.pack(">LBB", 100, 1, 0) + b"\0" * 10,  # an item longer than the PDU
    struct.pack(">LBB", 1, 1, 0),  # an item too short for its own header
    pdv(b"abc", False, True) + b"\0\0",  # bytes after the last item
])
def test_malformed_p_data_items_are_refused(body: bytes) -> None:
    p, refused = policy()
    assert not p.body(0x04, body)
    assert refused == ["protocol"]


def test_headers_of_a_handed_over_connection_are_checked() -> None:
    p, refused = policy()
    assert p.header(header(0x04, 16384))
    assert not p.header(header(0x04, 1 << 30))
    assert refused == ["pdu_too_long"]


@pytest.mark.parametrize(("address", "key"), [
    ("10.1.2.3", "10.1.2.3"), ("::ffff:10.1.2.3", "10.1.2.3"), ("fe80::1%eth0", "fe80::1"),
    ("::1", "::1")])
def test_host_key(address: str, key: str) -> None:
    assert host_key(address) == key


@pytest.mark.parametrize(("code", "text", "exit_code"), [
    (errno.EADDRINUSE, "port 11112 on 127.0.0.1 is in use", EX_TEMPFAIL),
    (errno.EADDRNOTAVAIL, "127.0.0.1 is not an address of this machine", EX_TEMPFAIL),
    (errno.EACCES, "no permission to listen on port 11112 on 127.0.0.1", EX_NOPERM),
])
def test_listen_errors_say_what_is_wrong(code: int, text: str, exit_code: int) -> None:
    e = listen_error(OSError(code, "x"), "DICOM", "127.0.0.1", 11112)
    assert str(e).startswith(text)
    assert e.exit_code == exit_code

"""Pure pieces of the receiver: the status table, the allowlist, UID checks, the file meta."""

from __future__ import annotations

import pytest
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from appliance.core.config import Caller, Receive
from appliance.receive.identify import part10_header, valid_uid
from appliance.receive.scp import (
    REJECTIONS,
    STATUS,
    association_refusal,
    caller_allowed,
)


def test_status_table_uses_the_storage_service_ranges() -> None:
    assert STATUS["stored"][0] == STATUS["duplicate"][0] == 0x0000
    assert STATUS["spool_full"][0] == 0xA700
    for outcome in ("disk_error", "too_large"):  # Out of Resources
        assert 0xA700 <= STATUS[outcome][0] <= 0xA7FF, outcome
    for outcome in ("unparseable", "missing_uids", "uid_mismatch"):
        assert 0xC000 <= STATUS[outcome][0] <= 0xCFFF, outcome  # Cannot understand
    assert len({v[0] for k, v in STATUS.items() if k != "duplicate"}) == len(STATUS) - 1


@pytest.mark.parametrize(("ae", "addr", "ok"), [
    ("CT_SCANNER", "10.1.2.3", True),
    ("CT_SCANNER  ", "10.1.2.3", True),     # AE titles are space padded on the wire
    ("CT_SCANNER", "10.1.2.4", False),      # right title, wrong host
    ("CT_SCANNER", "::ffff:10.1.2.3", True),  # IPv4-mapped IPv6 peer
    ("MR_SCANNER", "192.168.7.9", True),    # entry without hosts: any address
    ("STRANGER", "10.1.2.3", False),
    ("ct_scanner", "10.1.2.3", False),      # AE titles are case sensitive
])
def test_caller_allowlist(ae: str, addr: str, ok: bool) -> None:
    cfg = Receive(callers=(Caller("CT_SCANNER", ("10.1.2.3/32",)), Caller("MR_SCANNER")))
    assert caller_allowed(cfg, ae, addr) is ok


@pytest.mark.parametrize(("calling", "called", "check", "why"), [
    ("CT_SCANNER", "EDGE", True, None),
    ("CT_SCANNER", "EDGE            ", True, None),  # space padded on the wire
    ("CT_SCANNER", "WRONG", True, "called_ae"),
    ("CT_SCANNER", "edge", True, "called_ae"),       # case sensitive
    ("CT_SCANNER", "WRONG", False, None),
    ("STRANGER", "WRONG", True, "calling_ae"),       # the caller is checked first
])
def test_association_refusal(calling: str, called: str, check: bool, why: str | None) -> None:
    cfg = Receive(ae_title="EDGE", callers=(Caller("CT_SCANNER"),), check_called_ae=check)
    assert association_refusal(cfg, calling, called, "10.1.2.3") == why


def test_rejections_are_permanent_with_the_dicom_reason() -> None:
    assert REJECTIONS["calling_ae"][:3] == (0x01, 0x01, 0x03)
    assert REJECTIONS["called_ae"][:3] == (0x01, 0x01, 0x07)


def test_accept_any_caller_must_be_explicit() -> None:
    assert not caller_allowed(Receive(), "ANYONE", "127.0.0.1")
    assert caller_allowed(Receive(accept_any_caller=True), "ANYONE", "127.0.0.1")


@pytest.mark.parametrize(("uid", "ok"), [
    ("1.2.840.10008.5.1.4.1.1.2", True), ("1", True), ("1." + "2" * 62, True),
    ("1." + "2" * 63, False), ("", False), ("1..2", False), ("1.2.", False),
    ("../../etc/passwd", False), ("1.2.3a", False), (None, False),
])
def test_uid_grammar(uid: object, ok: bool) -> None:
    assert valid_uid(uid) is ok


@pytest.mark.parametrize(("sop_class", "sop_instance", "ts", "ae"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "MOD"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2", "SIXTEEN_CHARS_AE"),
    ("1.2.840.10008.5.1.4.1.1.7", "1.23", "1.2.840.10008.1.2.4.90", "A"),
])
def test_file_meta_is_what_pydicom_would_write(sop_class: str, sop_instance: str, ts: str,
                                               ae: str) -> None:
    fm = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts)
    fm.SourceApplicationEntityTitle = ae
    assert part10_header(sop_class, sop_instance, ts, ae) == b"\0" * 128 + b"DICM" + encode_file_meta(fm)


def test_reactors_poll_fast_only_while_one_association_sends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.receive import tuning as receive

    monkeypatch.setattr(receive, "_senders", {})
    slept: list[float] = []
    monkeypatch.setattr(receive.time, "sleep", slept.append)
    clock = [1000.0]
    monkeypatch.setattr(receive.time, "monotonic", lambda: clock[0])
    poll = receive._AdaptiveSleepTime()

    a, b = object(), object()
    receive.mark_activity(a)
    poll.sleep(0.001)
    assert slept[-1] == receive.POLL_BUSY_S          # one sender: fast
    clock[0] += 0.01
    receive.mark_activity(b)
    poll.sleep(0.001)
    assert slept[-1] == receive.POLL_IDLE_S          # two at once: the CPUs are busy anyway
    clock[0] += receive.BUSY_WINDOW_S + 0.001
    receive.mark_activity(b)                          # a went quiet
    poll.sleep(0.001)
    assert slept[-1] == receive.POLL_BUSY_S
    clock[0] += receive.BUSY_WINDOW_S + 0.001         # nobody sending
    poll.sleep(0.001)
    assert slept[-1] == receive.POLL_IDLE_S
    poll.sleep(0.0001)
    assert slept[-1] == 0.0001                        # never longer than pynetdicom asked

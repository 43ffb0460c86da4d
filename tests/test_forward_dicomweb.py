"""The dicomweb transport: STOW-RS to Orthanc with its DICOMweb plugin (orthanc-dicomweb).

Pure parts first (framing, request cutting, status table, response reading, config),
then real sends: what Orthanc stored is fetched back through its REST API
(`/instances/{id}/file`) and compared with pydicom. What Orthanc cannot do (check a
bearer token, answer 413 or 503) is done by a tiny stdlib HTTP server in front of it
(tests/http_front.py), which passes everything else on to Orthanc.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from appliance.bundle.format import BundleWriter, InstanceInfo, ManifestEntry
from appliance.core import config
from appliance.core.config import Destination
from appliance.core.errors import ConfigError
from appliance.forward import Permanent, Plan, Retryable, Unreadable, policy
from appliance.forward.dicomweb import DicomWebTransport, stow
from appliance.forward.dicomweb.stow import Reply
from tests.e2e_support import CODEC_SYNTAX, appliance_config, compare_instance, queue_db, settled
from tests.http_front import Front
from tests.orthanc import Orthanc
from tests.peers import SAMPLES, base_config, cli, free_port, to_toml, wait_for
from tests.spoolcheck import finish_storescu, popen_storescu
from tests.test_forward_dicom import (
    KEY,
    PKI,
    Progress,
    assert_same_pixels,
    ct_slices,
    j2k,
    make_bundle,
    mr_slice,
    pacs_factory,  # noqa: F401 - a fixture
    read,
    stored_ts,
    uid_of,
)

MB = 1 << 20


def entry(index: int, size: int, uid: str = "") -> ManifestEntry:
    ts = "1.2.840.10008.1.2.1"
    return ManifestEntry(index=index, sop_instance_uid=uid or f"1.2.3.{index}",
                         sop_class="1.2.840.10008.5.1.4.1.1.2", transfer_syntax=ts,
                         received_transfer_syntax=ts, received_size=size, received_sha256="0" * 64,
                         size=size, sha256="0" * 64, action="passthrough")


# --- pure: framing, cutting, status table, response -----------------------------------


def test_body_length_is_the_length_of_the_framed_body() -> None:
    parts = [b"a" * 10, b"b" * 300, b""]
    body = b"".join(stow.part_head("xyz", i == 0) + p for i, p in enumerate(parts)) + stow.closing("xyz")
    assert stow.body_length([len(p) for p in parts], "xyz") == len(body)
    assert body.startswith(b"--xyz\r\nContent-Type: application/dicom\r\n\r\naaaa")
    assert body.endswith(b"\r\n--xyz--\r\n")


def test_requests_are_cut_by_size_and_a_large_instance_goes_alone() -> None:
    es = [entry(0, 3 * MB), entry(1, 3 * MB), entry(2, 10 * MB), entry(3, MB), entry(4, MB)]
    cut = stow.cut_requests(es, 8 * MB)
    assert [[e.index for e in r] for r in cut] == [[0, 1], [2], [3, 4]]
    assert [[e.index for e in r] for r in stow.cut_requests(es, 64 * MB, most=2)] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(("status", "reply"), [
    (200, Reply.STORED), (202, Reply.PER_INSTANCE), (409, Reply.PER_INSTANCE), (400, Reply.PER_INSTANCE),
    (413, Reply.SPLIT), (401, Reply.CREDENTIALS), (403, Reply.CREDENTIALS), (404, Reply.REFUSED),
    (302, Reply.REFUSED), (418, Reply.REFUSED), (500, Reply.RETRY), (503, Reply.RETRY), (429, Reply.RETRY),
    (599, Reply.RETRY), (204, Reply.PER_INSTANCE)])
def test_http_status_table(status: int, reply: Reply) -> None:
    assert stow.classify_http(status)[0] is reply


def test_retry_after_is_read_as_seconds_from_a_delay_or_an_http_date() -> None:
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert stow.retry_after_seconds("120", now) == 120.0
    assert stow.retry_after_seconds("Fri, 15 Jan 2027 08:02:00 GMT", now) == 120.0
    assert stow.retry_after_seconds("Fri, 15 Jan 2027 07:00:00 GMT", now) == 0.0  # past: now
    assert stow.retry_after_seconds(None, now) is None
    assert stow.retry_after_seconds("soon", now) is None and stow.retry_after_seconds("-5", now) is None


def test_retry_after_is_quoted_only_when_it_is_a_delay_or_a_date() -> None:
    assert stow.retry_after("120") == "; the server asks to retry after 120 s"
    assert "Wed, 21 Oct 2026 07:28:00 GMT" in stow.retry_after("Wed, 21 Oct 2026 07:28:00 GMT")
    assert stow.retry_after(None) == "" and stow.retry_after("<script>") == ""


def _item(uid: str, reason_tag: str | None = None, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                            "00081155": {"vr": "UI", "Value": [uid]}}
    if reason_tag is not None:
        item[reason_tag] = {"vr": "US", "Value": [reason]}
    return item


def test_response_names_stored_failed_and_warned_instances() -> None:
    body = json.dumps({
        "00081199": {"vr": "SQ", "Value": [_item("1.2.3.0"), _item("1.2.3.1", "00081196", 0xB000)]},
        "00081198": {"vr": "SQ", "Value": [_item("1.2.3.2", "00081197", 0xC122),
                                           _item("1.2.3.3", "00081197", 0xA700)]},
    }).encode()
    j = stow.judge([entry(i, 1) for i in range(5)], Reply.PER_INSTANCE, stow.parse_response(body))
    assert j.stored == [0, 1] and j.warnings == [(1, 0xB000)]
    assert not j.permanent  # 0xC122: the transport decides (converted, or parked)
    assert [i for i, _ in j.unsupported_syntax] == [2] and "transfer syntax" in j.unsupported_syntax[0][1]
    assert [i for i, _ in j.retryable] == [3] and j.unaccounted == [4]


def test_a_200_without_a_body_means_every_instance_was_stored() -> None:
    j = stow.judge([entry(0, 1), entry(1, 1)], Reply.STORED, None)
    assert j.stored == [0, 1] and not j.unaccounted


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"00081199": 5}',
                                  b'{"00081199": {"Value": [7]}}'])
def test_a_malformed_response_body_names_nothing(body: bytes) -> None:
    r = stow.parse_response(body)
    assert r is None or (not r.referenced and not r.failed)


# --- config ------------------------------------------------------------------------------


def _parse(tmp_path: Path, dest: dict[str, Any]) -> Any:
    return config.parse({"receive": {"accept_any_caller": True},
                         "destinations": [{"name": "web", "transport": "dicomweb", **dest}]}, {},
                        tmp_path / "appliance.toml")


def test_config_takes_a_dicomweb_destination(tmp_path: Path) -> None:
    cfg = _parse(tmp_path, {"url": "https://pacs.example/dicom-web/", "token_file": "token",
                            "max_request_mb": 16, "timeout_s": 10, "link_timeout_s": 4})
    d = cfg.destinations[0]
    assert (d.url, d.token_file, d.max_request_mb, d.timeout_s, d.link_timeout_s) == (
        "https://pacs.example/dicom-web", tmp_path / "token", 16, 10.0, 4.0)


@pytest.mark.parametrize(("dest", "message"), [
    ({"url": "http://pacs/dicom-web"}, "destinations[0].url: is http://"),
    ({"url": "https://pacs/dicom-web"}, "destinations[0].tls: or token_file is required"),
    ({"url": "https://pacs/dicom-web", "plaintext": True},
     "destinations[0].plaintext: is true but url is https"),
    ({"url": "https://user:pw@pacs/dicom-web", "token_file": "t"},
     "destinations[0].url: must not hold a user"),
    ({"url": "ftp://pacs/x", "token_file": "t"}, "destinations[0].url: must be an http:// or https://"),
    ({"token_file": "t"}, "destinations[0].url: is required"),
    ({"url": "https://pacs/dw", "token_file": "t", "max_request_mb": 0},
     "destinations[0].max_request_mb: must be 1..4096"),
    ({"url": "http://pacs/dw", "plaintext": True, "host": "x"}, "destinations[0].host: does not apply"),
    ({"url": "http://pacs/dw", "plaintext": True, "link_timeout_s": 1},
     "destinations[0].link_timeout_s: must be 2..600"),
])
def test_config_errors_name_the_key(tmp_path: Path, dest: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse(tmp_path, dest)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_config_check_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, 11112)
    token = tmp_path / "web.token"
    token.write_text("a-token")
    token.chmod(0o640)
    cfg["destinations"] = [{"name": "web", "transport": "dicomweb", "url": "https://pacs.example/dw",
                            "token_file": str(token)}]
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    cli("keys", "init", "--config", str(path), check=True)
    r = cli("config", "check", "--config", str(path))
    assert r.returncode != 0
    assert "destinations[0].token_file" in r.stderr and "chmod 600" in r.stderr
    assert "a-token" not in r.stderr + r.stdout


# --- real sends: helpers ---------------------------------------------------------------------


def web_destination(url: str, **kw: Any) -> Destination:
    args: dict[str, Any] = {"name": "web", "transport": "dicomweb", "url": url,
                            "plaintext": url.startswith("http:"), "timeout_s": 5.0}
    args.update(kw)
    return Destination(**args)


@pytest.fixture
def web_pacs(pacs_factory: Callable[..., Orthanc]) -> Orthanc:  # noqa: F811 - the fixture
    return pacs_factory(dicomweb=True)


def unparseable_instance() -> bytes:
    """A Part-10 file whose data set Orthanc cannot parse (its meta header is a CT's)."""
    raw = ct_slices(1)[0]
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[:meta_end] + b"\xff\xff\xff\xff" * 64


def bundle_with_unparseable(path: Path, good: list[bytes], at: int) -> Path:
    """A bundle of `good` with an unparseable instance inserted at index `at` (its
    manifest entry made by hand: pydicom cannot read its UIDs either)."""
    bad = unparseable_instance()
    with path.open("wb") as f:
        w = BundleWriter(f, "b-1", [KEY.public_key()], "study-1")
        for raw in [*good[:at], bad, *good[at:]]:
            ds = read(raw if raw is not bad else good[0], stop_before_pixels=True)
            uid = "2.25.1234" if raw is bad else str(ds.SOPInstanceUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
            w.begin_instance(InstanceInfo(
                sop_instance_uid=uid, sop_class=str(ds.SOPClassUID), transfer_syntax=ts,
                received_transfer_syntax=ts, received_size=len(raw),
                received_sha256=hashlib.sha256(raw).hexdigest(), action="passthrough"))
            w.write(raw)
            w.end_instance()
        w.close()
    return path


# --- real sends -------------------------------------------------------------------------------


@pytest.mark.peers
def test_a_study_is_delivered_with_identical_pixels_and_attributes(tmp_path: Path, web_pacs: Orthanc) -> None:
    cts = ct_slices(3)
    instances = [*cts, mr_slice(), j2k(ct_slices(4)[3])]
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []
    progress = Progress()
    DicomWebTransport(web_destination(web_pacs.dicomweb_url), KEY).send(
        "b-1", bundle, progress, Plan(delivered=got.append))
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert progress.values[-1] == sum(len(x) for x in instances)
    stored = web_pacs.files_by_sop_uid()
    for raw in instances:
        mine, theirs = read(raw), read(stored[uid_of(raw)])
        assert theirs.file_meta.TransferSyntaxUID == mine.file_meta.TransferSyntaxUID  # sent as is
        assert [e for e in theirs if e.tag != 0x7FE00010] == [e for e in mine if e.tag != 0x7FE00010]
        assert theirs.PixelData == mine.PixelData
        assert np.array_equal(theirs.pixel_array, mine.pixel_array)


@pytest.mark.peers
def test_suspects_go_last_one_per_request(tmp_path: Path, web_pacs: Orthanc) -> None:
    """`plan.last`: the healthy instances first, together; each suspect after them, alone."""
    instances = ct_slices(4)
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []
    with Front(web_pacs.url) as front:
        DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY).send(
            "b-1", bundle, Progress(), Plan(last=frozenset({0, 2}), delivered=got.append))
    assert [s.parts for s in front.seen] == [2, 1, 1]
    assert got == [1, 3, 0, 2] and web_pacs.count() == 4


@pytest.mark.peers
def test_sending_a_bundle_again_is_harmless(tmp_path: Path, web_pacs: Orthanc) -> None:
    """An attempt that failed after some requests is sent whole again: Orthanc answers
    a second copy of an instance as stored, and keeps one."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(3))
    t = DicomWebTransport(web_destination(web_pacs.dicomweb_url), KEY)
    for _ in range(2):
        got: list[int] = []
        t.send("b-1", bundle, Progress(), Plan(delivered=got.append))
        assert sorted(got) == [0, 1, 2]
    assert web_pacs.count() == 3


@pytest.mark.peers
def test_several_instances_go_per_request_up_to_max_request_mb(tmp_path: Path, web_pacs: Orthanc) -> None:
    instances = ct_slices(6)  # ~0.53 MB each: three per 2 MB request
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    with Front(web_pacs.url) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", max_request_mb=2), KEY)
        t.send("b-1", bundle, Progress())
    parts = [s.parts for s in front.seen]
    assert sum(parts) == 6 and len(parts) > 1 and max(parts) > 1
    assert parts == [3, 3] and all(s.length <= 2 * MB for s in front.seen)
    assert web_pacs.count() == 6


@pytest.mark.peers
def test_an_instance_orthanc_cannot_parse_is_parked_and_the_rest_stored(tmp_path: Path,
                                                                        web_pacs: Orthanc) -> None:
    bundle = bundle_with_unparseable(tmp_path / "b.bundle", ct_slices(3), at=2)
    got: list[int] = []
    with pytest.raises(Permanent) as e:
        DicomWebTransport(web_destination(web_pacs.dicomweb_url), KEY).send(
            "b-1", bundle, Progress(), Plan(delivered=got.append))
    assert e.value.instances == (2,) and "instance 2" in str(e.value)
    assert sorted(got) == [0, 1, 3] and web_pacs.count() == 3
    decision = policy.decide(policy.Failure(permanent=True, instances=e.value.instances,
                                            delivered_now=len(got), delivered_before=0))
    assert decision.park == (2,) and decision.action == "again"


@pytest.mark.peers
def test_a_bundle_altered_during_the_send_cuts_the_request_short(tmp_path: Path, web_pacs: Orthanc) -> None:
    """An instance fails its check while its request is being streamed: the request is
    cut short, Orthanc stores nothing of it, the send is Unreadable."""
    instances = ct_slices(6)  # one per request: max_request_mb = 1
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []

    def delivered(index: int) -> None:
        # After the first request, damage the bundle's last chunk: it is read (the
        # chunk before it cannot be opened without knowing it is not the last) while
        # a later instance is streamed.
        got.append(index)
        if index == 0:
            with bundle.open("r+b") as f:
                f.seek(-4096, 2)
                f.write(bytes(4096))
    t = DicomWebTransport(web_destination(web_pacs.dicomweb_url, max_request_mb=1), KEY)
    with pytest.raises(Unreadable):
        t.send("b-1", bundle, Progress(), Plan(delivered=delivered))
    assert 1 <= len(got) < 6 and got == list(range(len(got)))
    assert web_pacs.count() == len(got)  # nothing of the request cut short
    assert web_pacs.find_instance(uid_of(instances[len(got)])) is None


@pytest.mark.peers
def test_the_server_down_is_retryable_and_blames_no_instance(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    t0 = time.monotonic()
    with pytest.raises(Retryable, match="cannot connect to the server") as e:
        DicomWebTransport(web_destination(f"http://127.0.0.1:{free_port()}/dicom-web"), KEY).send(
            "b-1", bundle, Progress())
    assert e.value.instances == () and time.monotonic() - t0 < 5


def test_a_connect_nobody_answers_gives_up_after_link_timeout_not_timeout(tmp_path: Path) -> None:
    """A listener whose accept queue is full: the kernel drops further SYNs, as a silent
    link would. The connect ends after link_timeout_s (2), not timeout_s (30)."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.socket() as queued:
        queued.connect(full.getsockname())  # fills the queue: nothing accepts it
        dest = web_destination(f"http://127.0.0.1:{full.getsockname()[1]}/dicom-web",
                               timeout_s=30.0, link_timeout_s=2.0)
        t0 = time.monotonic()
        with pytest.raises(Retryable, match=r"cannot connect .*: no answer within 2 s \(link_timeout_s\)"):
            DicomWebTransport(dest, KEY).send("b-1", bundle, Progress())
    assert time.monotonic() - t0 < 10


@pytest.mark.peers
def test_a_503_is_retryable_for_the_destination_and_quotes_retry_after(tmp_path: Path,
                                                                       web_pacs: Orthanc) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    with (Front(web_pacs.url, fail=(503, {"Retry-After": "120"})) as front,
          pytest.raises(Retryable, match="HTTP 503.*retry after 120 s") as e):
        DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY).send("b-1", bundle, Progress())
    assert e.value.instances == () and web_pacs.count() == 0
    assert e.value.retry_after_s == 120.0  # the scheduler waits at least that (queue.retry_max_s caps it)


@pytest.mark.peers
def test_a_409_naming_each_instance_parks_the_refused_syntax_and_retries_the_rest(
        tmp_path: Path, web_pacs: Orthanc) -> None:
    """A PACS that stores none of the request (409) and says why per instance: 0xC122
    (transfer syntax not supported) is Permanent for that instance (parked), 0xA700 (out
    of resources) only Retryable (sent again with the rest), and the instance it did not
    name is asked about alone (then stored)."""
    instances = ct_slices(3)
    uids = [uid_of(x) for x in instances]
    body = json.dumps({"00081198": {"vr": "SQ", "Value": [
        _item(uids[1], "00081197", 0xC122), _item(uids[2], "00081197", 0xA700)]}}).encode()
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []
    refusing = Front(web_pacs.url, fail=(409, {"Content-Type": "application/dicom+json"}),
                     fail_body=body, fail_count=1)
    with refusing as front, pytest.raises(Permanent, match="instance 1 .*0xC122: the server does not "
                                                           "accept this transfer syntax") as e:
        DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY).send(
            "b-1", bundle, Progress(), Plan(delivered=got.append))
    assert e.value.instances == (1,) and got == [0]
    assert [s.parts for s in front.seen] == [3, 1] and web_pacs.count() == 1


def _refusing_syntax(uid: str, count: int, web_pacs: Orthanc) -> Front:
    """A server that refuses instance `uid` in its transfer syntax (409, 0xC122) on the
    first `count` requests (Orthanc stores every syntax; real servers do not)."""
    body = json.dumps({"00081198": {"vr": "SQ", "Value": [_item(uid, "00081197", 0xC122)]}}).encode()
    return Front(web_pacs.url, fail=(409, {"Content-Type": "application/dicom+json"}),
                 fail_body=body, fail_count=count)


@pytest.mark.peers
def test_an_instance_refused_in_its_syntax_is_sent_again_converted_with_the_same_pixels(
        tmp_path: Path, web_pacs: Orthanc) -> None:
    """0xC122 for a JPEG 2000 slice: the rest is asked about alone and stored, then the
    slice goes alone in Explicit VR LE, converted in a worker; the PACS holds it with the
    original's UIDs and pixels."""
    cts = ct_slices(3)
    instances = [cts[0], j2k(cts[1]), cts[2]]
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []
    with _refusing_syntax(uid_of(instances[1]), 1, web_pacs) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY)
        try:
            t.send("b-1", bundle, Progress(), Plan(delivered=got.append))
        finally:
            t.close()
    assert sorted(got) == [0, 1, 2] and web_pacs.count() == 3
    assert [s.parts for s in front.seen] == [3, 1, 1, 1]
    oid = web_pacs.find_instance(uid_of(instances[1]))
    assert oid is not None and stored_ts(web_pacs, oid) == ExplicitVRLittleEndian
    stored = web_pacs.instance_file(oid)
    assert_same_pixels(stored, cts[1])
    ds = read(stored, stop_before_pixels=True)
    assert (ds.SOPInstanceUID, ds.StudyInstanceUID) == (read(cts[1]).SOPInstanceUID,
                                                        read(cts[1]).StudyInstanceUID)


@pytest.mark.peers
def test_an_instance_refused_even_converted_is_parked_and_the_converter_is_not_tried_twice(
        tmp_path: Path, web_pacs: Orthanc) -> None:
    slice_ = j2k(ct_slices(1)[0])
    bundle = make_bundle(tmp_path / "b.bundle", [slice_])
    with _refusing_syntax(uid_of(slice_), 2, web_pacs) as front, \
            pytest.raises(Permanent, match="not even converted to Explicit VR Little Endian") as e:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY)
        try:
            t.send("b-1", bundle, Progress())
        finally:
            t.close()
    assert e.value.instances == (0,) and [s.parts for s in front.seen] == [1, 1]
    assert web_pacs.count() == 0


@pytest.mark.peers
def test_a_413_makes_the_requests_smaller(tmp_path: Path, web_pacs: Orthanc) -> None:
    instances = ct_slices(4)  # ~0.5 MB each
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []
    with Front(web_pacs.url, max_body=int(1.2 * MB)) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY)
        t.send("b-1", bundle, Progress(), Plan(delivered=got.append))
    assert front.seen[0].parts == 4  # refused whole, then sent smaller
    assert sorted(got) == [0, 1, 2, 3] and web_pacs.count() == 4
    assert t.limit < 64 * MB


@pytest.mark.peers
def test_a_bearer_token_is_sent_from_its_file(tmp_path: Path, web_pacs: Orthanc) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-T0ken.value\n")
    token.chmod(0o600)
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    with Front(web_pacs.url, token="s3cr3t-T0ken.value") as front:  # noqa: S106 - a test token
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", token_file=token), KEY)
        t.send("b-1", bundle, Progress())
        assert t.probe() is True
    assert [s.authorization for s in front.seen] == ["Bearer s3cr3t-T0ken.value"] * 2
    assert web_pacs.count() == 2


@pytest.mark.peers
def test_a_refused_token_is_permanent_and_never_echoed(tmp_path: Path, web_pacs: Orthanc) -> None:
    token = tmp_path / "token"
    token.write_text("old-token")
    token.chmod(0o600)
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    with Front(web_pacs.url, token="new-token") as front:  # noqa: S106 - a test token
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", token_file=token), KEY)
        with pytest.raises(Permanent, match="HTTP 401.*bearer token in") as e:
            t.send("b-1", bundle, Progress())
        assert t.probe() is False
    assert e.value.instances == () and "old-token" not in str(e.value)


@pytest.mark.peers
def test_an_answer_given_before_the_body_was_read_is_used(tmp_path: Path, web_pacs: Orthanc) -> None:
    """A server (or proxy) that answers 401 from the headers and closes while 10 MB are
    still being written: the transport reads that answer instead of reporting a reset."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(20))
    with Front(web_pacs.url, early=401) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web"), KEY)
        with pytest.raises(Permanent, match="HTTP 401 .*set token_file") as e:
            t.send("b-1", bundle, Progress())
    assert e.value.instances == () and web_pacs.count() == 0


def test_a_token_file_that_is_not_a_token_is_a_config_error(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("two words")
    token.chmod(0o600)
    with pytest.raises(ConfigError, match="does not hold one token") as e:
        DicomWebTransport(web_destination("http://127.0.0.1:1/dw", token_file=token), KEY)
    assert "two words" not in str(e.value)


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token")
    token.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others .* chmod 600"):
        DicomWebTransport(web_destination("http://127.0.0.1:1/dw", token_file=token), KEY)


@pytest.mark.peers
def test_a_stalled_server_is_cancelled_within_a_second(tmp_path: Path, web_pacs: Orthanc) -> None:
    """A server that reads nothing: the transport blocks writing a 10 MB request (more
    than the socket buffers hold) until the attempt is cancelled."""
    instances = ct_slices(20)
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    got: list[int] = []
    plan = Plan(delivered=got.append)
    progress = Progress()
    with Front(web_pacs.url, stall=threading.Event()) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", timeout_s=60), KEY)
        timer = threading.Timer(1.0, plan.cancelled.set)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(Retryable, match="time budget") as e:
            t.send("b-1", bundle, progress, plan)
        assert time.monotonic() - t0 < 3
    assert progress.values[-1] < sum(len(x) for x in instances)  # it was stuck writing
    assert e.value.instances == () and got == [] and web_pacs.count() == 0


@pytest.mark.peers
def test_a_stalled_server_times_out(tmp_path: Path, web_pacs: Orthanc) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with Front(web_pacs.url, stall=threading.Event()) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", timeout_s=1.5), KEY)
        t0 = time.monotonic()
        with pytest.raises(Retryable, match="no progress .* within 1.5 s") as e:
            t.send("b-1", bundle, Progress())
        assert 1.0 < time.monotonic() - t0 < 6
    assert e.value.instances == ()


# --- HTTPS (TLS terminated by the front: Orthanc 1.10.1 crashes serving HTTPS) ----------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_front(pacs: Orthanc, pki: PKI) -> Front:
    d = pki.dir
    return Front(pacs.url, tls=(d / "pacs.crt", d / "pacs.key", d / "ca.crt"))


@pytest.mark.peers
def test_https_with_mutual_tls_delivers(tmp_path: Path, web_pacs: Orthanc, pki: PKI) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    got: list[int] = []
    with tls_front(web_pacs, pki) as front:
        dest = web_destination(front.url + "/dicom-web", tls=pki.client(), plaintext=False)
        t = DicomWebTransport(dest, KEY)
        t.send("b-1", bundle, Progress(), Plan(delivered=got.append))
        assert t.probe() is True
    assert sorted(got) == [0, 1] and web_pacs.count() == 2


@pytest.mark.peers
def test_a_server_certificate_from_an_unknown_ca_is_permanent(tmp_path: Path, web_pacs: Orthanc,
                                                            pki: PKI) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with tls_front(web_pacs, pki) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", tls=pki.client("edge", "rogue-ca"),
                                              plaintext=False), KEY)
        with pytest.raises(Permanent, match="certificate was not accepted") as e:
            t.send("b-1", bundle, Progress())
        assert t.probe() is False
    assert e.value.instances == () and web_pacs.count() == 0


@pytest.mark.peers
def test_a_client_certificate_the_server_does_not_trust_is_permanent(tmp_path: Path, web_pacs: Orthanc,
                                                                       pki: PKI) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with tls_front(web_pacs, pki) as front:
        t = DicomWebTransport(web_destination(front.url + "/dicom-web", tls=pki.client("rogue", "ca"),
                                              plaintext=False), KEY)
        with pytest.raises(Permanent, match="rejected this appliance's TLS client certificate") as e:
            t.send("b-1", bundle, Progress())
    assert e.value.instances == () and web_pacs.count() == 0


# --- the real daemon ----------------------------------------------------------------------------


@pytest.mark.peers
def test_the_daemon_delivers_a_series_by_stow_rs(appliance_factory: Any, web_pacs: Orthanc,
                                                 tmp_path: Path) -> None:
    """`appliance run` with a dicomweb destination: a series sent by storescu is packed
    (JPEG 2000 lossless), sent by STOW-RS, and Orthanc holds every instance unchanged."""
    files = sorted((SAMPLES / "series" / "MR_Philips_abdomen_11sl").iterdir())
    root = tmp_path / "app"
    dest = {"name": "web", "transport": "dicomweb", "url": web_pacs.dicomweb_url, "plaintext": True,
            "timeout_s": 10}
    app = appliance_factory(appliance_config(root, free_port(), dest), root=root)
    run = finish_storescu(popen_storescu(app.port, files, tmp_path / "s.log"), files, tmp_path / "s.log")
    assert len(run.acked) == len(files), run.stderr[-2000:]
    wait_for(lambda: settled(app.state_dir), 120, "delivery by STOW-RS",
             detail=lambda: str(queue_db(app.state_dir)))
    assert web_pacs.count() == len(files)
    for f in files:
        oid = web_pacs.find_instance(uid_of(f.read_bytes()))
        assert oid is not None
        cmp, category = compare_instance(f, web_pacs.instance_file(oid), CODEC_SYNTAX["jpeg2000"])
        assert cmp.problems == [] and category == "compressed", (f.name, cmp.problems)

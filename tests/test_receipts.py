"""End-to-end receipts on the site side (forward.receipts): the queue's receipt columns
(schema v6) and their migration, the checks a receipt must pass, the poll schedule, and
the poller against a real queue with an in-memory receipt source (the real SFTP drop,
`appliance ingest` and Orthanc are in test_receipts_peers.py)."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from appliance.core.config import Destination
from appliance.core.errors import EX_CONFIG
from appliance.forward import Retryable
from appliance.forward import receipts as rc
from appliance.ingest import receipt as receipts
from appliance.ingest.receipt import InstanceOutcome, Receipt, ReceiptError
from appliance.queue import index as db
from appliance.queue import routes
from appliance.queue.index import Index, open_index
from appliance.queue.store import Queue
from tests.peers import base_config, cli, to_toml

CENTER = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
BUNDLE = b"the encrypted bundle as uploaded"
SHA = hashlib.sha256(BUNDLE).hexdigest()


def _queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path, open_index(tmp_path))


def _delivered(q: Queue, item_id: str, dest: str = "center", at: float = 1000.0,
               instances: int = 3) -> None:
    with q.index.tx() as c:
        c.execute("INSERT INTO segments(id, study_key, state, created, updated, instances, bytes)"
                  " VALUES (?,?,'ready',?,?,?,10)", (item_id, "k" * 16, at, at, instances))
    q.path(item_id).write_bytes(BUNDLE)
    q.activate(item_id, dest)
    q.delivered(item_id, at)


def _copy_delivered(q: Queue, bundle_id: str, dest: str = "archive", at: float = 1000.0) -> str:
    """A bundle (delivered nowhere yet) and its copy for copy destination `dest`,
    delivered there; returns the copy's item id."""
    with q.index.tx() as c:
        c.execute("INSERT INTO segments(id, study_key, state, created, updated, instances, bytes)"
                  " VALUES (?,?,'ready',?,?,3,10)", (bundle_id, "k" * 16, at, at))
    q.path(bundle_id).write_bytes(BUNDLE)
    assert q.make_copies([dest], at) == 1
    copy = routes.copy_id(bundle_id, dest)
    q.activate(copy, dest)
    q.delivered(copy, at)
    return copy


def signed(bundle_id: str, verdict: str = "stored", sha: str = SHA,
           key: Ed25519PrivateKey = CENTER, n: int = 3, failed: int = 0) -> bytes:
    outcomes = tuple(InstanceOutcome(i, "failed", "permanent", "refused") if i < failed
                     else InstanceOutcome(i, "stored") for i in range(n))
    return receipts.sign(Receipt(bundle_id, sha, "rc-test", "2026-12-07T05:00:00Z", verdict,
                                 outcomes), key)


# --- the queue's receipt columns and the migration from schema 5 ------------------------


def _v5(path: Path) -> None:
    conn = sqlite3.connect(path)
    for script in db._SCHEMA[:5]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version=5")
    conn.execute("INSERT INTO segments(id, study_key, state, created, updated, destination,"
                 " delivered, instances) VALUES ('mm01', ?, 'delivered', 1, 2, 'center', 5.0, 2)",
                 ("k" * 16,))
    conn.execute("INSERT INTO deliveries(item_id, destination, state, attempts, updated, delivered)"
                 " VALUES ('mm01', 'center', 'delivered', 1, 5.0, 5.0)")
    conn.commit()
    conn.close()


def test_a_v5_index_migrates_to_v6_and_its_delivered_bundles_await_a_receipt(tmp_path: Path) -> None:
    _v5(tmp_path / "queue.db")
    q = Queue(tmp_path, Index(tmp_path / "queue.db"))
    assert q.index.query("PRAGMA user_version")[0][0] == db.SCHEMA_VERSION >= 6
    [d] = q.deliveries("mm01")
    assert (d["state"], d["delivered"], d["receipt"], d["receipt_at"]) == ("delivered", 5.0, None, None)
    assert [a.item_id for a in q.awaiting_receipts("center", 10)] == ["mm01"]


def test_a_recorded_receipt_counts_once_and_the_bundle_no_longer_awaits_one(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _delivered(q, "aa01")
    assert q.record_receipt("aa01", "center", "partial", 2, 1, "rc-test", 2000.0)
    assert not q.record_receipt("aa01", "center", "stored", 3, 0, "rc-test", 2001.0)
    [d] = q.deliveries("aa01")
    assert (d["receipt"], d["receipt_stored"], d["receipt_failed"], d["receipt_center"],
            d["receipt_at"]) == ("partial", 2, 1, "rc-test", 2000.0)
    assert q.awaiting_receipts("center", 10) == []


def test_a_receipt_for_a_bundle_not_delivered_there_is_not_recorded(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _delivered(q, "aa02", dest="backup")
    assert not q.record_receipt("aa02", "center", "stored", 3, 0, "rc-test", 2000.0)
    assert q.deliveries("aa02")[0]["receipt"] is None


def test_overdue_counts_only_bundles_delivered_before_the_limit_without_a_receipt(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    for item_id, at in (("bb01", 100.0), ("bb02", 200.0), ("bb03", 900.0)):
        _delivered(q, item_id, at=at)
    q.record_receipt("bb01", "center", "stored", 3, 0, "rc-test", 950.0)
    assert q.receipts_awaited("center", delivered_before=500.0) == (2, 1)
    assert q.receipts_awaited("backup", delivered_before=500.0) == (0, 0)


def test_awaiting_receipts_are_the_most_recently_delivered_first_up_to_the_limit(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    for i, at in enumerate((100.0, 300.0, 200.0)):
        _delivered(q, f"cc0{i}", at=at)
    assert [a.item_id for a in q.awaiting_receipts("center", 2)] == ["cc01", "cc02"]


def test_a_copy_delivered_to_a_copy_destination_awaits_its_bundles_receipt_there(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    copy = _copy_delivered(q, "cd01")
    [a] = q.awaiting_receipts("archive", 10)
    assert (a.item_id, a.bundle_id, a.instances) == (copy, "cd01", 3)
    assert q.awaiting_receipts("center", 10) == []
    assert q.receipts_awaited("archive", delivered_before=2000.0) == (1, 1)
    assert q.record_receipt(copy, "archive", "stored", 3, 0, "rc-test", 2000.0)
    assert q.awaiting_receipts("archive", 10) == []


def test_a_parked_instance_of_a_copy_awaits_no_receipt(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    copy = _copy_delivered(q, "cd02")
    with q.index.tx() as c:  # as open_parked makes it: the copy's file, one index
        c.execute("INSERT INTO segments(id, study_key, state, created, updated, instances, bytes,"
                  " parent, only_index, copy_to, copied) VALUES ('cd02p1',?,'ready',1,1,1,1,"
                  "'cd02',1,'archive',1)", ("k" * 16,))
    q.activate("cd02p1", "archive")
    q.delivered("cd02p1", 1100.0)
    assert [a.item_id for a in q.awaiting_receipts("archive", 10)] == [copy]


# --- what a receipt must be to be trusted ------------------------------------------------


def _judge(data: bytes, cap: int = 1 << 20) -> Receipt:
    return rc.judge(data, [CENTER.public_key()], "aa01", cap, lambda: SHA)


def test_a_receipt_signed_by_the_center_for_this_bundle_and_copy_is_trusted() -> None:
    r = _judge(signed("aa01", "partial", failed=1))
    assert (r.verdict, rc.counts(r)) == ("partial", (2, 1))


@pytest.mark.parametrize(("data", "why"), [
    (signed("aa01", key=STRANGER), "not trusted"),
    (signed("aa01").replace(b'"stored"', b'"failed"', 1), "does not verify"),
    (signed("zz99"), "another bundle"),
    (signed("aa01", sha="0" * 64), "another copy"),
    (signed("aa01") + b" " * 10_000, "larger than"),
    (b"\x00not json", "not valid JSON"),
], ids=["other-key", "altered", "other-bundle", "other-copy", "too-large", "garbage"])
def test_a_receipt_that_fails_a_check_is_refused_saying_which(data: bytes, why: str) -> None:
    with pytest.raises(ReceiptError, match=why):
        _judge(data, cap=len(signed("aa01")) + 100)


def test_the_bundle_is_hashed_only_once_the_signature_verified() -> None:
    def never() -> str:
        raise AssertionError("hashed a receipt that does not verify")
    with pytest.raises(ReceiptError):
        rc.judge(signed("aa01", key=STRANGER), [CENTER.public_key()], "aa01", 1 << 20, never)


@pytest.mark.parametrize(("age", "interval"), [(0, 5.0), (10, 5.0), (40, 10.0), (600, 150.0),
                                               (86400, 300.0)])
def test_a_bundle_is_checked_more_rarely_as_it_ages(age: float, interval: float) -> None:
    assert rc.check_interval(age) == interval


@pytest.mark.parametrize(("failures", "delay"), [(1, 5.0), (2, 10.0), (4, 40.0), (30, 300.0)])
def test_a_destination_whose_rounds_fail_is_backed_off(failures: int, delay: float) -> None:
    assert rc.retry_delay(failures) == delay


def test_the_receipt_cap_grows_with_the_instances_up_to_the_formats_limit() -> None:
    assert rc.receipt_cap(1) < rc.receipt_cap(100) < rc.receipt_cap(10**6) == receipts.MAX_RECEIPT
    # a receipt with the longest reason for every instance fits its cap
    long = tuple(InstanceOutcome(i, "failed", "permanent", "x" * receipts.MAX_REASON)
                 for i in range(50))
    data = receipts.sign(Receipt("aa01", SHA, "c" * 63, "2026-12-07T05:00:00Z", "failed", long,
                                 "r" * receipts.MAX_REASON), CENTER)
    assert len(data) <= rc.receipt_cap(50)


# --- the poller, with an in-memory source --------------------------------------------------


class Source:
    """Receipts by bundle id, as the drop would serve them; or a failure."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: Exception | None = None
        self.asked: list[list[str]] = []

    def read_receipts(self, wanted: Sequence[tuple[str, int]], cancelled: threading.Event,
                      beat: Callable[[], None]) -> dict[str, bytes | None]:
        self.asked.append([w[0] for w in wanted])
        if self.fail is not None:
            raise self.fail
        return {bid: self.files.get(bid, b"")[:cap + 1] or None for bid, cap in wanted}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _poller(tmp_path: Path, q: Queue, source: Source, clock: Clock) -> rc.ReceiptPoller:
    pub = tmp_path / "center.pub"
    pub.write_bytes(receipts.public_pem(CENTER))
    dest = Destination(name="center", transport="sftp", receipt_key=pub, receipt_overdue_s=600)
    return rc.ReceiptPoller(q, [(dest, source)], clock=clock)


def test_the_poller_records_a_trusted_receipt_and_the_bundle_shows_stored(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    _delivered(q, "dd01")
    src.files["dd01"] = signed("dd01")
    with capture_logs() as logs:
        assert _poller(tmp_path, q, src, clock).step()
    assert q.deliveries("dd01")[0]["receipt"] == "stored"
    assert [e for e in logs if e["event"] == "receipt.stored"] == [
        {"event": "receipt.stored", "log_level": "info", "bundle": "dd01", "destination": "center",
         "verdict": "stored", "stored": 3, "failed": 0}]


def test_a_partial_receipt_is_a_warning_with_opaque_ids_and_counts_only(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    _delivered(q, "dd02")
    src.files["dd02"] = signed("dd02", "partial", failed=1)
    with capture_logs() as logs:
        _poller(tmp_path, q, src, clock).step()
    [e] = [e for e in logs if e["event"].startswith("receipt.")]
    assert e == {"event": "receipt.partial", "log_level": "warning", "bundle": "dd02",
                 "destination": "center", "verdict": "partial", "stored": 2, "failed": 1}


def test_a_forged_receipt_is_ignored_and_logged_once_however_often_it_is_read(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    _delivered(q, "dd03")
    src.files["dd03"] = signed("dd03", key=STRANGER)
    poller = _poller(tmp_path, q, src, clock)
    with capture_logs() as logs:
        for _ in range(3):
            assert not poller.step()
            clock.t += 60
    assert len(src.asked) == 3  # read each time it was due ...
    assert [e["event"] for e in logs] == ["receipt.ignored"]  # ... said once
    assert logs[0]["why"] == "receipt is signed by a key that is not trusted"
    assert q.deliveries("dd03")[0]["receipt"] is None


def _copy_poller(tmp_path: Path, q: Queue, source: Source, clock: Clock) -> rc.ReceiptPoller:
    pub = tmp_path / "center.pub"
    pub.write_bytes(receipts.public_pem(CENTER))
    dest = Destination(name="archive", transport="sftp", receipt_key=pub, mode="copy")
    return rc.ReceiptPoller(q, [(dest, source)], clock=clock)


def test_the_poller_reads_a_copys_receipt_by_its_bundle_and_records_it_for_the_copy(
        tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    copy = _copy_delivered(q, "dd11")
    src.files["dd11"] = signed("dd11")
    with capture_logs() as logs:
        assert _copy_poller(tmp_path, q, src, clock).step()
    assert src.asked == [["dd11"]]
    assert q.deliveries(copy)[0]["receipt"] == "stored"
    assert q.deliveries("dd11") == []  # the bundle itself went nowhere yet
    assert [e for e in logs if e["event"] == "receipt.stored"] == [
        {"event": "receipt.stored", "log_level": "info", "bundle": copy, "copy_of": "dd11",
         "destination": "archive", "verdict": "stored", "stored": 3, "failed": 0}]


def test_a_receipt_for_a_copy_of_another_bundle_file_is_ignored(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    copy = _copy_delivered(q, "dd12")
    src.files["dd12"] = signed("dd12", sha=hashlib.sha256(b"another upload").hexdigest())
    with capture_logs() as logs:
        assert not _copy_poller(tmp_path, q, src, clock).step()
    [e] = [e for e in logs if e["event"].startswith("receipt.")]
    assert (e["event"], e["bundle"], e["why"]) == (
        "receipt.ignored", copy, "receipt is for another copy of the bundle (its SHA-256 differs)")
    assert q.deliveries(copy)[0]["receipt"] is None


def test_a_bundle_is_not_read_again_before_its_interval(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    _delivered(q, "dd04")
    poller = _poller(tmp_path, q, src, clock)
    poller.step()
    clock.t += 4
    poller.step()
    assert src.asked == [["dd04"]]
    clock.t += 1
    poller.step()
    assert src.asked == [["dd04"], ["dd04"]]


def test_a_round_reads_at_most_per_round_receipts_least_recently_checked_first(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(5000.0)
    for i in range(rc.PER_ROUND + 5):
        _delivered(q, f"ee{i:03d}", at=1000.0 + i)
    poller = _poller(tmp_path, q, src, clock)
    poller.step()
    clock.t += rc.MAX_CHECK_S
    poller.step()
    assert len(src.asked[0]) == rc.PER_ROUND
    assert set(src.asked[0]).isdisjoint(src.asked[1][:5])  # the 5 left over go first


def test_a_failing_round_is_logged_and_the_destination_backed_off(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1010.0)
    _delivered(q, "dd05")
    src.fail = Retryable("127.0.0.1:22 refused the connection")
    poller = _poller(tmp_path, q, src, clock)
    with capture_logs() as logs:
        poller.step()
        clock.t += 4
        poller.step()  # backed off 5 s: not tried
        clock.t += 1
        poller.step()
    assert len(src.asked) == 2
    assert [e["event"] for e in logs] == ["receipt.check_failed"]  # the same reason: said once
    assert poller.snapshot(clock.t)[0]["last_error"] == "127.0.0.1:22 refused the connection"


def test_the_snapshot_counts_bundles_awaiting_a_receipt_and_those_overdue(tmp_path: Path) -> None:
    q, src = _queue(tmp_path), Source()
    _delivered(q, "ff01", at=1000.0)
    _delivered(q, "ff02", at=1500.0)
    assert _poller(tmp_path, q, src, Clock(0)).snapshot(now=1700.0) == [
        {"destination": "center", "awaiting": 2, "overdue": 1, "overdue_after_s": 600.0,
         "last_error": None}]


def test_a_receipt_for_a_bundle_whose_file_is_gone_is_ignored(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(time.time())
    _delivered(q, "ff03", at=clock.t - 10)
    q.path("ff03").unlink()
    src.files["ff03"] = signed("ff03")
    with capture_logs() as logs:
        assert not _poller(tmp_path, q, src, clock).step()
    assert [(e["event"], e["why"]) for e in logs] == [("receipt.ignored", "our copy of the bundle is gone")]


def test_a_bundle_without_a_receipt_past_the_overdue_limit_is_logged_once(tmp_path: Path) -> None:
    q, src, clock = _queue(tmp_path), Source(), Clock(1500.0)
    _delivered(q, "gg01", at=1000.0)
    _delivered(q, "gg02", at=1400.0)
    poller = _poller(tmp_path, q, src, clock)  # receipt_overdue_s = 600
    with capture_logs() as logs:
        poller.step()
        clock.t = 1700.0
        poller.step()
        clock.t = 2000.0
        poller.step()
    assert [(e["event"], e["bundle"], e["uploaded_s_ago"]) for e in logs] == [
        ("receipt.overdue", "gg01", 700)]


def test_reading_receipts_from_a_server_that_never_answers_stops_when_cancelled() -> None:
    from appliance.forward.sftp import SftpTransport
    from tests.test_transport_contract import KEY

    with socket.socket() as silent:  # connects, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        dest = Destination(name="center", transport="sftp", host="127.0.0.1",
                           port=silent.getsockname()[1], user="edge", key=Path("/nonexistent"),
                           host_key_sha256="SHA256:" + "A" * 43, timeout_s=60)
        cancelled = threading.Event()
        threading.Timer(0.5, cancelled.set).start()
        t0 = time.monotonic()
        with pytest.raises(Retryable, match="ran out of its time budget"):
            SftpTransport(dest, KEY).read_receipts([("aa01", 1000)], cancelled)
        assert time.monotonic() - t0 < 10  # not the 60 s timeout_s


def test_a_receipt_the_sftp_account_may_not_read_is_logged_and_skipped() -> None:
    from appliance.forward.sftp import _read_capped

    class Denying:  # the tests' sshd runs sessions as root, who may read any file
        def open(self, path: str, mode: str) -> None:
            raise PermissionError(13, "Permission denied")

    with capture_logs() as logs:
        assert _read_capped(Denying(), "/drop/receipts/aa01.receipt.json", 100) is None  # type: ignore[arg-type]
    assert [(e["event"], e["file"]) for e in logs] == [("receipt.unreadable", "aa01.receipt.json")]


def _checked_with_receipt_key(tmp_path: Path, pub: Path | None) -> tuple[Path, Any]:
    """`config check` of a site with an sftp destination whose receipt_key is `pub` (None:
    the appliance's own X25519 public key, the wrong kind)."""
    from tests.sshd import keygen
    from tests.test_cli import sftp_site

    kind, blob = keygen(tmp_path / "host").with_suffix(".pub").read_text().split()[:2]
    site = base_config(tmp_path, 11112)
    path = Path(sftp_site(tmp_path, site, f"[upload.example]:2222 {kind} {blob}\n"))
    key = pub or tmp_path / "keys" / "appliance.pub"
    site["destinations"][0]["receipt_key"] = str(key)
    path.write_text(to_toml(site))
    return key, cli("config", "check", "--config", str(path))


def test_config_check_accepts_the_centers_ed25519_public_key_as_receipt_key(tmp_path: Path) -> None:
    pub = tmp_path / "center-receipts.pub"
    pub.write_bytes(receipts.public_pem(CENTER))
    _, r = _checked_with_receipt_key(tmp_path, pub)
    assert r.returncode == 0, r.stderr


def test_config_check_refuses_a_receipt_key_that_is_not_ed25519(tmp_path: Path) -> None:
    key, r = _checked_with_receipt_key(tmp_path, None)
    assert r.returncode == EX_CONFIG
    assert f"destinations[0].receipt_key: key file {key} is not an Ed25519 public key" in r.stderr

"""`appliance ingest` at the reading center, with real peers.

The site: a real appliance daemon (`appliance run`) whose `directory` destination is the
center's drop folder (the files the sftp transport leaves there are the same: complete
`<id>.bundle`), fed by DCMTK storescu and pynetdicom. Its bundles are made once per
module (`site`): three studies, at most three instances per bundle, so there are several
bundles to share out; each test copies the bundles it needs into a drop folder of its own.
The center: `appliance ingest --once` as a subprocess, storing into a real Orthanc 1.10.1
(TCP_NODELAY=1). What Orthanc stored is read back over its REST API and compared with the
original files element by element and pixel by pixel (`e2e_support.compare_instance`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.uid import UID, generate_uid
from pynetdicom import AE

from appliance.bundle.format import read_manifest
from appliance.core import crypto
from appliance.ingest import receipt as receipts
from appliance.ingest.receipt import Receipt
from tests.e2e_support import J2K_LOSSLESS, appliance_config, compare_instance, read_dataset, settled
from tests.orthanc import Orthanc
from tests.peers import REPO, Appliance, free_port, storescu, to_toml, wait_for
from tests.test_forward_dicom import PKI
from tests.test_watchdog import NotifySocket

pytestmark = pytest.mark.peers

PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # a storage SOP class Orthanc 1.10.1 does not know
SAMPLES_DIR = REPO.parent / "shared" / "dicom-samples" / "series"
ONCE_TIMEOUT_S = 180


# --- the site: bundles made by a real appliance ----------------------------------------------


@dataclass
class Site:
    keys: Path  # center.key / center.pub / sign.key / sign.pub
    bundles: dict[str, Path]  # bundle id -> file (never dropped itself: tests copy it)
    members: dict[str, list[str]]  # bundle id -> SOP Instance UIDs, in manifest order
    originals: dict[str, Path]  # SOP Instance UID -> the file the modality sent
    studies: dict[str, list[str]] = field(default_factory=dict)  # study -> bundle ids

    def of(self, study: str) -> list[str]:
        return self.studies[study]


def _study(sources: list[Path], out: Path, patient: str) -> list[Path]:
    """Copies of `sources` as one new study (fresh Study/Series/SOP Instance UIDs)."""
    out.mkdir(parents=True)
    study, series, paths = generate_uid(), generate_uid(), []
    for i, src in enumerate(sources):
        ds = read_dataset(src)
        ds.PatientID = patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f"{i:03d}.dcm", enforce_file_format=True)
        paths.append(out / f"{i:03d}.dcm")
    return paths


def _series(name: str) -> list[Path]:
    return sorted(p for p in (SAMPLES_DIR / name).iterdir() if p.is_file())


def _send_with_pynetdicom(port: int, files: list[Path]) -> None:
    """One association (DCMTK's storescu does not know the Photoacoustic SOP class)."""
    scu = AE(ae_title="MODALITY")
    for f in files:
        ds = read_dataset(f)
        scu.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = scu.associate("127.0.0.1", port, ae_title="EDGE")
    assert assoc.is_established
    try:
        for f in files:
            assert assoc.send_c_store(f).Status == 0x0000
    finally:
        assoc.release()


def _center_keys(keys: Path) -> None:
    keys.mkdir(parents=True)
    crypto.create_keypair(keys / "center.key", keys / "center.pub")
    signer = Ed25519PrivateKey.generate()
    (keys / "sign.key").write_bytes(receipts.private_pem(signer))
    (keys / "sign.key").chmod(0o600)
    (keys / "sign.pub").write_bytes(receipts.public_pem(signer))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    _center_keys(root / "keys")
    outbox = root / "outbox"
    outbox.mkdir()
    cfg = appliance_config(root / "app", free_port(),
                           {"name": "center", "transport": "directory", "path": str(outbox)},
                           segment_max_instances=3, segment_max_age_s=60, study_quiet_s=2)
    cfg["encryption"]["recipients"] = [str(root / "keys" / "center.pub")]
    app = Appliance(root / "app", cfg).start()
    try:
        mr = _study(_series("MR_Philips_abdomen_11sl"), root / "mr", "INGEST-MR")
        ct = _study(_series("CT_Philips_Ingenuity_phantom_28sl")[:6], root / "ct", "INGEST-CT")
        odd = _study(_series("CT_Philips_Ingenuity_phantom_28sl")[6:9], root / "odd", "INGEST-ODD")
        ds = read_dataset(odd[1])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(PHOTOACOUSTIC)
        ds.save_as(odd[1], enforce_file_format=True)
        for files in (mr, ct):
            r = storescu(app.port, files)
            assert r.returncode == 0, r.stderr
        _send_with_pynetdicom(app.port, odd)
        wait_for(lambda: settled(app.state_dir), 120, "the appliance to deliver every bundle",
                 detail=app.log_text)
    finally:
        app.stop()
    key = crypto.load_private_key(root / "keys" / "center.key")
    s = Site(root / "keys", {}, {}, {})
    for study, files in (("mr", mr), ("ct", ct), ("odd", odd)):
        for f in files:
            s.originals[str(read_dataset(f).SOPInstanceUID)] = f
        uids = {str(read_dataset(f).SOPInstanceUID) for f in files}
        s.studies[study] = []
        for p in sorted(outbox.glob("*.bundle")):
            with p.open("rb") as fh:
                m = read_manifest(fh, key)
            if {e.sop_instance_uid for e in m.instances} <= uids:
                s.bundles[m.bundle_id] = p
                s.members[m.bundle_id] = [e.sop_instance_uid for e in m.instances]
                s.studies[study].append(m.bundle_id)
    assert sum(len(v) for v in s.members.values()) == 11 + 6 + 3
    yield s


# --- the center ------------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    counts: dict[str, int]
    events: list[dict[str, Any]]
    output: str


class Center:
    def __init__(self, root: Path, keys: Path, pacs_port: int, pacs: dict[str, Any] | None = None,
                 **ingest: Any) -> None:
        self.root = root
        self.drop = root / "drop"
        self.state = root / "state"
        self.drop.mkdir(parents=True)
        self.keys = keys
        cfg = {"ingest": {"name": "rc-test", "drop_dir": str(self.drop), "state_dir": str(self.state),
                          "key": str(keys / "center.key"), "signing_key": str(keys / "sign.key"),
                          "poll_s": 0.2, "retry_min_s": 0.2, "retry_max_s": 1,
                          "log_format": "json", **ingest,
                          "pacs": {"host": "127.0.0.1", "port": pacs_port, "ae_title": "ORTHANC",
                                   "timeout_s": 10, **(pacs or {"plaintext": True})}}}
        self.config = root / "center.toml"
        self.config.write_text(to_toml(cfg))
        self.runs = 0

    def drop_bundle(self, bundle: Path, bundle_id: str) -> Path:
        """Copy as an uploader does: a temp name, then the rename that makes it complete."""
        tmp = self.drop / f"{bundle_id}.bundle.part"
        shutil.copyfile(bundle, tmp)
        target = self.drop / f"{bundle_id}.bundle"
        os.rename(tmp, target)
        return target

    def popen(self, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "appliance", "ingest", "--once", "--config",
                                 str(self.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO, start_new_session=True, env={**os.environ, **env})

    def finish(self, p: subprocess.Popen[str]) -> Run:
        try:
            out, _ = p.communicate(timeout=ONCE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError(f"ingest --once did not end within {ONCE_TIMEOUT_S} s:\n{out}") from None
        self.runs += 1
        (self.root / f"ingest-{self.runs}.log").write_text(out)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        events = [json.loads(ln) for ln in lines[:-1]]
        counts = json.loads(lines[-1]) if lines and p.returncode == 0 else {}
        return Run(p.returncode, counts, events, out)

    def once(self) -> Run:
        r = self.finish(self.popen())
        assert r.returncode == 0, r.output
        return r

    def receipt(self, bundle_id: str) -> Receipt:
        data = receipts.path_for(self.drop, bundle_id).read_bytes()
        return receipts.parse(data, [receipts.load_verify_key(self.keys / "sign.pub")])


@pytest.fixture
def pacs_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Orthanc] = []

    def make(start: bool = True, **kw: Any) -> Orthanc:
        p = Orthanc(tmp_path / f"orthanc{len(made)}", **kw)
        made.append(p)
        return p.start() if start else p

    yield make
    for p in made:
        p.stop()


class Holder:
    """Another process that takes a lock (`code` sets `ok`) and holds it until killed."""

    def __init__(self, tmp_path: Path, code: str, *args: str) -> None:
        flag = tmp_path / f"holder-{os.urandom(4).hex()}"
        script = ("import sys, time\nfrom pathlib import Path\na = sys.argv[1:]\n" + code
                  + "Path(a[-1]).write_text('held' if ok else 'lost')\ntime.sleep(600)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args, str(flag)], cwd=REPO,
                                     start_new_session=True)
        wait_for(flag.exists, 30, "the other process's lock")
        assert flag.read_text() == "held"

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def stored_uids(pacs: Orthanc) -> collections.Counter[str]:
    return collections.Counter(str(i["MainDicomTags"]["SOPInstanceUID"])
                               for i in pacs.get("/instances?expand"))


def new_instance_changes(pacs: Orthanc) -> int:
    """How many times Orthanc stored a new instance (a second store of one is not one)."""
    changes = pacs.get("/changes?limit=10000")["Changes"]
    return sum(c["ChangeType"] == "NewInstance" for c in changes)


# --- the tests -------------------------------------------------------------------------------


def test_every_instance_of_the_site_studies_reaches_orthanc_unchanged(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    ids = site.of("mr") + site.of("ct")
    for bid in ids:
        center.drop_bundle(site.bundles[bid], bid)
    run = center.once()
    assert run.counts == {"stored": len(ids)}, run.output
    uids = [u for bid in ids for u in site.members[bid]]
    assert stored_uids(pacs) == collections.Counter(uids)
    for uid in uids:
        oid = pacs.find_instance(uid)
        assert oid is not None
        cmp, _ = compare_instance(site.originals[uid], pacs.instance_file(oid), J2K_LOSSLESS)
        assert cmp.problems == [], (site.originals[uid].name, cmp.problems)
    assert sorted(p.name for p in (center.state / "done").iterdir()) == sorted(f"{b}.bundle" for b in ids)
    assert list((center.state / "claimed").iterdir()) == [] and list(center.drop.glob("*.bundle")) == []


def test_the_receipt_is_signed_and_says_per_instance_index_what_was_stored(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("mr")[0]
    center.drop_bundle(site.bundles[bid], bid)
    center.once()
    rec = center.receipt(bid)  # parse() checks the Ed25519 signature
    n = len(site.members[bid])
    assert (rec.bundle_id, rec.verdict, rec.center) == (bid, "stored", "rc-test")
    assert rec.bundle_sha256 == sha256(site.bundles[bid]) == sha256(center.state / "done" / f"{bid}.bundle")
    assert [(i.index, i.outcome) for i in rec.instances] == [(k, "stored") for k in range(n)]
    raw = receipts.path_for(center.drop, bid).read_text()
    for uid in site.members[bid]:
        ds = read_dataset(site.originals[uid])
        for value in (uid, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID)):
            assert value not in raw
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(receipts.ReceiptError, match="not trusted"):
        receipts.parse(raw.encode(), [other])


def test_a_tampered_bundle_goes_to_failed_with_its_reason_and_nothing_reaches_orthanc(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("ct")[0]
    dropped = center.drop_bundle(site.bundles[bid], bid)
    data = bytearray(dropped.read_bytes())
    data[len(data) // 2] ^= 0x01
    dropped.write_bytes(bytes(data))
    run = center.once()
    assert run.counts == {"failed": 1}, run.output
    assert pacs.count() == 0
    reason = (center.state / "failed" / f"{bid}.reason.txt").read_text()
    assert reason.startswith("bundle does not verify"), reason
    assert (center.state / "failed" / f"{bid}.bundle").read_bytes() == bytes(data)
    rec = center.receipt(bid)
    assert rec.verdict == "failed" and rec.instances == () and rec.reason == reason.strip()
    assert [e for e in run.events if e["event"] == "dicom.sent"] == []


def test_a_bundle_dropped_twice_is_stored_once_and_the_second_receipt_says_duplicate(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("ct")[0]
    n = len(site.members[bid])
    center.drop_bundle(site.bundles[bid], bid)
    assert center.once().counts == {"stored": 1}
    first = center.receipt(bid)
    center.drop_bundle(site.bundles[bid], bid)
    second_run = center.once()
    assert second_run.counts == {"duplicate": 1}, second_run.output
    assert not [e for e in second_run.events if e["event"] == "dicom.sent"]
    assert new_instance_changes(pacs) == n and pacs.count() == n
    second = center.receipt(bid)
    assert second.verdict == "duplicate" and second.bundle_sha256 == first.bundle_sha256
    assert second.instances == first.instances and first.time in (second.reason or "")
    done = sorted(p.name for p in (center.state / "done").iterdir())
    assert len(done) == 2 and f"{bid}.bundle" in done


def test_two_ingest_processes_on_one_folder_store_each_bundle_once(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    ids = sorted(site.bundles)
    for bid in ids:
        center.drop_bundle(site.bundles[bid], bid)
    a, b = center.popen(), center.popen()
    runs = [center.finish(a), center.finish(b)]
    assert [r.returncode for r in runs] == [0, 0], [r.output for r in runs]
    claimed = [e["bundle"] for r in runs for e in r.events if e["event"] == "ingest.claimed"]
    assert sorted(claimed) == ids  # each bundle claimed by exactly one of them
    sent = [e["bundle"] for r in runs for e in r.events if e["event"] == "dicom.sent"]
    assert sorted(sent) == ids  # and stored by the one that claimed it
    total = sum(len(site.members[b]) for b in ids)
    assert new_instance_changes(pacs) == total - 1  # all but the Photoacoustic instance
    verdicts = collections.Counter(k for r in runs for k, v in r.counts.items() for _ in range(v))
    assert verdicts == {"stored": len(ids) - 1, "partial": 1}
    assert list((center.state / "locks").iterdir()) == []  # each holder removed its lock file


def test_with_orthanc_down_the_bundle_waits_and_is_stored_once_orthanc_is_back(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory(start=False)
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("mr")[1]
    center.drop_bundle(site.bundles[bid], bid)
    run = center.once()
    assert run.counts == {"pending": 1}, run.output
    pending = [e for e in run.events if e["event"] == "ingest.pending"]
    assert len(pending) == 1 and "refused the connection" in pending[0]["reason"]
    assert [p.name.split("~")[0] for p in (center.state / "claimed").iterdir()] == [bid]
    assert not receipts.path_for(center.drop, bid).exists()
    assert not (center.state / "failed").exists() or not list((center.state / "failed").iterdir())
    pacs.start()
    wait_for(lambda: center.once().counts.get("stored"), 30, "the retry after the back-off")
    assert center.receipt(bid).verdict == "stored"
    assert stored_uids(pacs) == collections.Counter(site.members[bid])


def test_an_instance_orthanc_refuses_makes_the_receipt_partial_and_the_rest_is_stored(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()  # Orthanc 1.10.1 accepts no context for Photoacoustic Image Storage
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    (bid,) = site.of("odd")
    members = site.members[bid]
    odd = next(i for i, u in enumerate(members)
               if str(read_dataset(site.originals[u]).SOPClassUID) == PHOTOACOUSTIC)
    center.drop_bundle(site.bundles[bid], bid)
    run = center.once()
    assert run.counts == {"partial": 1}, run.output
    rec = center.receipt(bid)
    assert rec.verdict == "partial"
    failed = [i for i in rec.instances if i.outcome == "failed"]
    assert [(i.index, i.status_class) for i in failed] == [(odd, "permanent")]
    assert "does not accept SOP class Photoacoustic Image Storage" in (failed[0].reason or "")
    assert rec.stored == tuple(i for i in range(len(members)) if i != odd)
    assert stored_uids(pacs) == collections.Counter(u for i, u in enumerate(members) if i != odd)
    assert (center.state / "done" / f"{bid}.bundle").is_file()


def test_a_claim_held_by_a_live_process_is_left_and_taken_back_once_it_died(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("mr")[2]
    center.drop_bundle(site.bundles[bid], bid)
    (center.state / "claimed").mkdir(parents=True)
    holder = Holder(tmp_path, "from appliance.ingest.claim import claim_new\n"
                             "ok = claim_new(Path(a[0]), Path(a[1]), a[2])\n",
                    str(center.drop), str(center.state / "claimed"), bid)
    try:
        assert center.once().counts == {}  # locked by a live process: not touched
        assert pacs.count() == 0
    finally:
        holder.kill()
    run = center.once()
    assert run.counts == {"stored": 1}, run.output
    assert [e["bundle"] for e in run.events if e["event"] == "ingest.reclaimed"] == [bid]
    assert stored_uids(pacs) == collections.Counter(site.members[bid])


def test_the_service_says_ready_feeds_the_watchdog_stores_what_is_dropped_and_stops_on_sigterm(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    """`appliance ingest` without --once, as systemd runs it (Type=notify, a fake NOTIFY_SOCKET)."""
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    notify = NotifySocket(tmp_path / "notify.sock")
    log = (tmp_path / "service.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "ingest", "--config", str(center.config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    log.close()
    try:
        wait_for(lambda: notify.since(0, "READY=1"), 30, "READY=1")
        bid = site.of("ct")[1]
        center.drop_bundle(site.bundles[bid], bid)
        wait_for(lambda: receipts.path_for(center.drop, bid).exists(), 60, "the receipt",
                 detail=lambda: (tmp_path / "service.log").read_text())
        assert center.receipt(bid).verdict == "stored"
        assert stored_uids(pacs) == collections.Counter(site.members[bid])
        t = time.monotonic()
        wait_for(lambda: len(notify.since(t, "WATCHDOG=1")) >= 2, 10, "watchdog pings while idle")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.since(0, "STOPPING=1")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        notify.close()


def test_a_copy_of_a_bundle_that_another_process_is_ingesting_is_left_until_it_is_done(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    """The appliance sent a bundle again while the first copy is being stored elsewhere:
    the second copy waits (its claim left for a later pass) instead of being stored too."""
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("ct")[1]
    center.drop_bundle(site.bundles[bid], bid)
    (center.state / "locks").mkdir(parents=True)
    holder = Holder(tmp_path, "from appliance.ingest.claim import bundle_lock\n"
                              "lock = bundle_lock(Path(a[0]), a[1])\nok = lock.__enter__()\n",
                    str(center.state / "locks"), bid)
    try:
        run = center.once()
        assert run.counts == {"busy": 1}, run.output
        assert pacs.count() == 0 and not receipts.path_for(center.drop, bid).exists()
    finally:
        holder.kill()
    assert center.once().counts == {"stored": 1}
    assert stored_uids(pacs) == collections.Counter(site.members[bid])


def test_a_broken_copy_of_a_stored_bundle_fails_without_replacing_its_receipt(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("mr")[3]
    center.drop_bundle(site.bundles[bid], bid)
    assert center.once().counts == {"stored": 1}
    good = receipts.path_for(center.drop, bid).read_bytes()
    broken = center.drop_bundle(site.bundles[bid], bid)
    broken.write_bytes(broken.read_bytes()[:-100])  # a truncated re-upload
    run = center.once()
    assert run.counts == {"failed": 1}, run.output
    assert receipts.path_for(center.drop, bid).read_bytes() == good
    assert [e["event"] for e in run.events if e["event"] == "ingest.receipt_kept"] == ["ingest.receipt_kept"]
    assert len(list((center.state / "failed").glob("*.reason.txt"))) == 1


def test_a_process_killed_after_recording_a_bundle_is_finished_by_the_next_pass_without_storing_again(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port)
    bid = site.of("ct")[0]
    n = len(site.members[bid])
    center.drop_bundle(site.bundles[bid], bid)
    fp = tmp_path / "failpoints"
    fp.mkdir()
    (fp / "ingest.recorded").write_text("hang")
    p = center.popen(APPLIANCE_FAILPOINTS=str(fp))
    try:
        wait_for(lambda: recorded(center.state), 60, "the verdict recorded")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
    assert not receipts.path_for(center.drop, bid).exists() and new_instance_changes(pacs) == n
    run = center.once()
    assert run.counts == {"stored": 1}, run.output
    assert [e["event"] for e in run.events if e["event"] in ("ingest.finished", "dicom.sent")] == [
        "ingest.finished"]
    assert center.receipt(bid).verdict == "stored" and new_instance_changes(pacs) == n
    assert (center.state / "done" / f"{bid}.bundle").is_file()


def recorded(state: Path) -> bool:
    import sqlite3
    db = state / "ingest.db"
    if not db.exists():
        return False
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM ingested").fetchone()[0] > 0
    except sqlite3.OperationalError:  # not created yet
        return False
    finally:
        conn.close()


def test_ingest_speaks_dicom_tls_with_mutual_authentication_to_the_pacs(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    pacs = pacs_factory(tls=pki.orthanc())  # Orthanc's DICOM port speaks TLS only
    tls = {"cert": str(pki.dir / "edge.crt"), "key": str(pki.dir / "edge.key"), "ca": str(pki.dir / "ca.crt")}
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port, pacs={"tls": tls})
    bid = site.of("mr")[0]
    center.drop_bundle(site.bundles[bid], bid)
    run = center.once()
    assert run.counts == {"stored": 1}, run.output
    assert stored_uids(pacs) == collections.Counter(site.members[bid])
    assert not [e for e in run.events if e["event"] == "dicom.plaintext"]


def test_the_ingest_log_and_receipts_name_no_patient_data(
        site: Site, pacs_factory: Any, tmp_path: Path) -> None:
    """A partial bundle (reasons quoting the PACS) and a tampered one (reasons quoting the
    bundle reader): log lines and receipts carry opaque ids, indexes and SOP class names."""
    pacs = pacs_factory()
    center = Center(tmp_path / "center", site.keys, pacs.dicom_port, log_level="debug")
    (odd,) = site.of("odd")
    tampered = site.of("mr")[0]
    center.drop_bundle(site.bundles[odd], odd)
    broken = center.drop_bundle(site.bundles[tampered], tampered)
    broken.write_bytes(broken.read_bytes()[:-1] + b"\x00")
    run = center.once()
    assert run.counts == {"partial": 1, "failed": 1}, run.output
    text = run.output + "".join(p.read_text() for p in (center.drop / "receipts").iterdir())
    text += "".join(p.read_text() for p in (center.state / "failed").glob("*.txt"))
    for bid in (odd, tampered):
        for uid in site.members[bid]:
            ds = read_dataset(site.originals[uid])
            for value in (uid, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID)):
                assert value not in text, value

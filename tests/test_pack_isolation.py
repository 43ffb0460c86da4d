"""Pack isolation with real peers: one bad instance, worker or segment never stops the flow.

The real daemon (tests/peers.py) receives studies from DCMTK storescu (and, for a data set
no toolkit would send, from pynetdicom sending the file's bytes as they are) and forwards
them to a real Orthanc or a directory. The codec workers are found by PID (children of
the daemon's forkserver, holding a given spool file open) and killed or stopped with
real signals. What arrives is compared with what was sent, pixel by pixel (pydicom).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance.bundle import format as bundle
from appliance.core import crypto
from tests.e2e_support import (
    J2K_LOSSLESS,
    appliance_config,
    compare_instance,
    dicom_destination,
    queue_db,
    queue_rows,
    read_dataset,
    settled,
)
from tests.orthanc import Orthanc
from tests.pack_support import large_image, send_raw, write_poisoned
from tests.peers import REPO, SAMPLES, Appliance, base_config, free_port, storescu, to_toml, wait_for
from tests.spoolcheck import log_events

pytestmark = [pytest.mark.peers, pytest.mark.field]

CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc") as p:
        yield p


def make_study(out: Path, count: int, start: int = 0) -> tuple[list[Path], str]:
    """`count` CT slices as one new study (fresh UIDs); returns (files, Study UID)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for i, src in enumerate(sorted(CT.iterdir())[start:start + count]):
        ds = pydicom.dcmread(src)
        ds.PatientID = "PACK-ISOLATION"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(out / f"{i:03d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files, study


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def detail(app: Appliance) -> str:
    rows = [(r["id"], r["state"], r["reason"]) for r in queue_db(app.state_dir)]
    return f"queue: {rows}\nlog tail:\n{app.log_text()[-4000:]}"


def events(app: Appliance, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(app) if e.get("event") == name]


def manifest(app: Appliance, seg: str) -> list[bundle.ManifestEntry]:
    """The manifest of a segment's bundle, opened with the appliance's own key."""
    key = crypto.load_private_key(Path(app.cfg["encryption"]["appliance_key"]))
    with (app.state_dir / "bundles" / f"{seg}.bundle").open("rb") as f:
        return list(bundle.read_manifest(f, key).instances)


def assert_arrived_identical(pacs: Orthanc, files: list[Path], category: str) -> None:
    """Every file is in Orthanc once, every value and pixel as sent (category:
    "compressed" = stored as JPEG 2000, "passthrough" = as sent)."""
    for f in files:
        oid = pacs.find_instance(sop_uid(f))
        assert oid is not None, f"{f.name} not in Orthanc"
        cmp, got = compare_instance(f, pacs.instance_file(oid), J2K_LOSSLESS)
        assert (cmp.problems, got) == ([], category), f.name


def grandchildren(pid: int) -> list[int]:
    """PIDs whose parent's parent is `pid`: the daemon's codec workers (children of its
    forkserver; the resource tracker and the forkserver itself are children)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    children = {p for p, pp in parents.items() if pp == pid}
    return [p for p, pp in parents.items() if pp in children]


def holding(app: Appliance, path: Path) -> int | None:
    """The codec worker that has `path` open, if any."""
    assert app.proc is not None
    for pid in grandchildren(app.proc.pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return pid
            except OSError:
                continue
    return None


def spool_file_of_largest(app: Appliance) -> Path:
    """The spool file of the largest instance waiting in the spool."""
    rows = wait_for(lambda: [r for r in json_rows(app.state_dir) if r["size"] > 10 << 20], 60,
                    "the large instance in the spool")
    return app.state_dir / "spool" / rows[0]["id"]


def json_rows(state_dir: Path) -> list[dict[str, Any]]:
    import sqlite3
    conn = sqlite3.connect(f"file:{state_dir / 'queue.db'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT id, size FROM instances")]
    finally:
        conn.close()


def held_then(app: Appliance, **pack: Any) -> None:
    """Restart the daemon with packing allowed again (after a held_config start)."""
    app.stop()
    app.cfg["pack"] = {**app.cfg["pack"], "study_quiet_s": 0.5, "segment_max_age_s": 5, **pack}
    app.config_path.write_text(to_toml(app.cfg))
    app.start()


def held_cfg(root: Path) -> dict[str, Any]:
    """A directory destination; packing held off (a study stays `receiving`)."""
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 3600, "segment_max_age_s": 3600, "workers": 2,
                   "codec": "jpeg2000"}
    cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1}
    (root / "outbox").mkdir(parents=True)
    return cfg


# --- one bad instance in a study of healthy ones --------------------------------------------


def test_a_poisoned_instance_is_passed_through_and_the_study_flows_on(
        appliance_factory: Any, pacs: Orthanc, tmp_path: Path) -> None:
    """An undefined-length sequence left open after (0020,000E): acknowledged, and on main
    it stopped all packing. Now it goes out as received, with its reason, and every
    healthy instance arrives compressed and identical; the next study is not held up."""
    root = tmp_path / "app"
    app = appliance_factory(appliance_config(root, free_port(), dicom_destination(pacs.dicom_port),
                                             study_quiet_s=3), root=root)
    healthy, study = make_study(tmp_path / "study", 4)
    assert storescu(app.port, healthy).returncode == 0
    poison_sop = write_poisoned(tmp_path / "poison.dcm", study)
    assert send_raw(app.port, tmp_path / "poison.dcm") == 0  # acknowledged

    seg = wait_for(lambda: [r for r in queue_db(app.state_dir) if r["bundle_bytes"]], 60,
                   "the study to be packed", detail=lambda: detail(app))[0]["id"]
    entries = manifest(app, seg)
    assert [(e.action, e.reason) for e in entries] == [("compressed", "ok")] * 4 + [
        ("passthrough", "unparseable")]
    assert entries[4].received_sha256 == entries[4].sha256  # byte for byte as received
    wait_for(lambda: pacs.count() >= 4, 60, "the healthy instances in Orthanc",
             detail=lambda: detail(app))
    assert_arrived_identical(pacs, healthy, "compressed")
    [ev] = events(app, "pack.instance_passed_through")
    assert (ev["reason"], ev["segment"]) == ("unparseable", seg)
    assert poison_sop not in app.log_text()  # the event names opaque ids only

    later, _ = make_study(tmp_path / "later", 3, start=10)
    assert storescu(app.port, later).returncode == 0
    wait_for(lambda: all(pacs.find_instance(sop_uid(f)) for f in later), 90,
             "the next study in Orthanc", detail=lambda: detail(app))
    assert_arrived_identical(pacs, later, "compressed")
    # Orthanc itself chokes on the poisoned data set ("DIMSE Failed to receive message",
    # also when storescu-like pynetdicom sends it to Orthanc directly): it is not there,
    # and its bundle waits for the forwarder's retries, not in front of the next study.
    assert pacs.find_instance(poison_sop) is None


def test_a_worker_killed_mid_job_twice_passes_its_instance_through(
        appliance_factory: Any, pacs: Orthanc, tmp_path: Path) -> None:
    """SIGKILL the worker compressing a large instance, and the one that retries it: the
    instance goes out as received ("worker-crashed"), its study-mates compressed."""
    root = tmp_path / "app"
    app = appliance_factory(appliance_config(root, free_port(), dicom_destination(pacs.dicom_port),
                                             study_quiet_s=1, stream_threshold_mb=1), root=root)
    healthy, study = make_study(tmp_path / "study", 4)
    large_image(tmp_path / "large.dcm", study)
    assert storescu(app.port, [*healthy, tmp_path / "large.dcm"]).returncode == 0
    spool_file = spool_file_of_largest(app)

    killed: list[int] = []
    for _ in range(2):
        pid = wait_for(lambda: (p := holding(app, spool_file)) not in (None, *killed) and p, 60,
                       "a worker compressing the large instance", poll=0.01,
                       detail=lambda: detail(app))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    rows = wait_for(lambda: settled(app.state_dir), 120, "delivery", detail=lambda: detail(app))
    assert [(e.action, e.reason) for e in manifest(app, rows[0]["id"])] == [
        ("compressed", "ok")] * 4 + [("passthrough", "worker-crashed")]
    assert_arrived_identical(pacs, healthy, "compressed")
    assert_arrived_identical(pacs, [tmp_path / "large.dcm"], "passthrough")
    [ev] = events(app, "pack.instance_passed_through")
    assert ev["reason"] == "worker-crashed"


def test_a_hung_worker_is_killed_at_its_deadline_and_its_instance_passed_through(
        appliance_factory: Any, pacs: Orthanc, tmp_path: Path) -> None:
    """SIGSTOP the worker compressing a large instance: at pack.job_timeout_s it is
    killed (not waited for forever), the instance goes out as received ("worker-timeout"),
    and a fresh worker compresses what comes after."""
    root = tmp_path / "app"
    app = appliance_factory(appliance_config(
        root, free_port(), dicom_destination(pacs.dicom_port), study_quiet_s=1,
        stream_threshold_mb=1, job_timeout_s=20, job_timeout_s_per_mb=0), root=root)
    healthy, study = make_study(tmp_path / "study", 4)
    large_image(tmp_path / "large.dcm", study)
    assert storescu(app.port, [tmp_path / "large.dcm", *healthy]).returncode == 0
    spool_file = spool_file_of_largest(app)
    stopped = wait_for(lambda: holding(app, spool_file), 60, "a worker compressing it",
                       poll=0.01, detail=lambda: detail(app))
    os.kill(stopped, signal.SIGSTOP)

    rows = wait_for(lambda: settled(app.state_dir), 120, "delivery", detail=lambda: detail(app))
    assert [(e.action, e.reason) for e in manifest(app, rows[0]["id"])] == [
        ("passthrough", "worker-timeout")] + [("compressed", "ok")] * 4
    assert [e["pid"] for e in events(app, "pack.worker_killed")] == [stopped]
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)
    assert_arrived_identical(pacs, [tmp_path / "large.dcm"], "passthrough")
    assert_arrived_identical(pacs, healthy, "compressed")


# --- a segment that cannot be packed --------------------------------------------------------


def test_a_segment_that_keeps_failing_is_held_and_a_later_study_delivered(
        appliance_factory: Any, tmp_path: Path) -> None:
    """Its bundle cannot be written (a directory squats its file name): three tries, then
    held with the reason; meanwhile a later study is packed and delivered. Released once
    the cause is gone, it is packed and delivered too."""
    root = tmp_path / "app"
    app = appliance_factory(held_cfg(root), root=root)
    first, _ = make_study(tmp_path / "first", 2)
    assert storescu(app.port, first).returncode == 0
    [seg] = [r["id"] for r in queue_db(app.state_dir)]
    squat = app.state_dir / "bundles" / f"{seg}.bundle"
    squat.mkdir()
    held_then(app)

    later, _ = make_study(tmp_path / "later", 2, start=5)
    assert storescu(app.port, later).returncode == 0
    rows = wait_for(lambda: {r["id"]: r for r in queue_rows(app.config_path)}.get(seg, {}).get(
        "state") == "unpackable" and queue_rows(app.config_path), 90, "the segment set aside",
        detail=lambda: detail(app))
    shown = {r["id"]: r for r in rows}
    assert shown[seg]["reason"] == "pack failed: IsADirectoryError EISDIR"
    wait_for(lambda: [r for r in queue_db(app.state_dir) if r["state"] == "delivered"], 60,
             "the later study to be delivered", detail=lambda: detail(app))
    failures = events(app, "pack.segment_failed")
    assert [e["attempts"] for e in failures] == [1, 2]
    assert [e["attempts"] for e in events(app, "pack.segment_held")] == [3]

    squat.rmdir()
    r = subprocess.run([sys.executable, "-m", "appliance", "queue", "release", seg, "--config",
                        str(app.config_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: settled(app.state_dir), 60, "the released segment delivered",
             detail=lambda: detail(app))
    assert len(list((root / "outbox").glob("*.bundle"))) == 2


# --- never silently incomplete --------------------------------------------------------------


def test_spool_files_lost_after_ack_mark_the_segment_incomplete(
        appliance_factory: Any, tmp_path: Path) -> None:
    """One spool file deleted, one bit-flipped after they were acknowledged: the segment
    is delivered with the rest, marked incomplete (queue list), with an alarm for each;
    the altered file is kept in quarantine."""
    root = tmp_path / "app"
    app = appliance_factory(held_cfg(root), root=root)
    files, _ = make_study(tmp_path / "study", 4)
    assert storescu(app.port, files).returncode == 0
    app.stop()
    ids = [r["id"] for r in json_rows(app.state_dir)]
    assert len(ids) == 4
    spool = app.state_dir / "spool"
    (spool / ids[1]).unlink()
    raw = bytearray((spool / ids[2]).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (spool / ids[2]).write_bytes(bytes(raw))
    held_then(app)

    [row] = wait_for(lambda: settled(app.state_dir), 60, "delivery", detail=lambda: detail(app))
    [shown] = queue_rows(app.config_path)
    assert (shown["state"], shown["incomplete"]) == ("delivered", 2)
    text = subprocess.run([sys.executable, "-m", "appliance", "queue", "list", "--config",
                           str(app.config_path)], capture_output=True, text=True, cwd=REPO,
                          timeout=60).stdout
    assert "INCOMPLETE: 2" in text
    assert [(e["alarm"], e["instance"], e["level"]) for e in events(app, "pack.instance_lost")] == [
        ("instance_lost", ids[1], "error")]
    assert [(e["alarm"], e["instance"]) for e in events(app, "pack.instance_unreadable")] == [
        ("instance_unreadable", ids[2])]
    assert [p.name.split(".")[0] for p in (app.state_dir / "quarantine").iterdir()] == [ids[2]]
    [out] = (root / "outbox").glob("*.bundle")
    key = crypto.load_private_key(Path(app.cfg["encryption"]["appliance_key"]))
    with out.open("rb") as f:
        got = [read_dataset(d).SOPInstanceUID for _, d in bundle.iter_instances(f, key)]
    assert got == [sop_uid(files[0]), sop_uid(files[3])]


# --- the workers under the unit's system-call filter, and Ctrl-C ------------------------------


def test_workers_compress_under_the_units_system_call_filter(
        appliance_factory: Any, tmp_path: Path) -> None:
    """The shipped unit's SystemCallFilter=~@resources answers setpriority and
    sched_setscheduler with SIGSYS. The daemon runs under that filter (the kernel's
    seccomp, inherited by every worker): the workers live and compress."""
    root = tmp_path / "app"
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "workers": 2}
    (root / "outbox").mkdir(parents=True)
    app = appliance_factory(cfg, root=root, start=False)
    app.launcher = [sys.executable, "-m", "tests.seccomp_exec",
                    "setpriority,sched_setscheduler,sched_setparam,sched_setattr", "--"]
    app.start()
    files, _ = make_study(tmp_path / "study", 3)
    assert storescu(app.port, files).returncode == 0
    [out] = wait_for(lambda: list((root / "outbox").glob("*.bundle")), 60, "a delivered bundle",
                     detail=lambda: detail(app))
    key = crypto.load_private_key(Path(app.cfg["encryption"]["appliance_key"]))
    with out.open("rb") as f:
        entries = list(bundle.read_manifest(f, key).instances)
    assert [(e.action, e.transfer_syntax) for e in entries] == [("compressed", J2K_LOSSLESS)] * 3
    [ev] = events(app, "pack.worker_priority")
    assert (ev["lowered"], ev["probe"]) == (False, "SIGSYS")


def test_ctrl_c_stops_the_daemon_and_its_workers_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C sends SIGINT to the whole foreground process group: the daemon, its
    forkserver and its workers. The daemon stops them; none prints a traceback."""
    root = tmp_path / "app"
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "workers": 2}
    (root / "outbox").mkdir(parents=True)
    app = Appliance(root, cfg)
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config",
                             str(app.config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        app.proc = proc  # so the helpers below find its workers
        wait_for(lambda: app._port_open(), 30, "the daemon to listen")
        files, _ = make_study(tmp_path / "study", 2)
        assert storescu(app.port, files).returncode == 0
        wait_for(lambda: list((root / "outbox").glob("*.bundle")), 60, "a delivered bundle")
        workers = grandchildren(proc.pid)
        assert workers
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert [json.loads(line)["event"] for line in text.splitlines()
            if line.startswith("{")][-1] == "appliance.stopped"
    assert all(not os.path.exists(f"/proc/{p}") for p in workers)


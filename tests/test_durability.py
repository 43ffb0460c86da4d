"""Durability: what the appliance acknowledged survives kill -9, and start-up recovery is safe.

The modality is DCMTK storescu (`-v`, so its log says which files got a Success response);
the daemon is the real `appliance run` process, killed with SIGKILL (its whole process
group) at chosen moments. After each restart every acknowledged instance must be in the
spool and decrypt to the data set bytes that were sent, and nothing half-written may be
visible.

kill -9 keeps the page cache, so these tests prove the ordering (temp -> rename -> commit
-> Success, and recovery of every intermediate state), not that fsync reached the disk.

Replay a failing kill loop with APPLIANCE_KILL_SEED=<seed printed by the test>; run with
`-s` to see the per-round kill times and counts (APPLIANCE_KILL_ROUNDS changes the count).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.core import crypto
from appliance.spool.store import new_id
from tests.peers import Appliance, base_config, cli, echoscu, free_port
from tests.spoolcheck import (
    StorescuRun,
    dataset_bytes,
    finish_storescu,
    index_rw,
    keep_in_spool,
    log_events,
    log_size,
    popen_storescu,
    recovered_event,
    run_storescu,
    sop_uid,
    spool_key,
    spool_state,
    timed_storescu,
    write_config,
)

pytestmark = [pytest.mark.peers, pytest.mark.field]

# storescu sends these two series byte for byte (it re-encodes some others), so the spool
# must hold exactly the data set bytes of each file.
EPI = "MR_GE_MR750_EPI_150sl"
CT = "CT_Philips_Ingenuity_phantom_28sl"
ROUNDS = int(os.environ.get("APPLIANCE_KILL_ROUNDS", "20"))


def series(samples: Path, name: str) -> list[Path]:
    return sorted(p for p in (samples / "series" / name).iterdir() if p.is_file())


def make_app(factory: Any, tmp_path: Path, name: str = "app", start: bool = True) -> Appliance:
    root = tmp_path / name
    return factory(keep_in_spool(base_config(root, free_port())), root=root, start=start)


def assert_acked_intact(run: StorescuRun, by_sop: dict[str, bytes]) -> None:
    """Every file storescu saw acknowledged is spooled with exactly the bytes sent."""
    for f in run.acked:
        uid = sop_uid(f)
        assert uid in by_sop, f"{f.name} was acknowledged (Success) but is not in the spool"
        assert dataset_bytes(by_sop[uid]) == dataset_bytes(f.read_bytes()), \
            f"{f.name}: spooled bytes differ from the bytes sent"


def assert_clean_spool(app: Appliance, files: list[Path]) -> dict[str, bytes]:
    """Nothing half-written is visible: every spool file is an index record that decrypts
    to one of the sent files, no temp file is left, nothing was quarantined."""
    st = spool_state(app)
    assert st.temps == [], f"temp files left in the spool: {st.temps}"
    assert st.files == st.records, (
        f"spool files without record: {sorted(st.files - st.records)};"
        f" records without file: {sorted(st.records - st.files)}")
    assert st.missing == []
    assert st.quarantine == [], f"quarantined after a plain crash: {st.quarantine}"
    sent = {sop_uid(f): f for f in files}
    for uid, data in st.by_sop.items():
        assert uid in sent, "the spool holds an instance nobody sent"
        assert dataset_bytes(data) == dataset_bytes(sent[uid].read_bytes())
    return st.by_sop


def uid_of_sealed(key: crypto.SpoolKey, spool_dir: Path, rid: str) -> str:
    with (spool_dir / rid).open("rb") as f:
        return sop_uid(b"".join(crypto.open_spool_file(key, rid, f)))


def errors_since(app: Appliance, offset: int) -> list[dict[str, Any]]:
    return [e for e in log_events(app, offset) if e.get("level") in ("error", "critical")]


def test_kill9_right_after_success_keeps_every_instance(appliance_factory, samples: Path,
                                                        tmp_path: Path) -> None:
    app = make_app(appliance_factory, tmp_path)
    files = series(samples, CT)
    run = run_storescu(app.port, files, tmp_path / "storescu.log")
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(run.acked) == len(files), run.stderr[-2000:]
    app.kill9()  # no shutdown path at all: the process group dies at once

    offset = log_size(app)
    app.start()
    ev = recovered_event(app, offset)
    assert ev["quarantined"] == 0 and ev["missing"] == 0, ev
    by_sop = assert_clean_spool(app, files)
    assert len(by_sop) == len(files)
    assert_acked_intact(run, by_sop)
    assert echoscu(app.port).returncode == 0


def test_kill9_at_random_moments_during_transfer(appliance_factory, samples: Path,
                                                 tmp_path: Path) -> None:
    seed = int(os.environ.get("APPLIANCE_KILL_SEED", str(random.SystemRandom().randrange(2**32))))
    print(f"\nkill loop seed: {seed} (replay with APPLIANCE_KILL_SEED={seed})")
    rng = random.Random(seed)
    app = make_app(appliance_factory, tmp_path, start=False)
    lots = {name: series(samples, name) for name in (EPI, CT)}

    def wipe_state() -> None:
        shutil.rmtree(app.state_dir)

    # Measure the transfer window of each series on this machine, the way the rounds run
    # it (a freshly started daemon, an empty spool): from storescu's launch to its first
    # request and to its last response. The first run only warms up caches.
    def measure(name: str) -> tuple[float, float]:
        app.start()
        run, first, last = timed_storescu(app.port, lots[name])
        assert run.returncode == 0 and len(run.acked) == len(lots[name]), run.stderr[-2000:]
        assert app.stop() == 0
        wipe_state()
        return first, last

    measure(CT)
    window = {name: measure(name) for name in lots}
    for name, (first, last) in window.items():
        print(f"transfer window {name}: {first * 1000:.0f}..{last * 1000:.0f} ms after launch")
    # A kill lands after a random number of Success responses plus a random part of one
    # image's time: by progress, not by the clock, so a loaded machine (slower start-up,
    # slower images) still puts the kills inside the transfer.
    per_image = {name: max(0.001, (last - first) / len(lots[name])) for name, (first, last) in window.items()}

    t_loop = time.monotonic()
    partial = total_acked = total_stored = total_temps = total_adopted = 0
    for i in range(ROUNDS):
        name = (EPI, CT)[i % 2]
        files = lots[name]
        responses, extra = rng.randrange(0, len(files) - 1), rng.uniform(0, 2 * per_image[name])
        app.start()
        log = tmp_path / f"storescu-{i}.log"
        t0 = time.monotonic()
        proc = popen_storescu(app.port, files, log)
        while proc.poll() is None and time.monotonic() - t0 < 60:
            if log.read_text(errors="replace").count("I: Received Store Response") >= responses:
                break
            time.sleep(0.001)
        time.sleep(extra)
        app.kill9()
        killed_at = time.monotonic() - t0
        run = finish_storescu(proc, files, log)

        offset = log_size(app)
        app.start()  # raises if the daemon does not come up
        ev = recovered_event(app, offset)
        assert ev["quarantined"] == 0 and ev["missing"] == 0, (i, ev)
        by_sop = assert_clean_spool(app, files)
        assert_acked_intact(run, by_sop)
        assert errors_since(app, offset) == [], (i, errors_since(app, offset))

        acked = len(run.acked)
        partial += 0 < acked < len(files)
        total_acked += acked
        total_stored += len(by_sop)
        total_temps += ev["temps_removed"]
        total_adopted += ev["adopted"]
        print(f"round {i:2d} {name[:6]} kill after {responses:3d} responses at {killed_at * 1000:6.1f} ms:"
              f" acked {acked:3d}/{len(files)},"
              f" spooled {len(by_sop):3d} (+{len(by_sop) - acked} unacknowledged),"
              f" recovery temps_removed={ev['temps_removed']} adopted={ev['adopted']}")
        app.stop()
        wipe_state()

    print(f"{ROUNDS} rounds in {time.monotonic() - t_loop:.1f} s: {total_acked} acknowledged instances"
          f" checked, {total_stored} spooled, {partial} rounds killed mid-series,"
          f" {total_temps} temp files removed, {total_adopted} orphans adopted")
    # The loop proves something only if most kills landed inside the transfer.
    assert partial >= ROUNDS // 2, f"only {partial}/{ROUNDS} kills landed mid-transfer"


def test_recovery_adopts_orphans_quarantines_garbage_removes_temps(appliance_factory, samples: Path,
                                                                   tmp_path: Path) -> None:
    app = make_app(appliance_factory, tmp_path)
    files = series(samples, CT)
    run = run_storescu(app.port, files, tmp_path / "storescu.log")
    assert len(run.acked) == len(files), run.stderr[-2000:]
    assert app.stop() == 0
    spool_dir, qdir = app.state_dir / "spool", app.state_dir / "quarantine"
    key = spool_key(app)

    db = index_rw(app)
    rows = db.execute("SELECT id, segment_id, size FROM instances ORDER BY id").fetchall()
    # 1. a crash between rename and commit: a sealed file whose record never got written
    orphan = rows[0]
    db.execute("DELETE FROM instances WHERE id=?", (orphan["id"],))
    db.execute("UPDATE segments SET instances=instances-1, bytes=bytes-? WHERE id=?",
               (orphan["size"], orphan["segment_id"]))
    orphan_uid = uid_of_sealed(key, spool_dir, orphan["id"])
    # 2. a record whose file is gone (disk damage): reported, not invented
    lost = rows[1]["id"]
    lost_uid = uid_of_sealed(key, spool_dir, lost)
    (spool_dir / lost).unlink()
    db.close()
    # 3. a sealed file copied under another id: the id is bound into the seal, so it does
    #    not authenticate; kept for a human, not adopted and not deleted
    copied = new_id()
    shutil.copyfile(spool_dir / rows[2]["id"], spool_dir / copied)
    # 4. garbage
    garbage = new_id()
    garbage_bytes = os.urandom(5000)
    (spool_dir / garbage).write_bytes(garbage_bytes)
    # 5. sealed under the right key and name, but not DICOM inside
    not_dicom = new_id()
    with (spool_dir / not_dicom).open("wb") as f:
        crypto.seal_spool_file(key, not_dicom, io.BytesIO(b"not a DICOM file" * 10), f)
    # 6. temp files a crash left behind
    temps = [f".tmp-{os.urandom(8).hex()}" for _ in range(2)]
    for t in temps:
        (spool_dir / t).write_bytes(os.urandom(3000))
    kept = {name: (spool_dir / name).read_bytes() for name in (copied, garbage, not_dicom)}

    offset = log_size(app)
    app.start()
    ev = recovered_event(app, offset)
    assert (ev["temps_removed"], ev["adopted"], ev["quarantined"], ev["missing"]) == (2, 1, 3, 1), ev
    events = log_events(app, offset)
    quarantined = {e["file"] for e in events if e.get("event") == "spool.quarantined"}
    assert quarantined == {copied, garbage, not_dicom}
    assert [e["instance"] for e in events if e.get("event") == "spool.record_without_file"] == [lost]

    # quarantined files are moved, byte for byte, never deleted
    qfiles = {p.name.rsplit(".", 1)[0]: p.read_bytes() for p in qdir.iterdir()}
    assert qfiles == kept
    assert qfiles[garbage] == garbage_bytes

    st = spool_state(app)
    assert st.temps == []
    assert not any((spool_dir / n).exists() for n in (copied, garbage, not_dicom))
    assert st.missing == [lost]
    assert st.files == st.records - {lost}
    # the orphan was adopted in place, under the name it was sealed with: its instance is
    # in the index and intact
    assert orphan["id"] in st.records and orphan_uid in st.by_sop
    sent = {sop_uid(f): f for f in files}
    assert set(st.by_sop) == set(sent) - {lost_uid}  # all but the one whose file was deleted
    for uid, data in st.by_sop.items():
        assert dataset_bytes(data) == dataset_bytes(sent[uid].read_bytes())
    assert echoscu(app.port).returncode == 0

    # A second start finds nothing left to do.
    app.stop()
    offset = log_size(app)
    app.start()
    ev = recovered_event(app, offset)
    assert (ev["temps_removed"], ev["adopted"], ev["quarantined"]) == (0, 0, 0), ev


def test_wrong_spool_key_refuses_to_start_and_touches_nothing(appliance_factory, samples: Path,
                                                             tmp_path: Path) -> None:
    app = make_app(appliance_factory, tmp_path)
    files = series(samples, CT)[:5]
    run = run_storescu(app.port, files, tmp_path / "storescu.log")
    assert len(run.acked) == len(files), run.stderr[-2000:]
    assert app.stop() == 0
    spool_dir = app.state_dir / "spool"
    before = {p.name: p.read_bytes() for p in spool_dir.iterdir()}
    right_key = app.cfg["spool"]["key_file"]
    wrong_key = tmp_path / "other" / "spool.key"
    crypto.create_spool_key(wrong_key)

    def run_with(key_file: str | Path) -> Any:
        app.cfg["spool"]["key_file"] = str(key_file)
        write_config(app)
        return cli("run", "--config", str(app.config_path), timeout=30)

    # with the key id recorded at first start, and (older state) judged by file headers
    for case in ("recorded", "headers"):
        if case == "headers":
            (app.state_dir / "spool.keyid").unlink()
        r = run_with(wrong_key)
        assert r.returncode == 78, (case, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert str(wrong_key) in lines[0] and "not the key that sealed the spool" in lines[0], lines[0]
        assert "Traceback" not in r.stderr
        assert {p.name: p.read_bytes() for p in spool_dir.iterdir()} == before, case
        assert list((app.state_dir / "quarantine").iterdir()) == [], case

    # the right key starts, and every instance is still there
    app.cfg["spool"]["key_file"] = right_key
    write_config(app)
    app.start()
    st = spool_state(app)
    assert len(st.by_sop) == len(files) and st.quarantine == []
    assert (app.state_dir / "spool.keyid").read_text().strip() == spool_key(app).id.hex()


def test_spool_key_readable_by_others_is_refused(appliance_factory, tmp_path: Path) -> None:
    app = make_app(appliance_factory, tmp_path, start=False)
    key_file = Path(app.cfg["spool"]["key_file"])
    os.chmod(key_file, 0o644)
    for args in (("run",), ("config", "check")):
        r = cli(*args, "--config", str(app.config_path), timeout=30)
        assert r.returncode == 78, (args, r.returncode, r.stdout, r.stderr)
        msg = r.stderr.strip()
        assert str(key_file) in msg and "chmod 600" in msg, (args, msg)
        assert len(msg.splitlines()) == 1 and "Traceback" not in msg, (args, msg)
    assert not (app.state_dir / "run" / "control.sock").exists()
    os.chmod(key_file, 0o600)
    assert cli("config", "check", "--config", str(app.config_path)).returncode == 0


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def test_a_large_orphan_is_adopted_in_place_without_being_read_into_memory(
        appliance_factory, tmp_path: Path) -> None:
    """A 256 MiB instance whose row a crash never committed: recovery authenticates it
    chunk by chunk, identifies it from its start and gives it its row under the name it
    was sealed with; the daemon starting does not hold it (before: read whole, then
    sealed again under a new name: two copies in memory)."""
    from tests.pack_support import large_image, send_raw

    app = make_app(appliance_factory, tmp_path)
    big = tmp_path / "big.dcm"
    sop = large_image(big, "1.2.826.0.1.3680043.8.498.1", frames=512)
    assert big.stat().st_size > 256 << 20
    assert send_raw(app.port, big, sop_class="1.2.840.10008.5.1.4.1.1.7.3") == 0x0000
    assert app.stop() == 0
    db = index_rw(app)
    [row] = db.execute("SELECT id, segment_id, size FROM instances").fetchall()
    db.execute("DELETE FROM instances WHERE id=?", (row["id"],))  # as if the crash came first
    db.close()

    offset = log_size(app)
    app.start()
    ev = recovered_event(app, offset)
    assert (ev["adopted"], ev["quarantined"], ev["adopt_failed"]) == (1, 0, 0), ev
    assert app.proc is not None
    hwm = _vm_hwm(app.proc.pid)
    assert hwm < 160 << 20, f"the daemon's peak RSS was {hwm >> 20} MiB while adopting"
    st = spool_state(app)
    assert st.records == {row["id"]} == st.files  # adopted under its own name, nothing copied
    assert sop in st.by_sop

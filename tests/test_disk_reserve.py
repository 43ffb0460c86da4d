"""The spool on a small disk: refuse before the reserve, survive a really full disk.

Each test mounts its own size-limited tmpfs in its temp dir (CI runs as root) and puts
the appliance's state dir on it; keys, config and log stay outside. The mount is always
unmounted in the fixture's teardown, after the daemons on it are stopped.

A reserve check (free - size - overhead < reserve -> 0xA700) runs before every write, so
with one sender the disk cannot fill up under the spool. It fills for real when something
else takes the space between the check and the write (another association, another
program, inode exhaustion); that must give 0xA701/0xA700 too, never a torn file, a
record without its file, or a dead daemon.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
    spool_state,
)

pytestmark = [pytest.mark.peers, pytest.mark.root]

MiB = 1 << 20
CT = "CT_Philips_Ingenuity_phantom_28sl"
OUT_OF_RESOURCES = "Refused: OutOfResources"  # DCMTK's text for 0xA700 (and 0xA7xx)


def series(samples: Path, name: str) -> list[Path]:
    return sorted(p for p in (samples / "series" / name).iterdir() if p.is_file())


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def free_inodes(path: Path) -> int:
    return os.statvfs(path).f_favail


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(name, size="40m", nr_inodes=None) -> a fresh tmpfs mounted in tmp_path."""
    mounts: list[Path] = []

    def mount(name: str = "disk", size: str = "40m", nr_inodes: int | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size},mode=0700" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {d} (these tests need root and mount"
                        f" permission, as CI has): {r.stderr.strip() or r.returncode}")
        mounts.append(d)
        return d

    yield mount
    for d in reversed(mounts):
        r = subprocess.run(["umount", str(d)], capture_output=True, text=True)
        if r.returncode != 0:  # something still open: never leave the mount behind
            subprocess.run(["umount", "-l", str(d)], check=True)
            pytest.fail(f"tmpfs {d} was busy at teardown: {r.stderr.strip()}")


@pytest.fixture
def factory(tmpfs: Callable[..., Path], appliance_factory: Any) -> Callable[..., Appliance]:
    """appliance_factory, set up after `tmpfs` so that its daemons stop before the unmount."""

    def make(disk: Path, reserve_mb: int, start: bool = True) -> Appliance:
        root = disk.parent / f"app-{disk.name}"
        cfg = keep_in_spool(base_config(root, free_port()))
        cfg["appliance"]["state_dir"] = str(disk / "state")
        cfg["spool"]["reserve_free_mb"] = reserve_mb
        return appliance_factory(cfg, root=root, start=start)

    return make


def fill(path: Path, nbytes: int) -> None:
    with path.open("wb") as f:
        chunk = b"\xa5" * MiB
        while nbytes > 0:
            nbytes -= f.write(chunk[:min(nbytes, MiB)])


class MinFree:
    """Poll statvfs in a thread while a transfer runs; `.min` is the lowest free space seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.min = free_bytes(path)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.min = min(self.min, free_bytes(self.path))
            time.sleep(0.0005)

    def __enter__(self) -> MinFree:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.min = min(self.min, free_bytes(self.path))


def assert_spool_matches(app: Appliance, acked: list[Path], sent: list[Path]) -> dict[str, bytes]:
    """The spool holds exactly the acknowledged instances, byte for byte, and nothing torn."""
    st = spool_state(app)
    assert st.temps == [], f"temp files left: {st.temps}"
    assert st.files == st.records and st.missing == [] and st.quarantine == []
    assert set(st.by_sop) == {sop_uid(f) for f in acked}, "index records differ from acknowledged"
    by_file = {sop_uid(f): f for f in sent}
    for uid, data in st.by_sop.items():
        assert dataset_bytes(data) == dataset_bytes(by_file[uid].read_bytes())
    return st.by_sop


def refusals(app: Appliance, since: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in log_events(app, since):
        if e.get("event") == "instance.refused":
            out[e["status"]] = out.get(e["status"], 0) + 1
    return out


def test_reserve_answers_out_of_resources_before_crossing_it(factory: Any, tmpfs: Any, samples: Path,
                                                            tmp_path: Path) -> None:
    disk = tmpfs("disk", size="40m")
    reserve_mb = 22
    filler = disk / "filler"
    fill(filler, 10 * MiB)  # someone else's data on the same filesystem
    app = factory(disk, reserve_mb)
    files = series(samples, CT)  # 28 x 0.5 MiB: about half fits above the reserve

    offset = log_size(app)
    with MinFree(disk) as watch:
        run = run_storescu(app.port, files, tmp_path / "run1.log")
    ok, refused = run.acked, run.with_response(OUT_OF_RESOURCES)
    print(f"\nfirst send: {len(ok)} stored, {len(refused)} refused; lowest free space seen"
          f" {watch.min / MiB:.2f} MiB, reserve {reserve_mb} MiB")
    assert 0 < len(ok) < len(files), run.stderr[-3000:]
    assert len(ok) + len(refused) == len(files), run.outcome
    # stored first, then refused: once at the reserve, nothing more gets in
    assert files[:len(ok)] == ok
    assert refusals(app, offset) == {"0xA700": len(refused)}
    assert watch.min >= reserve_mb * MiB, "free space fell below the reserve"
    assert free_bytes(disk) >= reserve_mb * MiB

    assert_spool_matches(app, ok, files)
    assert echoscu(app.port).returncode == 0
    st = app.status()
    assert st["receive"]["instances_refused"] == {"spool_full": len(refused)}
    assert st["receive"]["instances_received"] == len(ok)
    text = cli("status", "--config", str(app.config_path), check=True).stdout
    assert f"spool_full {len(refused)}" in text, text

    # Room again (the other program's file is gone): the refused images now go in.
    filler.unlink()
    with MinFree(disk) as watch:
        run2 = run_storescu(app.port, refused, tmp_path / "run2.log")
    assert run2.returncode == 0 and run2.acked == refused, run2.stderr[-3000:]
    assert watch.min >= reserve_mb * MiB
    assert_spool_matches(app, files, files)
    assert app.status()["receive"]["instances_received"] == len(files)


def test_disk_full_of_inodes_gives_a701_and_no_trace(factory: Any, tmpfs: Any, samples: Path,
                                                     tmp_path: Path) -> None:
    """ENOSPC from the filesystem (no inode left for the temp file), reserve 0."""
    disk = tmpfs("disk", size="64m", nr_inodes=200)
    app = factory(disk, reserve_mb=0)
    files = series(samples, CT)
    # Leave inodes for exactly 5 instances (each keeps one spool file).
    fillers = disk / "fillers"
    fillers.mkdir()
    n = 0
    while free_inodes(disk) > 5:
        (fillers / str(n)).touch()
        n += 1
    assert free_bytes(disk) > 30 * MiB  # bytes are plenty: the reserve check passes

    offset = log_size(app)
    run = run_storescu(app.port, files[:12], tmp_path / "run1.log")
    ok, refused = run.acked, run.with_response(OUT_OF_RESOURCES)
    print(f"\ninodes: {len(ok)} stored, {len(refused)} refused: {sorted(set(run.outcome.values()))}")
    assert ok == files[:5], run.stderr[-3000:]
    assert refused == files[5:12], run.outcome
    assert refusals(app, offset) == {"0xA701": 7}
    errs = [e for e in log_events(app, offset) if e.get("event") == "store.disk_error"]
    assert len(errs) == 7 and all(e["errno"] == 28 for e in errs), errs
    assert_spool_matches(app, ok, files)
    assert echoscu(app.port).returncode == 0
    assert app.status()["receive"]["instances_refused"] == {"disk_error": 7}

    for p in fillers.iterdir():
        p.unlink()
    run2 = run_storescu(app.port, files[5:12], tmp_path / "run2.log")
    assert run2.acked == files[5:12], run2.stderr[-3000:]
    assert_spool_matches(app, files[:12], files)


def test_disk_really_full_with_concurrent_senders(factory: Any, tmpfs: Any, samples: Path,
                                                  tmp_path: Path) -> None:
    """Reserve 0 on a tiny tmpfs, four associations at once: their free-space checks race
    with each other's writes, so some writes (or commits) meet ENOSPC for real."""
    disk = tmpfs("disk", size="6m")
    app = factory(disk, reserve_mb=0)
    files = series(samples, CT)
    groups = [files[i::4] for i in range(4)]

    offset = log_size(app)
    procs = [popen_storescu(app.port, g, tmp_path / f"c{i}.log") for i, g in enumerate(groups)]
    runs: list[StorescuRun] = [finish_storescu(p, g, tmp_path / f"c{i}.log")
                               for i, (p, g) in enumerate(zip(procs, groups, strict=True))]
    ok = [f for r in runs for f in r.acked]
    refused = [f for r in runs for f in r.with_response(OUT_OF_RESOURCES)]
    outcomes = sorted({v or "none" for r in runs for v in r.outcome.values()})
    by_status = refusals(app, offset)
    print(f"\nconcurrent: {len(ok)} stored, {len(refused)} refused {by_status}, outcomes {outcomes}")
    assert len(ok) + len(refused) == len(files), outcomes
    assert refused, "a 6 MiB disk cannot hold a 15 MB series"
    assert set(by_status) <= {"0xA700", "0xA701"}
    assert sum(by_status.values()) == len(refused)
    assert_spool_matches(app, ok, files)
    assert echoscu(app.port).returncode == 0

    # Still serving: the next image gets an answer (Out of Resources, or Success if a failed
    # write gave its space back), not a hang or a dropped association.
    r = run_storescu(app.port, refused[:1], tmp_path / "again.log")
    assert r.returncode == 0 and r.outcome[str(refused[0])] in ("Success", OUT_OF_RESOURCES), r.stderr
    assert app.stop() == 0


class DiskSqueeze:
    """The disk fills up at the worst moment of a store, as if another program took the space.

    when="write": the instant a spool temp file appears, the tmpfs is shrunk to the blocks
    in use (mount(2) MS_REMOUNT, microseconds), so the rest of the sealed file's write
    fails with ENOSPC.
    when="commit": the test holds the index's write lock (BEGIN IMMEDIATE), so the daemon
    writes and renames its sealed file, then waits for the lock; the tmpfs is shrunk and the
    lock released, so the index commit (WAL append) fails with SQLITE_FULL.
    `hold_s` after the store is over the size is restored.
    """

    MS_REMOUNT = 32

    def __init__(self, disk: Path, state_dir: Path, when: str, size: str, hold_s: float = 0.2) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.disk, self.state_dir, self.when, self.size, self.hold_s = disk, state_dir, when, size, hold_s
        self.spool_dir = state_dir / "spool"
        self.hits = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _remount(self, opts: str) -> int:
        import ctypes

        r = self.libc.mount(b"tmpfs", str(self.disk).encode(), b"tmpfs", self.MS_REMOUNT, opts.encode())
        return 0 if r == 0 else ctypes.get_errno()

    def _shrink(self) -> None:
        for _ in range(1000):  # EINVAL when usage grew between statvfs and the remount
            st = os.statvfs(self.disk)
            used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
            if self._remount(f"size={used_kib}k") == 0:
                self.hits += 1
                return
        raise RuntimeError("could not shrink the tmpfs")

    def _restore(self) -> None:
        time.sleep(self.hold_s)
        err = self._remount(f"size={self.size}")
        assert err == 0, os.strerror(err)

    def _names(self) -> set[str]:
        try:
            return set(os.listdir(self.spool_dir))
        except FileNotFoundError:
            return set()

    def _wait(self, cond: Callable[[], bool], timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if self._stop.is_set() or time.monotonic() > deadline:
                return False
        return True

    def _run(self) -> None:
        if self.when == "write":
            while self._wait(lambda: any(n.startswith(".tmp-") for n in self._names()), 3600):
                self._shrink()
                self._wait(lambda: not any(n.startswith(".tmp-") for n in self._names()))
                self._restore()
            return
        def sealed() -> set[str]:
            return {n for n in self._names() if not n.startswith(".tmp-")}

        db = sqlite3.connect(self.state_dir / "queue.db", isolation_level=None, timeout=10)
        try:
            while not self._stop.is_set():
                before = sealed()
                db.execute("BEGIN IMMEDIATE")
                try:
                    renamed = self._wait(lambda b=before: bool(sealed() - b), 3600)  # type: ignore[misc]
                    if renamed:
                        self._shrink()
                finally:
                    db.execute("ROLLBACK")
                if renamed:
                    self._wait(lambda b=before: not sealed() - b)  # type: ignore[misc]
                    self._restore()
        finally:
            db.close()

    def __enter__(self) -> DiskSqueeze:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._remount(f"size={self.size}")


def big_instances(tmp_path: Path, samples: Path, n: int, side: int = 4096) -> list[Path]:
    """n CT instances of side x side 16-bit pixels (32 MiB at 4096), new UIDs, in tmp_path."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    out = []
    for i in range(n):
        ds = dcmread(series(samples, CT)[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = side
        ds.PixelData = os.urandom(side * side * 2)
        p = tmp_path / f"big-{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


@pytest.mark.parametrize("when", ["write", "commit"])
def test_disk_filling_during_a_store_gives_out_of_resources_and_no_trace(
        when: str, factory: Any, tmpfs: Any, samples: Path, tmp_path: Path) -> None:
    """ENOSPC for real while the sealed file is written (or while its record is committed),
    with reserve 0: Out of Resources, no temp file, no record, no orphan, daemon serving.

    The squeeze is a thread that sees the temp file (or the rename) and shrinks the tmpfs;
    on a loaded machine it can come after the write it aimed at has finished, and then only
    the reserve check refuses (0xA700). Every attempt must keep the invariants; the scenario
    (a store failing in its write, 0xA701) must happen in one of three attempts."""
    files = big_instances(tmp_path, samples, 3)  # 32 MiB each: a write takes milliseconds
    seen: list[dict[str, int]] = []
    for attempt in range(3):
        disk = tmpfs(f"disk{attempt}", size="128m")
        app = factory(disk, reserve_mb=0)
        offset = log_size(app)
        with DiskSqueeze(disk, app.state_dir, when, "128m") as squeeze:
            run = run_storescu(app.port, files, tmp_path / f"run1-{attempt}.log")
        by_status = refusals(app, offset)
        errs = [(e["event"], e.get("errno"), e.get("error"), e.get("error_type"))
                for e in log_events(app, offset) if e.get("event", "").startswith("store.")]
        print(f"\ndisk filled {squeeze.hits} times during a {when}: {len(run.acked)} stored,"
              f" refusals {by_status}, {errs}")
        assert squeeze.hits >= 1
        # A squeeze makes that store fail; the next one may then meet the still-full disk at
        # the reserve check (0xA700) or be stored after the size is restored.
        assert len(run.acked) + len(run.with_response(OUT_OF_RESOURCES)) == len(files), run.outcome
        assert set(by_status) <= {"0xA700", "0xA701"}, (by_status, errs)
        assert_spool_matches(app, run.acked, files)  # no temp file, no record or file of a refusal
        assert echoscu(app.port).returncode == 0
        seen.append(by_status)
        if by_status.get("0xA701", 0) >= 1:
            break
    assert seen[-1].get("0xA701", 0) >= 1, f"no store failed in its {when} in 3 attempts: {seen}"

    refused = [f for f in files if f not in run.acked]
    run2 = run_storescu(app.port, refused, tmp_path / "run2.log")
    assert run2.acked == refused, run2.stderr[-3000:]
    assert_spool_matches(app, files, files)


def test_orphan_adopted_at_start_with_the_disk_at_its_reserve(factory: Any, tmpfs: Any, samples: Path,
                                                              tmp_path: Path) -> None:
    """A crash left an orphan (sealed, never committed) and the disk is below the reserve:
    the daemon must still start and adopt it, not exit and be restarted forever."""
    disk = tmpfs("disk", size="40m")
    reserve_mb = 20
    app = factory(disk, reserve_mb)
    files = series(samples, CT)[:4]
    run = run_storescu(app.port, files, tmp_path / "run1.log")
    assert run.acked == files, run.stderr[-3000:]
    assert app.stop() == 0
    db = index_rw(app)
    db.execute("DELETE FROM instances WHERE id=(SELECT MIN(id) FROM instances)")
    db.close()
    fill(disk / "filler", free_bytes(disk) - (reserve_mb * MiB) // 2)
    assert free_bytes(disk) < reserve_mb * MiB

    offset = log_size(app)
    app.start()
    ev = recovered_event(app, offset)
    assert ev["adopted"] == 1 and ev["quarantined"] == 0, ev
    assert_spool_matches(app, files, files)
    # new images are still refused at the reserve
    nxt = series(samples, CT)[4:5]
    r = run_storescu(app.port, nxt, tmp_path / "run2.log")
    assert r.with_response(OUT_OF_RESOURCES) == nxt, r.stderr[-3000:]
    assert echoscu(app.port).returncode == 0

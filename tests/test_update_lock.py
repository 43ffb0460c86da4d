"""The update lock (appliance/update/lock.py): a reboot waits for work, work does not
start while a reboot waits. Separate processes, as the daemon and `appliance update` are."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.update import lock


def _hold_work(path: Path, started: multiprocessing.synchronize.Event, seconds: float) -> None:
    with lock.work(path):
        started.set()
        time.sleep(seconds)


def test_exclusive_is_taken_at_once_when_no_work_holds_it(tmp_path: Path) -> None:
    held = lock.exclusive(tmp_path / "update.lock", timeout_s=5)
    assert held is not None


def test_work_is_refused_while_an_update_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "update.lock"
    held = lock.exclusive(path, timeout_s=5)
    assert held is not None
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        refused = pool.apply(_try_work, (path,))
    assert refused


def _try_work(path: Path) -> bool:
    try:
        with lock.work(path):
            return False
    except lock.UpdatePending:
        return True


def test_exclusive_waits_for_work_in_progress_to_end(tmp_path: Path) -> None:
    path = tmp_path / "update.lock"
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold_work, args=(path, started, 3.0))
    p.start()
    try:
        assert started.wait(60)
        t0 = time.monotonic()
        held = lock.exclusive(path, timeout_s=60, poll_s=0.1)
        waited = time.monotonic() - t0
    finally:
        p.join(60)
    assert held is not None
    assert waited > 1.0  # it waited for the work (3 s from before it started waiting)


def test_exclusive_gives_up_at_its_deadline_and_holds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "update.lock"
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold_work, args=(path, started, 5.0))
    p.start()
    try:
        assert started.wait(60)
        assert lock.exclusive(path, timeout_s=0.5, poll_s=0.1) is None
        # Gave up: new work may start again.
        with lock.work(path):
            pass
    finally:
        p.join(60)


def test_work_in_the_same_process_shares_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "update.lock"
    with lock.work(path), lock.work(path):
        pass


def test_unopenable_lock_file_does_not_stop_work(tmp_path: Path) -> None:
    with lock.work(tmp_path / "missing-dir" / "update.lock"):
        pass


@pytest.fixture(autouse=True)
def _release_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close what `exclusive` hands out (the process keeps it until the reboot)."""
    taken: list[int] = []
    real = lock.exclusive

    def exclusive(*a: Any, **kw: Any) -> tuple[int, int] | None:
        held = real(*a, **kw)
        taken.extend(held or ())
        return held

    monkeypatch.setattr(lock, "exclusive", exclusive)
    yield
    for fd in taken:
        os.close(fd)

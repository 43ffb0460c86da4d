"""The codec worker pool: deadlines, killed and stopped workers, priority, shutdown.

Real worker processes (forkserver), real signals sent to their PIDs. The job functions
are module-level here so that the workers can import them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from appliance.pack import codec
from appliance.pack.pool import WORKER_NICE, CodecPool, PoolClosed, WorkerLost
from tests.peers import REPO, SAMPLES, wait_for

CT_SLICE = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl" / "I10"


# --- jobs (run in the workers) ----------------------------------------------------------


def note_and_sleep(marker: str, seconds: float) -> int:
    """Append this worker's PID to `marker`, then sleep: a job a test can find and hit."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


def die_the_first_time(marker: str) -> int:
    """SIGKILL itself unless `marker` exists (a crash that a retry gets past)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def scheduling() -> tuple[int, int]:
    return os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)


def dumpable() -> int:
    return int(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


def fail() -> None:
    raise ValueError("a job's own error")


# --- helpers ----------------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[CodecPool]:
    p = CodecPool(workers=2)
    yield p
    p.close(cancel_futures=True, grace_s=10)


def pids_in(marker: Path, n: int) -> list[int]:
    """The first `n` PIDs the jobs wrote to `marker`, once they have."""
    def read() -> list[int]:
        text = marker.read_text() if marker.exists() else ""
        pids = [int(x) for x in text.split()]
        return pids[:n] if len(pids) >= n else []
    return wait_for(read, 60, f"{n} job(s) to start")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


# --- deadlines --------------------------------------------------------------------------


def test_a_job_past_its_deadline_has_its_worker_killed(pool: CodecPool, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    f = pool.submit_call(note_and_sleep, (str(marker), 600), timeout_s=2)
    (pid,) = pids_in(marker, 1)
    with pytest.raises(WorkerLost) as lost:
        f.result(timeout=60)
    assert lost.value.reason == "worker-timeout"
    wait_for(lambda: gone(pid), 10, "the worker to be gone")
    assert pool.submit_call(os.getpid, (), timeout_s=30).result(timeout=60) != pid


def test_a_stopped_worker_is_killed_at_its_deadline(pool: CodecPool, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    f = pool.submit_call(note_and_sleep, (str(marker), 600), timeout_s=3)
    (pid,) = pids_in(marker, 1)
    os.kill(pid, signal.SIGSTOP)  # cannot answer, cannot exit, uses no CPU
    with pytest.raises(WorkerLost) as lost:
        f.result(timeout=60)
    assert lost.value.reason == "worker-timeout"
    wait_for(lambda: gone(pid), 10, "the stopped worker to be gone")


def test_a_timeout_leaves_the_other_jobs_in_flight_alone(pool: CodecPool, tmp_path: Path) -> None:
    hang, slow = tmp_path / "hang", tmp_path / "slow"
    stuck = pool.submit_call(note_and_sleep, (str(hang), 600), timeout_s=2)
    fine = pool.submit_call(note_and_sleep, (str(slow), 5), timeout_s=60)
    with pytest.raises(WorkerLost):
        stuck.result(timeout=60)
    (pid,) = pids_in(slow, 1)
    assert fine.result(timeout=60) == pid
    assert slow.read_text().split() == [str(pid)]  # ran once, never restarted


def test_time_waiting_in_the_queue_does_not_count(tmp_path: Path) -> None:
    """Three 2 s jobs with a 3.5 s limit on one worker: the third waits 4 s first."""
    with CodecPool(workers=1, lower_priority=False) as one:
        one.submit_call(os.getpid, (), timeout_s=60).result(timeout=60)  # worker started
        jobs = [one.submit_call(note_and_sleep, (str(tmp_path / "m"), 2), timeout_s=3.5)
                for _ in range(3)]
        assert len({j.result(timeout=60) for j in jobs}) == 1  # all three, one worker


# --- crashes ----------------------------------------------------------------------------


def test_a_worker_killed_mid_job_is_retried_on_a_fresh_one(pool: CodecPool, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    f = pool.submit_call(note_and_sleep, (str(marker), 3), timeout_s=60)
    (first,) = pids_in(marker, 1)
    os.kill(first, signal.SIGKILL)
    second = f.result(timeout=60)
    assert second != first
    assert marker.read_text().split() == [str(first), str(second)]


def test_a_job_that_kills_its_worker_twice_is_lost(pool: CodecPool, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    f = pool.submit_call(note_and_sleep, (str(marker), 600), timeout_s=120)
    for n in (1, 2):
        os.kill(pids_in(marker, n)[-1], signal.SIGKILL)
    with pytest.raises(WorkerLost) as lost:
        f.result(timeout=60)
    assert lost.value.reason == "worker-crashed"


def test_a_crash_the_retry_gets_past_gives_the_result(pool: CodecPool, tmp_path: Path) -> None:
    pid = pool.submit_call(die_the_first_time, (str(tmp_path / "died"),), timeout_s=60).result(60)
    assert pid > 0


def test_submit_turns_a_lost_worker_into_a_passthrough(pool: CodecPool) -> None:
    raw = CT_SLICE.read_bytes()
    r = pool.submit_call(os._exit, (3,), 60, on_lost=lambda why: codec._passthrough(raw, why))
    res = r.result(timeout=60)
    assert (res.action, res.reason, res.data) == ("passthrough", "worker-crashed", raw)


def test_a_jobs_own_error_reaches_the_caller(pool: CodecPool) -> None:
    with pytest.raises(ValueError, match="a job's own error"):
        pool.submit_call(fail, (), timeout_s=60).result(timeout=60)
    assert pool.submit_call(os.getpid, (), timeout_s=60).result(timeout=60) > 0


# --- the workers' lot -------------------------------------------------------------------


def test_workers_run_at_low_priority_when_allowed(pool: CodecPool) -> None:
    nice, policy = pool.submit_call(scheduling, (), timeout_s=60).result(timeout=60)
    assert (nice, policy) == (WORKER_NICE, os.SCHED_IDLE)


def test_workers_are_not_dumpable(pool: CodecPool) -> None:
    assert pool.submit_call(dumpable, (), timeout_s=60).result(timeout=60) == 0


def test_workers_ignore_sigint() -> None:
    """Python's default handler would raise KeyboardInterrupt in the worker waiting for
    its next job, ending it; the next job would then run on a fresh worker."""
    with CodecPool(workers=1) as one:
        pid = one.submit_call(os.getpid, (), timeout_s=60).result(timeout=60)
        os.kill(pid, signal.SIGINT)
        assert one.submit_call(os.getpid, (), timeout_s=60).result(timeout=60) == pid
        assert not gone(pid)


POOL_UNDER_FILTER = """
import os
from pathlib import Path
from appliance.pack.pool import CodecPool
raw = Path(os.environ["SLICE"]).read_bytes()
with CodecPool(workers=1) as pool:
    res = pool.submit(raw, "jpeg2000", True).result(timeout=120)
    nice = pool.submit_call(os.getpriority, (os.PRIO_PROCESS, 0), timeout_s=60).result(60)
print("RESULT", res.action, res.reason, nice)
"""


def test_workers_start_under_a_seccomp_filter_that_kills_priority_calls() -> None:
    """SystemCallFilter=~@resources without SystemCallErrorNumber: SIGSYS on setpriority
    and sched_setscheduler. The probe dies of it; the workers skip the calls and compress."""
    r = subprocess.run([sys.executable, "-m", "tests.seccomp_exec",
                        "setpriority,sched_setscheduler,sched_setparam,sched_setattr", "--",
                        sys.executable, "-c", POOL_UNDER_FILTER],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SLICE": str(CT_SLICE)})
    assert r.returncode == 0, r.stderr[-3000:]
    result = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert result == [["compressed", "ok", "0"]], r.stdout + r.stderr[-3000:]
    assert "probe=SIGSYS" in r.stdout + r.stderr and "lowered=False" in r.stdout + r.stderr


# --- shutdown ---------------------------------------------------------------------------


def test_close_gives_running_jobs_a_grace_then_kills_them(tmp_path: Path) -> None:
    p = CodecPool(workers=1)
    marker = tmp_path / "started"
    running = p.submit_call(note_and_sleep, (str(marker), 600), timeout_s=600)
    queued = p.submit_call(os.getpid, (), timeout_s=60)
    (pid,) = pids_in(marker, 1)
    t0 = time.monotonic()
    p.close(cancel_futures=True, grace_s=1)
    assert time.monotonic() - t0 < 30
    with pytest.raises(PoolClosed):
        running.result(timeout=1)
    with pytest.raises(CancelledError):
        queued.result(timeout=1)
    assert gone(pid)
    with pytest.raises(PoolClosed):
        p.submit_call(os.getpid, (), timeout_s=60)


def test_close_stops_idle_workers(tmp_path: Path) -> None:
    p = CodecPool(workers=2)
    pids = {p.submit_call(note_and_sleep, (str(tmp_path / "m"), 0.5), timeout_s=60).result(60)
            for _ in range(4)}
    p.close()
    assert pids and all(gone(pid) for pid in pids)
    assert p.pids() == []

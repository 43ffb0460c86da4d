"""The codec worker pool: module-level jobs (`compress`, `packer.prepare`, ...) in worker
processes, every job with a deadline.

Owns the worker processes (never "fork" from the threaded daemon: "forkserver" by default,
with numpy, pydicom and the codecs preloaded once in the server). The OpenJPEG encoder holds
the GIL and is not thread-safe, so compression cannot run on the daemon's threads.

Shape: one *slot* per worker, each a thread in this process that owns one worker process
and one pipe to it, and takes jobs from one queue in submission order. A monitor thread
holds the deadlines: a job still running at its deadline gets its worker SIGKILLed (by
PID: only that worker, the others go on), and the slot starts a fresh worker for its next
job. Workers start when their slot first has a job.

Why not a library pool: `concurrent.futures.ProcessPoolExecutor` cannot kill one worker
(it does not say which process runs a job, and one dead worker breaks the whole executor,
failing every job in flight); `multiprocessing.Pool` never resolves the task of a killed
worker; pebble's `ProcessPool` has per-job time-outs, but its workers share one channel
under one process-shared lock, and a worker killed while holding it stalls the pool for
good (noxdafox/pebble#163). One pipe per worker has no shared lock to lose.

How it fails (what the future of `submit_call` gives):
- the job raised: that exception (the pool is fine);
- the worker died (a codec crash on a hostile file, the OOM killer): the job is tried once
  more on a fresh worker, then `WorkerLost("worker-crashed")`;
- the job ran past its deadline: the worker is killed, `WorkerLost("worker-timeout")`;
  not retried (a hang on one file is usually the file);
- the pool was closed before or while the job ran: cancelled, or `PoolClosed`.
`submit` (compress one instance given as bytes) turns `WorkerLost` into a pass-through
`Result` with the reason instead.

Priority: workers run at nice 10 and SCHED_IDLE, so that compression yields the CPU to the
receiver (docs/benchmarks.md), but only when a throwaway probe process made those calls
and lived: under systemd's `SystemCallFilter=~@resources` they are answered with SIGSYS,
which kills the caller and which no `except` can catch. The probe runs once, before the
first worker starts; its verdict is logged (`pack.worker_priority`). Workers ignore SIGINT
(Ctrl-C reaches the whole process group; the daemon shuts them down) and are not dumpable
(no core file of a process that holds decrypted images and the spool key).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from appliance.pack.codec import _CODEC_NAMES, Result, _passthrough, compress

log = structlog.get_logger("appliance.pack")

WORKER_NICE = 10
DEFAULT_TIMEOUT_S = 60.0  # for `submit` (tests, benches); the packer passes its own
STOP_GRACE_S = 5.0  # a worker asked to stop, or killed, has this long to go
PROBE_TIMEOUT_S = 60.0  # the priority probe (a forkserver start on a loaded box)
_PR_SET_DUMPABLE = 4


class WorkerLost(Exception):
    """The worker running a job died ("worker-crashed") or was killed at the job's
    deadline ("worker-timeout"). `reason` is that string (a `codec.REASONS` key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PoolClosed(RuntimeError):
    """The codec pool was closed before or while this job ran."""


# --- in the worker processes ------------------------------------------------------------


def _lower_priority() -> None:
    os.nice(WORKER_NICE)
    # SCHED_IDLE: run only on CPU time nothing else wants (Linux).
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _not_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): no core file, and no ptrace by other processes of the
    same user. prctl is in systemd's @system-service set."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _priority_probe() -> None:
    """In a throwaway process: make the priority calls. Exit 0 = allowed; killed by
    SIGSYS = a seccomp filter forbids them; exit 3 = refused with an error."""
    _not_dumpable()
    try:
        _lower_priority()
    except (OSError, AttributeError):
        os._exit(3)


def _worker_init(lower_priority: bool) -> None:
    """Ctrl-C goes to the whole foreground process group: the daemon decides when
    workers stop. pydicom's encoder logs failed encodes with a traceback (never an
    identifier, but not our log format either); the Result reason carries the news."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _not_dumpable()
    if lower_priority:
        with contextlib.suppress(OSError, AttributeError):
            _lower_priority()
    lg = logging.getLogger("pydicom")
    lg.handlers[:] = [logging.NullHandler()]
    lg.propagate = False


def _sendable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__} (not picklable)")


def _worker_main(conn: Connection, lower_priority: bool) -> None:
    """A worker: run (fn, args) messages until None or the pipe closes."""
    _worker_init(lower_priority)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args = msg
        try:
            out: tuple[str, Any] = ("ok", fn(*args))
        except Exception as e:
            out = ("err", _sendable(e))
        try:
            try:
                conn.send(out)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                conn.send(("err", RuntimeError(f"result not picklable: {type(e).__name__}")))
        except OSError:  # the pool is gone
            return


# --- in the daemon ----------------------------------------------------------------------


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    timeout_s: float
    future: Future[Any]
    on_lost: Callable[[str], Any] | None
    retries: int = 1


class _Slot:
    """One worker process and its pipe; `deadline` and `timed_out` are guarded by the
    pool's condition (the monitor reads them)."""

    def __init__(self) -> None:
        self.proc: Any = None  # multiprocessing Process of the pool's context
        self.conn: Connection | None = None
        self.tasks = 0
        self.deadline: float | None = None
        self.timed_out = False


class CodecPool:
    """Module-level functions in worker processes, each job with a time limit.

    `workers=0` means os.cpu_count(). The start method is "forkserver" (default) or
    "spawn", never "fork": the daemon has threads. `max_tasks_per_child` recycles a
    worker after that many jobs. `lower_priority=False` skips the nice/SCHED_IDLE probe
    and calls (benches that want equal footing).
    """

    def __init__(self, workers: int = 0, *, start_method: str = "forkserver",
                 max_tasks_per_child: int | None = None, lower_priority: bool = True) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn'")
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.workers = workers or os.cpu_count() or 1
        self._ctx: Any = multiprocessing.get_context(start_method)  # a Process factory
        if start_method == "forkserver":
            # import numpy/pydicom/openjpeg and the job functions once in the server
            self._ctx.set_forkserver_preload(["appliance.pack.packer"])
        self._max_tasks = max_tasks_per_child
        self._want_low_priority = lower_priority
        self._priority: bool | None = None  # the probe's verdict, once known
        self._probe_lock = threading.Lock()
        self._cv = threading.Condition()
        self._closed = False
        self._abandoned = False  # close() gave up waiting: running jobs get PoolClosed
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._slots = [_Slot() for _ in range(self.workers)]
        self._serving = self.workers  # slot threads not yet finished (the monitor waits for 0)
        self._threads = [threading.Thread(target=self._serve, args=(s,), daemon=True,
                                          name=f"codec-slot-{i}") for i, s in enumerate(self._slots)]
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="codec-deadlines")
        for t in (*self._threads, self._monitor):
            t.start()

    # --- the public interface ---

    def submit(self, part10: bytes, codec: str = "jpeg2000", verify: bool = True,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Future[Result]:
        """`compress` in a worker; a lost worker gives a pass-through with its reason."""
        if codec not in _CODEC_NAMES:
            raise ValueError(f"unknown codec {codec!r}")
        return self.submit_call(compress, (part10, codec, verify), timeout_s,
                                on_lost=lambda reason: _passthrough(part10, reason))

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float,
                    on_lost: Callable[[str], Any] | None = None) -> Future[Any]:
        """Run a module-level `fn(*args)` in a worker, killed after `timeout_s` seconds of
        running (time waiting in the queue does not count). The future gives fn's result
        or exception; `WorkerLost` when the worker died twice or timed out, unless
        `on_lost(reason)` (called in this process) gives the result instead."""
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        job = _Job(fn, args, timeout_s, Future(), on_lost)
        with self._cv:
            if self._closed:
                raise PoolClosed("the codec pool is closed")
            self._jobs.put(job)
        return job.future

    def pids(self) -> list[int]:
        """PIDs of the worker processes started and not yet reaped (for tests)."""
        return [p.pid for p in (s.proc for s in self._slots) if p is not None]

    def close(self, wait: bool = True, cancel_futures: bool = False,
              grace_s: float | None = None) -> None:
        """Stop taking jobs and stop the workers once the queued jobs are done (with
        `cancel_futures`, queued jobs are cancelled instead). With `wait`, return when
        the workers are gone; with `grace_s`, running jobs get that long, then their
        workers are killed and their futures raise PoolClosed."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while True:
                    job = self._jobs.get_nowait()
                    if job is not None:
                        job.future.cancel()
        for _ in self._slots:
            self._jobs.put(None)
        if not wait:
            return
        end = None if grace_s is None else time.monotonic() + grace_s
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._abandon()
            for t in self._threads:
                t.join()
        self._monitor.join()

    def __enter__(self) -> CodecPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the slot threads ---

    def _serve(self, slot: _Slot) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                if job.future.set_running_or_notify_cancel():
                    try:
                        self._run(slot, job)
                    except Exception as e:  # a bug here must not strand the job or the slot
                        log.error("pack.pool_error", exc_info=e)
                        if not job.future.done():
                            job.future.set_exception(e)
            self._stop_worker(slot)
        finally:
            with self._cv:
                self._serving -= 1
                self._cv.notify_all()

    def _run(self, slot: _Slot, job: _Job) -> None:
        tries = 1 + job.retries
        while True:
            tries -= 1
            outcome, value = self._attempt(slot, job)
            if outcome == "lost" and value == "worker-crashed" and tries > 0 and not self._abandoned:
                continue
            break
        if outcome == "ok":
            job.future.set_result(value)
        elif outcome == "err":
            job.future.set_exception(value)
        elif outcome == "closed":
            job.future.set_exception(PoolClosed("the codec pool was closed while this job ran"))
        elif job.on_lost is not None:
            try:
                job.future.set_result(job.on_lost(value))
            except Exception as e:
                job.future.set_exception(e)
        else:
            job.future.set_exception(WorkerLost(value))

    def _attempt(self, slot: _Slot, job: _Job) -> tuple[str, Any]:
        """One try: ("ok", result) | ("err", exception) | ("lost", reason) | ("closed", None)."""
        try:
            self._ensure_worker(slot)
        except Exception as e:
            log.error("pack.worker_start_failed", error_type=type(e).__name__)
            return "lost", "worker-crashed"
        assert slot.conn is not None
        with self._cv:
            slot.deadline = time.monotonic() + job.timeout_s
            slot.timed_out = False
            self._cv.notify_all()
        msg: tuple[str, Any] | None = None
        try:
            slot.conn.send((job.fn, job.args))
            msg = slot.conn.recv()
        except (EOFError, OSError):  # the worker died, or the monitor killed it
            pass
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # the job's args
            msg = ("err", e)
        with self._cv:
            slot.deadline = None
            timed_out, slot.timed_out = slot.timed_out, False
        if msg is None or timed_out:
            self._reap(slot)
        if msg is not None:
            slot.tasks += 1
            if self._max_tasks and slot.tasks >= self._max_tasks:
                self._stop_worker(slot)
            return msg
        if self._abandoned:
            return "closed", None
        return "lost", "worker-timeout" if timed_out else "worker-crashed"

    def _ensure_worker(self, slot: _Slot) -> None:
        if slot.proc is not None and slot.proc.is_alive():
            return
        self._reap(slot)
        lower = self._priority_allowed()
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, lower), daemon=True,
                                 name="appliance-codec")
        try:
            proc.start()
        finally:
            child.close()  # only the worker holds its end: its death is EOF here
        slot.proc, slot.conn, slot.tasks = proc, parent, 0

    def _reap(self, slot: _Slot) -> None:
        """Forget a dead (or to-be-killed) worker: close the pipe, kill, wait."""
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        if slot.proc is not None:
            if slot.proc.is_alive():
                slot.proc.kill()
            slot.proc.join(STOP_GRACE_S)
            slot.proc = None

    def _stop_worker(self, slot: _Slot) -> None:
        """Ask an idle worker to exit; kill it if it does not within STOP_GRACE_S."""
        if slot.conn is not None:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
        if slot.proc is not None:
            slot.proc.join(STOP_GRACE_S)
        self._reap(slot)

    def _abandon(self) -> None:
        with self._cv:
            self._abandoned = True
            for s in self._slots:
                if s.deadline is not None and s.proc is not None:
                    s.deadline = None
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(s.proc.pid, signal.SIGKILL)

    # --- deadlines ---

    def _watch(self) -> None:
        """Kill the worker of every job past its deadline (SIGKILL: it also ends a
        stopped process, and nothing in the worker needs to cooperate)."""
        with self._cv:
            while self._serving:
                now = time.monotonic()
                nearest: float | None = None
                for s in self._slots:
                    if s.deadline is None:
                        continue
                    if s.deadline <= now:
                        s.deadline, s.timed_out = None, True
                        log.warning("pack.worker_killed", pid=s.proc.pid, reason="worker-timeout")
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(s.proc.pid, signal.SIGKILL)
                    else:
                        nearest = s.deadline if nearest is None else min(nearest, s.deadline)
                # wake at the nearest deadline; a new job or close() notifies sooner
                self._cv.wait(None if nearest is None else nearest - now)

    # --- priority ---

    def _priority_allowed(self) -> bool:
        with self._probe_lock:
            if self._priority is None:
                self._priority = self._want_low_priority and self._probe()
            return self._priority

    def _probe(self) -> bool:
        p = self._ctx.Process(target=_priority_probe, daemon=True, name="appliance-codec-probe")
        p.start()
        p.join(PROBE_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
            outcome = "timeout"
        else:
            outcome = _exit_name(p.exitcode or 0)
        lowered = outcome == "ok"
        log.info("pack.worker_priority", lowered=lowered, nice=WORKER_NICE if lowered else 0,
                 sched_idle=lowered, probe=outcome)
        return lowered


def _exit_name(code: int) -> str:
    """"ok", the signal's name ("SIGSYS") or "exit N" for a process exit code."""
    if code == 0:
        return "ok"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"

"""The codec worker pool: `compress` and other module-level jobs in worker processes.

Owns the worker processes (never "fork" from the threaded daemon: "forkserver" by default,
with numpy, pydicom and the codecs preloaded once in the server). The OpenJPEG encoder holds
the GIL and is not thread-safe, so compression cannot run on the daemon's threads.

How it fails: a worker that dies (a codec crash on a hostile file) breaks the executor; the
pool is rebuilt, the job is tried once more, and if that also kills a worker the caller's
`on_crash` result is used (for `submit`: a pass-through with reason "worker-crashed").
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from appliance.pack.codec import _CODEC_NAMES, Result, _passthrough, compress

WORKER_NICE = 10


def _worker_init() -> None:
    """In each worker: pydicom's encoder logs failed encodes with a traceback (never an
    identifier, but not our log format either); the Result reason carries the news.

    Workers run at a lower CPU priority: on a 2-core box compression competes with the
    receiver, and a scanner kept waiting for C-STORE responses is the worse outcome
    (compression catches up as soon as the scanner pauses; docs/benchmarks.md).
    """
    with contextlib.suppress(OSError, AttributeError):
        os.nice(WORKER_NICE)
        # SCHED_IDLE: run only on CPU time nothing else wants (Linux).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    lg = logging.getLogger("pydicom")
    lg.handlers[:] = [logging.NullHandler()]
    lg.propagate = False


class CodecPool:
    """`compress` in worker processes.

    `workers=0` means os.cpu_count(). The start method is "forkserver" (default) or
    "spawn", never "fork": the daemon has threads. `submit` returns a Future that always
    resolves to a Result: when a worker dies (a codec crash on a hostile file), the pool
    is rebuilt, the instance is tried once more, and if that also kills the worker it
    comes back as a passthrough with reason "worker-crashed". Other work in flight when
    a worker dies is retried the same way.
    """

    def __init__(self, workers: int = 0, *, start_method: str = "forkserver",
                 max_tasks_per_child: int | None = None) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn'")
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.workers = workers or os.cpu_count() or 1
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # import numpy/pydicom/openjpeg once in the server, not in every worker
            self._ctx.set_forkserver_preload(["appliance.pack.codec"])
        self._max_tasks = max_tasks_per_child
        self._lock = threading.Lock()
        self._closed = False
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self._ctx,
                                   initializer=_worker_init,
                                   max_tasks_per_child=self._max_tasks)

    def submit(self, part10: bytes, codec: str = "jpeg2000", verify: bool = True) -> Future[Result]:
        if codec not in _CODEC_NAMES:
            raise ValueError(f"unknown codec {codec!r}")
        return self.submit_call(compress, (part10, codec, verify),
                                lambda: _passthrough(part10, "worker-crashed"))

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...],
                    on_crash: Callable[[], Any]) -> Future[Any]:
        """Run a module-level `fn(*args)` in a worker, with the crash handling above;
        `on_crash()` (called in this process) gives the result when workers keep dying.
        Exceptions `fn` raises reach the caller through the future."""
        outer: Future[Any] = Future()
        self._dispatch(outer, fn, args, on_crash, retries=1)
        return outer

    def _replace_executor(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken and not self._closed:
                self._executor = self._new_executor()
        broken.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self, outer: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
                  on_crash: Callable[[], Any], retries: int) -> None:
        for _ in range(3):
            with self._lock:
                if self._closed:
                    raise RuntimeError("CodecPool is closed")
                executor = self._executor
            try:
                inner = executor.submit(fn, *args)
                break
            except BrokenProcessPool:
                self._replace_executor(executor)
            except RuntimeError:  # shut down under us because another thread replaced it
                with self._lock:
                    if self._closed or self._executor is executor:
                        raise
        else:
            raise RuntimeError("CodecPool cannot start its workers")

        def done(f: Future[Any]) -> None:
            if outer.done():
                return
            try:
                result = f.result()
            except CancelledError:
                outer.cancel()
                return
            except BrokenProcessPool:
                self._replace_executor(executor)
                if retries > 0 and not self._closed:
                    try:
                        self._dispatch(outer, fn, args, on_crash, retries - 1)
                        return
                    except Exception:  # noqa: S110 - closed or broken again: pass through
                        pass
                result = on_crash()
            except Exception as e:
                if fn is not compress:  # a task's own error is the caller's to handle
                    outer.set_exception(e)
                    return
                result = on_crash()
            if not outer.done():
                outer.set_result(result)

        inner.add_done_callback(done)

    def close(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            executor = self._executor
        executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __enter__(self) -> CodecPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The stage supervisor: which stages are idle, working or stuck, and the watchdog's verdict.

Each stage of the flow (receive, pack, forward, later the ops link) is a `Stage`. Work a
stage does is a *job* (`with stage.job("segment"):`), one per thread at a time: a C-STORE
being stored, a segment being packed, a bundle being sent on a lane. Inside a job the
code calls `stage.beat()` whenever it makes progress (an instance written, bytes sent),
and `stage.beat(expect=T)` before a wait that is itself bounded by T seconds (a codec job
with its own time limit), so the supervisor knows how long silence may last.

A job is stuck when it has made no progress for longer than its deadline; a stage is
dead when the thread that should run it has ended. `problems()` lists both; the daemon
sends WATCHDOG=1 to systemd only while that list is empty, so a stuck stage gets the
daemon restarted (WatchdogSec) and recovery resumes its work, instead of a live process
that moves nothing. An idle stage is healthy: no work is not a fault.

The judgement (`assess`) is pure: views and `now` in, problems out; tested without
threads. Problems name stages and job kinds, never an item's content.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobView:
    what: str
    started: float
    last_progress: float
    deadline_s: float


@dataclass(frozen=True)
class StageView:
    name: str
    alive: bool
    jobs: tuple[JobView, ...]
    progress_count: int
    last_progress: float | None


def assess(views: list[StageView], now: float) -> list[str]:
    """What is wrong, one line per problem ([] when every stage is idle or moving)."""
    problems = []
    for v in views:
        if not v.alive:
            problems.append(f"{v.name}: not running")
        for j in v.jobs:
            silent = now - j.last_progress
            if silent > j.deadline_s:
                problems.append(f"{v.name}: {j.what} without progress for {silent:.0f} s"
                                f" (limit {j.deadline_s:.0f} s)")
    return problems


def describe(view: StageView, now: float) -> dict[str, Any]:
    """One stage for `appliance status` (and later metrics and heartbeats)."""
    stuck = [j for j in view.jobs if now - j.last_progress > j.deadline_s]
    state = "dead" if not view.alive else "stuck" if stuck else "busy" if view.jobs else "idle"
    return {
        "state": state,
        "jobs": len(view.jobs),
        "oldest_job_s": round(max((now - j.started for j in view.jobs), default=0.0), 1),
        "progress": view.progress_count,
        "since_progress_s": None if view.last_progress is None else round(now - view.last_progress, 1),
    }


class _Job:
    __slots__ = ("deadline_s", "last_progress", "started", "what")

    def __init__(self, what: str, now: float, deadline_s: float) -> None:
        self.what = what
        self.started = now
        self.last_progress = now
        self.deadline_s = deadline_s


class Stage:
    """One stage's liveness record. Thread-safe and cheap enough for per-instance calls."""

    def __init__(self, name: str, deadline_s: float, alive: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.deadline_s = deadline_s
        self._alive = alive or (lambda: True)
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}  # thread ident -> its current job
        self._progress = 0
        self._last_progress: float | None = None

    @contextlib.contextmanager
    def job(self, what: str, deadline_s: float | None = None) -> Iterator[None]:
        """Mark this thread busy with `what` until the block ends."""
        key = threading.get_ident()
        with self._lock:
            outer = self._jobs.get(key)
            self._jobs[key] = _Job(what, self._clock(), deadline_s or self.deadline_s)
        try:
            yield
        finally:
            with self._lock:
                if outer is None:
                    self._jobs.pop(key, None)
                else:
                    self._jobs[key] = outer

    def beat(self, expect: float | None = None) -> None:
        """Progress now. With `expect`, the next progress may take up to that many seconds
        (this thread's job; e.g. before waiting on work that has its own time limit)."""
        now = self._clock()
        with self._lock:
            self._progress += 1
            self._last_progress = now
            j = self._jobs.get(threading.get_ident())
            if j is not None:
                j.last_progress = now
                j.deadline_s = expect if expect is not None else self.deadline_s

    def view(self) -> StageView:
        with self._lock:
            jobs = tuple(JobView(j.what, j.started, j.last_progress, j.deadline_s)
                         for j in self._jobs.values())
            count, last = self._progress, self._last_progress
        return StageView(self.name, self._alive(), jobs, count, last)


class Supervisor:
    """The registry of stages; the daemon asks it before every watchdog ping."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stages: dict[str, Stage] = {}

    def stage(self, name: str, deadline_s: float, alive: Callable[[], bool] | None = None) -> Stage:
        s = Stage(name, deadline_s, alive, self._clock)
        self._stages[name] = s
        return s

    def problems(self) -> list[str]:
        return assess([s.view() for s in self._stages.values()], self._clock())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {name: describe(s.view(), now) for name, s in self._stages.items()}

"""The stage supervisor: when a stage counts as stuck, and what the watchdog is told."""

from __future__ import annotations

import threading

from appliance.health.supervisor import JobView, Stage, StageView, Supervisor, assess, describe


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _view(jobs: tuple[JobView, ...] = (), alive: bool = True) -> StageView:
    return StageView("pack", alive, jobs, 0, None)


def test_an_idle_stage_is_healthy_however_long_it_idles() -> None:
    assert assess([_view()], now=10**9) == []


def test_a_job_is_stuck_only_after_its_deadline_without_progress() -> None:
    job = JobView("segment", started=0.0, last_progress=100.0, deadline_s=60.0)
    assert assess([_view((job,))], now=160.0) == []
    assert assess([_view((job,))], now=161.0) == [
        "pack: segment without progress for 61 s (limit 60 s)"]


def test_a_dead_stage_thread_is_a_problem_even_when_idle() -> None:
    assert assess([_view(alive=False)], now=0.0) == ["pack: not running"]


def test_beats_keep_a_long_job_alive_and_expect_stretches_one_wait() -> None:
    clock = Clock()
    sup = Supervisor(clock)
    stage = sup.stage("pack", deadline_s=30)
    with stage.job("segment"):
        for _ in range(10):  # a long segment that keeps writing instances
            clock.t += 20
            stage.beat()
        assert sup.problems() == []
        stage.beat(expect=300)  # about to wait on a codec job limited to 300 s
        clock.t += 200
        assert sup.problems() == []
        clock.t += 101
        assert sup.problems() == ["pack: segment without progress for 301 s (limit 300 s)"]
        stage.beat()  # the wait ended: back to the stage's own limit
        clock.t += 31
        assert len(sup.problems()) == 1
    assert sup.problems() == []  # the job ended: idle again


def test_jobs_on_different_threads_are_judged_apart() -> None:
    """Forward lanes and receive associations: one stuck job is seen beside a moving one."""
    clock = Clock()
    sup = Supervisor(clock)
    stage = sup.stage("forward", deadline_s=10)
    entered, release = threading.Event(), threading.Event()

    def stuck_lane() -> None:
        with stage.job("send"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=stuck_lane)
    t.start()
    entered.wait(10)
    with stage.job("send"):
        clock.t += 11
        stage.beat()  # this lane moves; the other does not
        assert sup.problems() == ["forward: send without progress for 11 s (limit 10 s)"]
        assert describe(stage.view(), clock.t)["state"] == "stuck"
    release.set()
    t.join(10)
    assert describe(stage.view(), clock.t) == {"state": "idle", "jobs": 0, "oldest_job_s": 0.0,
                                               "progress": 1, "since_progress_s": 0.0}


def test_nested_jobs_restore_the_outer_one() -> None:
    stage = Stage("pack", 10)
    with stage.job("outer"):
        with stage.job("inner"):
            assert [j.what for j in stage.view().jobs] == ["inner"]
        assert [j.what for j in stage.view().jobs] == ["outer"]
    assert stage.view().jobs == ()

"""The health gate's table (appliance/update/gate.py): keep, wait or reject a boot."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.update.gate import DEADLINE_S, MAX_RESTARTS, Observation, judge

HEALTHY = Observation(unit_state="active", restarts=0, problems=(), config_ok=True,
                      ops_link_up=None, ops_link_was_up=False)


def test_ready_and_healthy_daemon_keeps_the_slot() -> None:
    assert judge(HEALTHY, 30.0)[0] == "keep"


def test_config_that_does_not_check_rejects_at_once() -> None:
    assert judge(replace(HEALTHY, config_ok=False), 1.0) == ("reject", "the config does not check")


def test_failed_unit_rejects_at_once() -> None:
    assert judge(replace(HEALTHY, unit_state="failed", problems=None), 1.0)[0] == "reject"


def test_daemon_restarted_max_times_rejects() -> None:
    verdict, why = judge(replace(HEALTHY, unit_state="activating", restarts=MAX_RESTARTS), 1.0)
    assert verdict == "reject" and str(MAX_RESTARTS) in why


def test_daemon_restarted_fewer_times_waits() -> None:
    assert judge(replace(HEALTHY, unit_state="activating", restarts=MAX_RESTARTS - 1), 1.0)[0] == "wait"


@pytest.mark.parametrize("change", [
    {"unit_state": "activating"},  # READY not sent yet
    {"problems": None},  # the control socket does not answer
    {"problems": ("pack: not running",)},  # the supervisor sees a problem
    {"ops_link_was_up": True, "ops_link_up": False},  # the ops link does not come back
])
def test_unmet_condition_waits_before_the_deadline(change: dict[str, object]) -> None:
    assert judge(replace(HEALTHY, **change), DEADLINE_S - 1)[0] == "wait"  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"unit_state": "activating"},
    {"problems": ("pack: not running",)},
    {"ops_link_was_up": True, "ops_link_up": False},
])
def test_unmet_condition_rejects_at_the_deadline(change: dict[str, object]) -> None:
    verdict, why = judge(replace(HEALTHY, **change), DEADLINE_S)  # type: ignore[arg-type]
    assert verdict == "reject" and "within 600 s" in why


def test_ops_link_down_before_the_update_need_not_come_up() -> None:
    assert judge(replace(HEALTHY, ops_link_up=False, ops_link_was_up=False), 1.0)[0] == "keep"


def test_ops_link_up_again_keeps_the_slot() -> None:
    assert judge(replace(HEALTHY, ops_link_up=True, ops_link_was_up=True), 1.0)[0] == "keep"


def test_more_spool_entries_failing_authentication_than_before_rejects_at_once() -> None:
    o = replace(HEALTHY, spool_failures_before=2, spool_failures_now=3)
    assert judge(o, 1.0) == ("reject", "1 spool entry newly fails authentication")


def test_as_many_spool_entries_failing_as_before_keeps_the_slot() -> None:
    assert judge(replace(HEALTHY, spool_failures_before=2, spool_failures_now=2), 1.0)[0] == "keep"


def test_spool_not_counted_on_this_slot_waits_then_rejects() -> None:
    o = replace(HEALTHY, spool_failures_before=0, spool_failures_now=None)
    assert judge(o, 1.0)[0] == "wait"
    assert judge(o, DEADLINE_S)[0] == "reject"


def test_trial_record_without_a_spool_count_skips_the_condition() -> None:
    assert judge(replace(HEALTHY, spool_failures_before=None, spool_failures_now=5), 1.0)[0] == "keep"

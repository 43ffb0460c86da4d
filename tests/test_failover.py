"""forward.failover: destination health, pure (no clock, no I/O), table by table."""

from __future__ import annotations

import pytest

from appliance.forward import Permanent, Retryable, Unreadable, failover
from appliance.forward.failover import Event, Health, Settings

S = Settings(down_after=3, probe_min_s=5, probe_max_s=60)
UP = Health("a")


def _fail(h: Health, n: int, answers: bool | None = None, now: float = 100.0) -> tuple[Health, list[Event]]:
    events = []
    for _ in range(n):
        h, ev = failover.failed(h, "refused", now, S, 0.0, answers)
        if ev:
            events.append(ev)
    return h, events


@pytest.mark.parametrize(("failures", "answers", "down"), [
    (1, None, False),   # one failure, no probe: it may be a blip
    (2, None, False),
    (3, None, True),    # down_after in a row
    (1, True, False),   # failed, but answers a probe right after: given its chances
    (2, True, False),
    (3, True, True),    # ... still down after down_after, whatever the probes said
    (1, False, True),   # failed and the probe right after failed too: down at once
])
def test_a_destination_goes_down_after_down_after_failures_or_one_confirmed_by_a_probe(
        failures: int, answers: bool | None, down: bool) -> None:
    h, events = _fail(UP, failures, answers)
    assert h.up is not down
    assert events == ([Event("a", "up", "down", "refused")] if down else [])


def test_going_down_sets_since_and_the_first_probe_within_probe_min_s() -> None:
    h, _ = _fail(UP, 1, answers=False, now=1000.0)
    assert (h.since, h.failures, h.probes, h.last_error) == (1000.0, 1, 0, "refused")
    assert 1000.0 + S.probe_min_s * (1 - failover.JITTER) <= h.next_probe <= 1000.0 + S.probe_min_s


def test_a_success_between_failures_starts_the_count_again() -> None:
    h, _ = _fail(UP, 2)
    h, ev = failover.answered(h, 200.0, "delivered")
    assert (h.up, h.failures, ev) == (True, 0, None)
    h, events = _fail(h, 2)
    assert h.up and not events


def test_a_failure_of_an_attempt_in_flight_when_it_went_down_changes_nothing_but_the_count() -> None:
    h, _ = _fail(UP, 3)
    again, ev = failover.failed(h, "timeout", 500.0, S, 0.5)
    assert ev is None and not again.up
    assert (again.since, again.next_probe) == (h.since, h.next_probe)  # its probe back-off is kept


@pytest.mark.parametrize(("probes", "u", "delay"), [
    (0, 0.0, 5.0), (1, 0.0, 10.0), (2, 0.0, 20.0), (3, 0.0, 40.0), (4, 0.0, 60.0), (50, 0.0, 60.0),
    (0, 0.5, 4.5), (4, 0.999, 60.0 * (1 - 0.2 * 0.999)),
])
def test_probes_back_off_doubling_from_probe_min_to_probe_max_with_jitter(
        probes: int, u: float, delay: float) -> None:
    assert failover.probe_delay(probes, S, u) == pytest.approx(delay)


def test_an_unanswered_probe_pushes_the_next_one_further() -> None:
    h, _ = _fail(UP, 1, answers=False, now=0.0)
    times = []
    for now in (5.0, 15.0, 35.0, 75.0, 135.0):
        h = failover.unanswered(h, now, S, 0.0)
        times.append(h.next_probe - now)
    assert times == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert not h.up and h.probes == 5


def test_an_answered_probe_brings_it_back_up_with_an_event() -> None:
    h, _ = _fail(UP, 1, answers=False, now=0.0)
    h = failover.unanswered(h, 5.0, S, 0.0)
    back, ev = failover.answered(h, 20.0, "probe answered")
    assert ev == Event("a", "down", "up", "probe answered")
    assert (back.up, back.since, back.failures, back.probes, back.next_probe) == (True, 20.0, 0, 0, 0.0)


def test_unanswered_on_an_up_destination_changes_nothing() -> None:
    assert failover.unanswered(UP, 10.0, S, 0.3) == UP


def test_only_down_destinations_whose_probe_is_due_are_probed() -> None:
    hs = [Health("a", up=False, next_probe=10.0), Health("b", up=False, next_probe=30.0), Health("c")]
    assert failover.due(hs, 20.0) == ["a"]
    assert failover.due(hs, 30.0) == ["a", "b"]


@pytest.mark.parametrize(("down", "picked"), [
    ((), "a"), (("a",), "b"), (("a", "b"), "c"), (("b",), "a"), (("a", "b", "c"), None),
])
def test_a_claim_goes_to_the_first_destination_in_config_order_that_is_up(
        down: tuple[str, ...], picked: str | None) -> None:
    hs = {n: Health(n, up=n not in down) for n in "abc"}
    assert failover.pick(["a", "b", "c"], hs) == picked


def test_a_destination_never_seen_before_counts_as_up() -> None:
    assert failover.pick(["new", "b"], {"b": Health("b")}) == "new"
    assert failover.any_up(["a", "new"], {"a": Health("a", up=False)}, but="a")
    assert not failover.any_up(["a", "b"], {"b": Health("b", up=False)}, but="a")


@pytest.mark.parametrize(("message", "permanent", "cls"), [
    ("cannot connect to the PACS at 10.0.0.1:104: [Errno 111] Connection refused", False, "refused"),
    ("the PACS at h:104 refused the connection (is it running?)", False, "refused"),
    ("connecting to the PACS at h:104 timed out after 30 s", False, "timeout"),
    ("no answer from the PACS to the association request within 30 s", False, "timeout"),
    ("the copy ran out of its time budget (is the folder very slow?)", False, "timeout"),
    ("destination folder /mnt/nas does not exist (not mounted?)", False, "missing"),
    ("cannot resolve the PACS host name 'pacs.example'", False, "unreachable"),
    ("the PACS aborted the association request", False, "connection lost"),
    ("the PACS rejected the association permanently: called AE title not recognised", True, "rejected"),
    ("something new", False, "failed"),
])
def test_a_failure_is_reported_as_a_class_never_as_its_text(message: str, permanent: bool, cls: str) -> None:
    assert failover.reason_class(message, permanent) == cls


@pytest.mark.parametrize(("error", "scope"), [
    (Retryable("refused"), "destination"),
    (Permanent("rejected the association"), "destination"),
    (Retryable("no answer while sending instance 3", instances=(3,)), "instance"),
    (Permanent("refused instance 1", instances=(1,)), "instance"),
    (Unreadable("bundle does not verify"), "bundle"),
    (Permanent("bundle file vanished from the queue", bundle=True), "bundle"),
    (Retryable("cannot read the bundle", bundle=True), "bundle"),
])
def test_only_a_failure_without_instances_that_is_not_the_bundles_is_the_destinations(
        error: Retryable | Permanent, scope: str) -> None:
    assert error.scope == scope

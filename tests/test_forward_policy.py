"""forward.policy: what a failed attempt does to its bundle's instances (pure)."""

from __future__ import annotations

from appliance.forward.policy import Decision, Failure, decide, needs_probe


def test_a_failure_nobody_is_blamed_for_backs_off_or_holds_the_bundle() -> None:
    assert decide(Failure(False, (), 0, 0)) == Decision("defer")
    assert decide(Failure(True, (), 5, 0)) == Decision("refuse")


def test_instances_the_destination_refuses_are_parked_at_once_and_the_rest_goes() -> None:
    assert decide(Failure(True, (3, 4), 0, 0)) == Decision("again", park=(3, 4))


def test_a_choke_without_proof_that_the_destination_works_only_marks_a_suspect() -> None:
    """Nothing stored yet: the destination may be down; no strike, back off."""
    assert decide(Failure(False, (0,), 0, 0)) == Decision("defer", suspect=(0,))


def test_a_choke_after_others_were_stored_strikes_and_the_rest_goes_at_once() -> None:
    assert decide(Failure(False, (2,), 2, 0)) == Decision("again", suspect=(2,), strike=True)
    assert decide(Failure(False, (2,), 0, 5)) == Decision("again", suspect=(2,), strike=True)


def test_a_suspect_is_parked_on_its_second_strike() -> None:
    assert decide(Failure(False, (2,), 0, 5, strikes={2: 1})) == Decision("again", park=(2,), strike=True)
    assert decide(Failure(False, (2,), 0, 5, strikes={2: 0}), park_after=3).park == ()


def test_a_parked_instance_sent_alone_is_held_again_or_retried_never_parked_again() -> None:
    assert decide(Failure(True, (0,), 0, 0, parked_item=True)) == Decision("refuse")
    assert decide(Failure(False, (0,), 0, 0, parked_item=True)) == Decision("defer")


def test_a_destination_that_answers_a_probe_is_proof_enough_to_strike() -> None:
    assert decide(Failure(False, (0,), 0, 0, answers=True)) == Decision("again", suspect=(0,), strike=True)
    assert decide(Failure(False, (0,), 0, 0, strikes={0: 1}, answers=True)).park == (0,)


def test_a_probe_is_asked_only_when_nothing_else_decides() -> None:
    assert needs_probe(Failure(False, (0,), 0, 0))
    assert not needs_probe(Failure(False, (0,), 1, 0))  # the bundle itself proves it
    assert not needs_probe(Failure(True, (0,), 0, 0))  # refused: parked anyway
    assert not needs_probe(Failure(False, (), 0, 0))  # nobody blamed: the destination's
    assert not needs_probe(Failure(False, (0,), 0, 0, parked_item=True))

"""Sending state (contract sections 5 and 12) on real SQLite and PostgreSQL warehouses: which
events a sender may take (`claim_many`), the answers written back (`settle_many`), claims given
back unsent (`release_many`), the requests of a sender that stopped (`recover_abandoned`), and
whether a sender has anything to do (`has_sendable`). Events are recorded by the pipeline's
extract stage; the claims are made here, as a sender makes them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from lead_sync import stages
from lead_sync.clock import as_utc
from lead_sync.delivery import claims
from lead_sync.delivery.claims import Claim, Outcome, Settled
from lead_sync.read.config import load_config

from tests.support import signups
from tests.support.audit import age_event, outbox_body, row
from tests.support.seeding import PARTITION, new_run_id, seed, signup, verification
from tests.support.sending import sending

LEASE = 60.0


def now() -> datetime:
    return datetime.now(timezone.utc)


def delivered(http: int = 200) -> Outcome:
    return Outcome("delivered", http, 5, None, "{}", status="delivered", reason=None)


def open_again(next_attempt_at: datetime | None = None) -> Outcome:
    """A 500 that keeps the event open: for this run (no `next_attempt_at`) or for a later one."""
    return Outcome("retry", 500, 5, None, "oops", status=None, reason="retrying: HTTP 500",
                   next_attempt_at=next_attempt_at)


def settle(wh, run_id: str, *items: Settled) -> None:
    with wh.engine.begin() as conn:
        claims.settle_many(conn, run_id, list(items))


def answer(claim: Claim, outcome: Outcome, at: datetime, hold: float | None = None) -> Settled:
    return Settled(claim.event_key, claim.attempt, at, outcome, at, hold)


def take(wh, run_id: str, at: datetime, *, new: int = 0, keys: tuple[str, ...] = (), sender: str | None = None,
         not_tried_since: datetime | None = None, **kinds) -> claims.Claimed:
    return claims.claim_many(wh.engine, run_id, LEASE, not_tried_since or at, keys=keys, new=new, sender=sender,
                             now=at, **kinds)


def leased(wh, cid: int, event: str = "signup_started") -> tuple:
    found = row(wh, cid, event)
    return found["attempts"], found["inflight_run_id"], as_utc(found["inflight_until"]), found["inflight_sender"]


# --- claim_many ------------------------------------------------------------------------------

def test_a_claim_takes_the_oldest_events_with_their_bodies_and_leases_each(warehouse):
    seed(warehouse, signup(1, 2), signup(2, 0), signup(3, 1))
    at = now()
    taken = take(warehouse, "run_a", at, new=2)
    assert [c.event_key for c in taken.claims] == [row(warehouse, 2)["event_key"], row(warehouse, 3)["event_key"]]
    assert [c.attempt for c in taken.claims] == [1, 1] and {c.retry_since for c in taken.claims} == {at}
    assert taken.bodies == {c.event_key: outbox_body(warehouse, c.event_key) for c in taken.claims}
    assert not taken.firsts_short  # as many as asked for were there
    for cid in (2, 3):
        assert leased(warehouse, cid) == (1, "run_a", at + timedelta(seconds=LEASE), None)
        claimed = row(warehouse, cid)
        assert {as_utc(claimed[c]) for c in ("first_attempt_at", "retry_since", "last_attempt_at")} == {at}
    assert leased(warehouse, 1) == (0, None, None, None)


def test_an_event_leased_to_one_sender_is_taken_by_no_other(warehouse):
    seed(warehouse, signup(1), signup(2, 1))
    at = now()
    mine = take(warehouse, "run_a", at, new=5, sender="a")
    assert len(mine.claims) == 2 and mine.firsts_short  # fewer than asked: none is left
    keys = tuple(c.event_key for c in mine.claims)
    other = take(warehouse, "run_b", at, new=5, sender="b")
    assert (other.claims, other.firsts_short) == ([], True)
    assert take(warehouse, "run_b", at, keys=keys, sender="b").claims == []
    # Once the lease has run out, it is for recovery to audit the request, not for a claim to take it.
    assert take(warehouse, "run_b", at + timedelta(seconds=LEASE + 1), new=5, keys=keys, sender="b").claims == []
    assert [leased(warehouse, cid)[:2] for cid in (1, 2)] == [(1, "run_a"), (1, "run_a")]


def test_event_two_is_taken_only_once_its_event_one_is_delivered(warehouse):
    seed(warehouse, signup(7, deferred=True), verified=(verification(7),))
    at = now()
    first = take(warehouse, "run_a", at, new=5)
    assert [c.tracking for c in first.claims] == ["deferred_start"]
    assert first.confirms_short  # the event 2 is not there to take yet
    settle(warehouse, "run_a", answer(first.claims[0], delivered(), at))
    second = take(warehouse, "run_a", at + timedelta(seconds=1), new=5, not_tried_since=at)
    assert [c.tracking for c in second.claims] == ["deferred_confirm"]
    assert row(warehouse, 7, "email_verified")["attempts"] == 1


@pytest.mark.parametrize("event_one", ["open", "rejected"])
def test_event_two_waits_while_its_event_one_is_not_delivered(warehouse, event_one):
    seed(warehouse, signup(7, deferred=True), verified=(verification(7),))
    at = now()
    (one,) = take(warehouse, "run_a", at, new=5).claims
    rejected = Outcome("rejected", 422, 5, None, "{}", status="rejected", reason="rejected by the API: HTTP 422")
    settle(warehouse, "run_a", answer(one, open_again() if event_one == "open" else rejected, at))
    later = at + timedelta(seconds=1)
    assert take(warehouse, "run_b", later, new=5, firsts=False).claims == []
    assert row(warehouse, 7, "email_verified")["attempts"] == 0


def test_firsts_limit_bounds_the_event_ones_of_a_claim(warehouse):
    seed(warehouse, signup(1), signup(2, 1), signup(3, 2))
    taken = take(warehouse, "run_a", now(), new=3, firsts_limit=1)
    assert [c.event_key for c in taken.claims] == [row(warehouse, 1)["event_key"]]
    assert not taken.firsts_short  # its share was taken; more are left


def test_a_sender_takes_as_new_only_events_not_tried_since_it_started(warehouse):
    seed(warehouse, signup(1))
    started = now()
    (first,) = take(warehouse, "run_a", started, new=1).claims
    settle(warehouse, "run_a", answer(first, open_again(), started))  # open, tried by this sender
    later = started + timedelta(seconds=1)
    assert take(warehouse, "run_a", later, new=1, not_tried_since=started).claims == []
    # A sender started since would take it as new; this one takes its own retries by key.
    assert claims.sendable_keys(warehouse.engine, False, later, now=later) == [first.event_key]
    assert [c.attempt for c in take(warehouse, "run_a", later, keys=(first.event_key,)).claims] == [2]


def test_an_event_left_for_later_is_taken_only_once_it_is_due(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (first,) = take(warehouse, "run_a", at, new=1).claims
    due = at + timedelta(minutes=5)
    settle(warehouse, "run_a", answer(first, open_again(next_attempt_at=due), at))
    soon = at + timedelta(minutes=1)
    assert take(warehouse, "run_b", soon, new=1).claims == []
    assert take(warehouse, "run_b", soon, keys=(first.event_key,)).claims == []
    assert [c.attempt for c in take(warehouse, "run_b", due, new=1).claims] == [2]


# --- settle_many -----------------------------------------------------------------------------

@pytest.mark.parametrize("status, body_kept", [("delivered", False), ("rejected", False), ("failed", True)])
def test_a_final_answer_closes_the_event_audits_the_attempt_and_drops_only_a_sent_body(warehouse, status, body_kept):
    seed(warehouse, signup(1))
    at = now()
    (claim,) = take(warehouse, "run_a", at, new=1).claims
    http = {"delivered": 200, "rejected": 422, "failed": 500}[status]
    outcome = Outcome(status, http, 7, None, '{"ok": 1}', status=status,
                      reason=None if status == "delivered" else f"{status}: because")
    answered = at + timedelta(seconds=0.25)
    settle(warehouse, "run_a", Settled(claim.event_key, claim.attempt, at, outcome, answered))
    closed = row(warehouse, 1)
    assert (closed["status"], closed["reason"], closed["http_status"]) == (status, outcome.reason, outcome.http_status)
    assert leased(warehouse, 1) == (1, None, None, None)
    assert as_utc(closed["delivered_at"]) == (answered if status == "delivered" else None)
    assert as_utc(closed["updated_at"]) == answered and closed["response"] == '{"ok": 1}'
    (attempt,) = warehouse.attempts()
    assert (attempt["event_key"], attempt["attempt"], attempt["run_id"], attempt["outcome"], attempt["latency_ms"]) == (
        claim.event_key, 1, "run_a", status, 7)
    assert as_utc(attempt["sent_at"]) == at
    # A failed event keeps its body: a rerun of its partition may re-open and send it.
    assert (outbox_body(warehouse, claim.event_key) is not None) == body_kept


def test_an_open_answer_lets_the_event_go_with_its_body_and_its_next_try(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (claim,) = take(warehouse, "run_a", at, new=1).claims
    due = at + timedelta(minutes=5)
    settle(warehouse, "run_a", answer(claim, open_again(next_attempt_at=due), at))
    left = row(warehouse, 1)
    assert (left["status"], left["reason"], as_utc(left["next_attempt_at"])) == ("pending", "retrying: HTTP 500", due)
    assert leased(warehouse, 1) == (1, None, None, None)
    assert outbox_body(warehouse, claim.event_key) is not None
    assert [a["outcome"] for a in warehouse.attempts()] == ["retry"]


def test_an_answer_held_for_a_retry_keeps_the_event_for_its_sender_until_it_lets_go(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (claim,) = take(warehouse, "run_a", at, new=1, sender="a").claims
    settle(warehouse, "run_a", answer(claim, open_again(), at, hold=30.0))
    assert leased(warehouse, 1) == (1, "run_a", at + timedelta(seconds=30), "a")
    later = at + timedelta(seconds=1)
    assert take(warehouse, "run_b", later, new=1, keys=(claim.event_key,), sender="b",
                not_tried_since=later).claims == []
    (again,) = take(warehouse, "run_a", later, keys=(claim.event_key,), sender="a").claims
    assert again.attempt == 2
    settle(warehouse, "run_a", answer(again, open_again(), later, hold=30.0))
    claims.let_go(warehouse.engine, "a")  # the sender stops: it will not make that retry
    assert leased(warehouse, 1) == (2, None, None, None)
    assert [c.attempt for c in take(warehouse, "run_b", later, new=1, sender="b",
                                    not_tried_since=later + timedelta(seconds=1)).claims] == [3]


def test_an_answer_committed_twice_is_audited_once(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (claim,) = take(warehouse, "run_a", at, new=1).claims
    item = answer(claim, delivered(), at)
    settle(warehouse, "run_a", item)
    settle(warehouse, "run_a", item)  # a commit tried again after its acknowledgement was lost
    assert [(a["attempt"], a["outcome"]) for a in warehouse.attempts()] == [(1, "delivered")]
    assert row(warehouse, 1)["status"] == "delivered"


def test_a_late_answer_for_an_event_taken_again_keeps_the_newer_state_and_its_body(warehouse):
    seed(warehouse, signup(1))
    engine = warehouse.engine
    key = row(warehouse, 1)["event_key"]
    at = now()
    (first,) = claims.claim_many(engine, "manual__slow", 0.1, at, keys=[key], now=at).claims
    later = at + timedelta(seconds=1)  # its lease has run out: another sender recovers it
    assert claims.recover_abandoned(engine, "manual__other", now=later) == 1
    (second,) = claims.claim_many(engine, "manual__other", 60, later, keys=[key], now=later).claims
    assert (first.attempt, second.attempt) == (1, 2)
    answered = now()
    ok = Outcome("delivered", 200, 5, None, "{}", status="delivered", reason=None)
    with engine.begin() as conn:  # the first sender's answer, committed late
        claims.settle_many(conn, "manual__slow", [Settled(key, 1, answered, ok, answered)])
    rows = [(r["attempt"], r["outcome"], r["http_status"]) for r in warehouse.attempts()]
    assert rows == [(1, "delivered", 200)]  # it replaced the attempt row audited `unknown`
    event = row(warehouse, 1)
    assert (event["status"], event["attempts"], event["inflight_run_id"]) == ("pending", 2, "manual__other")
    assert outbox_body(warehouse, key) is not None  # still sendable, should the second request fail
    again = Outcome("delivered", 409, 5, None, "{}", status="delivered", reason="409")
    with engine.begin() as conn:
        claims.settle_many(conn, "manual__other", [Settled(key, 2, answered, again, answered)])
    assert [(r["attempt"], r["http_status"]) for r in warehouse.attempts()] == [(1, 200), (2, 409)]
    assert row(warehouse, 1)["status"] == "delivered"
    assert outbox_body(warehouse, key) is None


# --- release_many ----------------------------------------------------------------------------

def test_a_first_claim_given_back_unsent_leaves_the_event_as_if_never_taken(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (claim,) = take(warehouse, "run_a", at, new=1).claims
    with warehouse.engine.begin() as conn:
        claims.release_many(conn, "run_b", [(claim.event_key, claim.attempt)])  # not its claim
    assert leased(warehouse, 1)[:2] == (1, "run_a")
    with warehouse.engine.begin() as conn:
        claims.release_many(conn, "run_a", [(claim.event_key, claim.attempt)] * 2)
    untouched = row(warehouse, 1)
    assert leased(warehouse, 1) == (0, None, None, None)
    assert [untouched[c] for c in ("first_attempt_at", "retry_since", "last_attempt_at")] == [None] * 3
    assert warehouse.attempts() == []
    assert [c.attempt for c in take(warehouse, "run_a", at, new=1).claims] == [1]


def test_a_retry_given_back_unsent_keeps_what_the_earlier_attempts_set(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (first,) = take(warehouse, "run_a", at, new=1).claims
    settle(warehouse, "run_a", answer(first, open_again(), at))
    (second,) = take(warehouse, "run_a", at + timedelta(seconds=2), keys=(first.event_key,)).claims
    with warehouse.engine.begin() as conn:
        claims.release_many(conn, "run_a", [(second.event_key, second.attempt)])
    back = row(warehouse, 1)
    assert leased(warehouse, 1) == (1, None, None, None)
    assert (as_utc(back["first_attempt_at"]), as_utc(back["retry_since"])) == (at, at)
    assert [a["attempt"] for a in warehouse.attempts()] == [1]


# --- recover_abandoned -----------------------------------------------------------------------

def test_a_request_whose_lease_ran_out_is_audited_unknown_once_and_its_event_sent_again(warehouse):
    seed(warehouse, signup(1), signup(2, 1))
    at = now()
    (claim,) = take(warehouse, "run_dead", at, new=1).claims
    assert claims.recover_abandoned(warehouse.engine, "run_next", now=at + timedelta(seconds=LEASE / 2)) == 0
    assert warehouse.attempts() == [] and leased(warehouse, 1)[:2] == (1, "run_dead")  # still its sender's
    assert claims.recover_abandoned(warehouse.engine, "run_next", now=at + timedelta(seconds=LEASE + 1)) == 1
    (unknown,) = warehouse.attempts()
    assert (unknown["event_key"], unknown["attempt"], unknown["run_id"]) == (claim.event_key, 1, "run_dead")
    assert (unknown["outcome"], unknown["http_status"], as_utc(unknown["sent_at"])) == ("unknown", None, at)
    assert "in flight" in unknown["error"] and "run_next" in unknown["error"]
    reopened = row(warehouse, 1)
    assert (reopened["status"], reopened["reason"]) == (
        "pending", "an earlier request's outcome is unknown (sender stopped); sent again")
    assert leased(warehouse, 1) == (1, None, None, None)
    assert claims.recover_abandoned(warehouse.engine, "run_later", now=at + timedelta(seconds=LEASE + 2)) == 0
    assert len(warehouse.attempts()) == 1
    again = take(warehouse, "run_next", at + timedelta(seconds=LEASE + 2), new=2)
    assert sorted((c.event_key, c.attempt) for c in again.claims) == sorted(
        [(claim.event_key, 2), (row(warehouse, 2)["event_key"], 1)])


def test_a_sender_that_stopped_between_retries_only_lets_its_event_go(warehouse):
    seed(warehouse, signup(1))
    at = now()
    (claim,) = take(warehouse, "run_dead", at, new=1, sender="dead").claims
    settle(warehouse, "run_dead", answer(claim, open_again(), at, hold=5.0))  # its last attempt is on record
    assert claims.recover_abandoned(warehouse.engine, "run_next", now=at + timedelta(seconds=6)) == 0
    assert [a["outcome"] for a in warehouse.attempts()] == ["retry"]
    assert leased(warehouse, 1) == (1, None, None, None)
    assert row(warehouse, 1)["reason"] == "retrying: HTTP 500"


def test_lease_expiries_are_of_pending_events_taken_before_a_moment(warehouse):
    seed(warehouse, signup(1), signup(2, 1))
    at = now()
    claims.claim_many(warehouse.engine, "run_a", 10, at, new=1, now=at)
    claims.claim_many(warehouse.engine, "run_b", 20, at, new=1, now=at + timedelta(seconds=5))
    assert claims.lease_expiries(warehouse.engine) == (at + timedelta(seconds=10), at + timedelta(seconds=25))
    assert claims.lease_expiries(warehouse.engine, taken_before=at + timedelta(seconds=1)) == (
        at + timedelta(seconds=10), at + timedelta(seconds=10))
    assert claims.lease_expiries(warehouse.engine, taken_before=at) == (None, None)


# --- whether a sender has anything to do (the drain's idle runs) ------------------------------

def test_has_sendable_only_when_a_sender_would_send(warehouse, sandbox):
    # An event 2 waiting for its event 1 (not on record) is no work for a sender.
    seed(warehouse, verified=(verification(5),))
    assert not claims.has_sendable(warehouse.engine)
    # Its event 1 arrives: work.
    warehouse.add(signups, signup(5, deferred=True))
    stages.extract_and_map(warehouse.engine, load_config(), PARTITION, new_run_id())
    assert claims.has_sendable(warehouse.engine)
    # Event 1 in its wait between runs (the API kept failing): event 2 still waits, nothing to do.
    sandbox.set_faults({"permanent_errors": {"5": 503}})
    with sending(warehouse, sandbox, max_attempts=1) as sender:
        assert sender.run().left_open == 1
    assert not claims.has_sendable(warehouse.engine)
    # Due again: work. Then leased by a live sender: no work for another; lease run out: work (recovery).
    age_event(warehouse, 5, next_attempt_at=0.01)
    assert claims.has_sendable(warehouse.engine)
    key = row(warehouse, 5)["event_key"]
    assert claims.claim_many(warehouse.engine, "other_sender", 60, now(), keys=[key]).claims
    assert not claims.has_sendable(warehouse.engine)
    later = now() + timedelta(seconds=61)
    assert claims.has_sendable(warehouse.engine, now=later)

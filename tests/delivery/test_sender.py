"""Delivery rules (contract section 5) without Airflow: the pipeline's send stage and Sender on real
warehouses (SQLite and PostgreSQL), against the sandbox as a real loopback HTTP server."""
from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from lead_sync.delivery import claims
from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.clock import as_utc
from lead_sync.db.schema import metadata
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.read.config import load_config
from lead_sync.delivery.policy import CredentialsRefused
from lead_sync.delivery.sender import Sender
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.db.engines import prepare_engine

from tests.support import TOKEN
from tests.support.audit import age_event, attempts_of, outbox_body, outbox_keys, row
from tests.support.clock import FakeClock
from tests.support.seeding import PARTITION, new_run_id, seed, signup, verification
from tests.support.sending import run_senders_at_once, sending, sent


def send_stage(wh, sandbox, run_id: str, *, connection: str = "cutmeshort_default", token: str = TOKEN,
               per_minute: int | None = 60, bucket: str = "test-bucket", budget: float = 30.0,
               max_attempts: int = 4, clock: FakeClock | None = None):
    """stages.send_open_events, as the send task calls it, on a FakeClock."""
    clock = clock or FakeClock()
    with CutMeShortClient(sandbox.url, token, timeout_seconds=2.0) as client:
        limiter = SharedRateLimiter(wh.engine, bucket, per_minute, clock=clock)
        return stages.send_open_events(wh.engine, client, limiter, RetryPolicy(max_attempts, 0.05, 0.5),
                                         run_id, budget, connection, clock=clock, sleep=clock.sleep)


def gaps(rows: list[dict]) -> list[float]:
    moments = [as_utc(r["sent_at"]) for r in rows]
    return [(b - a).total_seconds() for a, b in zip(moments, moments[1:])]


# --- retried answers -----------------------------------------------------------------------

def test_429_with_retry_after_is_honoured(warehouse, sandbox):
    seed(warehouse, signup(1))
    sandbox.set_faults({"burst_429": {"count": 1, "retry_after": 1}})
    with sending(warehouse, sandbox) as sender:
        report = sender.run()
    assert (report.requests, report.delivered, report.failed, report.budget_exhausted) == (2, 1, 0, False)
    assert report.by_status == {"429": 1, "200": 1}
    # One wait, of exactly the Retry-After: the jitter (<= 0.05 s) never shortens it, nor lengthens it here.
    assert sender.clock.sleeps == [pytest.approx(1.0, abs=1e-6)]
    tries = attempts_of(warehouse, 1)
    assert [(a["attempt"], a["http_status"], a["outcome"]) for a in tries] == [
        (1, 429, "retry"), (2, 200, "delivered")]
    assert gaps(tries) == [pytest.approx(1.0, abs=2e-6)]  # between the two requests as recorded
    audit = row(warehouse, 1)
    assert (audit["status"], audit["attempts"], audit["http_status"], audit["reason"]) == ("delivered", 2, 200, None)
    assert len(sandbox.leads()) == 1


def test_429_without_retry_after_backs_off_with_jitter(warehouse, sandbox):
    seed(warehouse, signup(1))
    sandbox.set_faults({"burst_429": {"count": 3, "retry_after": None}})
    with sending(warehouse, sandbox, base=0.2, cap=5.0, max_attempts=5) as sender:
        report = sender.run()
    assert (report.requests, report.delivered) == (4, 1)
    tries = attempts_of(warehouse, 1)
    assert [a["http_status"] for a in tries] == [429, 429, 429, 200]
    # Full jitter: each wait is drawn below its exponential ceiling (0.2, 0.4, 0.8 s).
    ceilings = [0.2, 0.4, 0.8]
    waits = sender.clock.sleeps
    assert len(waits) == 3
    assert all(0 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings))
    assert waits != ceilings and len(set(waits)) == 3
    # Each retry went out when its wait was over, not before.
    assert gaps(tries) == pytest.approx(waits, abs=2e-6)
    assert row(warehouse, 1)["status"] == "delivered"


def test_5xx_then_success_is_delivered_once_with_every_attempt_audited(warehouse, sandbox):
    run_id = seed(warehouse, signup(1), signup(2, 1))
    # Customer 1's requests fail with 500, 502, 503 (a new answer at each wait before a retry), then succeed.
    sandbox.set_faults({"permanent_errors": {"1": 500}})
    clock = FakeClock(on_sleep={1: lambda: sandbox.set_faults({"permanent_errors": {"1": 502}}),
                                2: lambda: sandbox.set_faults({"permanent_errors": {"1": 503}}),
                                3: lambda: sandbox.set_faults({"permanent_errors": {}})})
    report = send_stage(warehouse, sandbox, run_id, clock=clock)
    assert (report.requests, report.delivered, report.failed) == (5, 2, 0)
    tries = attempts_of(warehouse, 1)
    assert [(a["attempt"], a["http_status"], a["outcome"], a["run_id"]) for a in tries] == [
        (1, 500, "retry", run_id), (2, 502, "retry", run_id), (3, 503, "retry", run_id), (4, 200, "delivered", run_id)]
    assert all(a["latency_ms"] is not None and a["error"] is None for a in tries)
    first = row(warehouse, 1)
    assert (first["status"], first["attempts"], first["http_status"]) == ("delivered", 4, 200)
    assert as_utc(first["first_attempt_at"]) < as_utc(first["last_attempt_at"])
    assert first["delivered_at"] is not None
    assert [a["http_status"] for a in attempts_of(warehouse, 2)] == [200]
    # Customer 2 does not wait for customer 1's retries.
    assert sorted(lead["customerExternalId"] for lead in sandbox.leads()) == ["1", "2"]
    assert len(clock.sleeps) == 3 and gaps(tries) == pytest.approx(clock.sleeps, abs=2e-6)
    assert outbox_keys(warehouse) == set()
    (run,) = warehouse.runs()
    assert (run["send_result"], run["message"]) == ("complete", None)


def _send_run(wh) -> str:
    """A run that only sends, as lead_events_drain's: its row in lead_event_sync_runs first."""
    run_id = new_run_id()
    runs.start_run(wh.engine, run_id, PARTITION.day, "lead_events_drain")
    return run_id


def test_permanent_500_stays_pending_across_runs_then_gives_up_and_is_final(warehouse, sandbox):
    run_id = seed(warehouse, signup(1), signup(2, 1))
    sandbox.set_faults({"permanent_errors": {"1": 500}})
    report = send_stage(warehouse, sandbox, run_id, max_attempts=3)
    assert (report.requests, report.delivered, report.failed, report.left_open) == (4, 1, 0, 1)
    assert [(a["http_status"], a["outcome"]) for a in attempts_of(warehouse, 1)] == [(500, "retry")] * 3
    left = row(warehouse, 1)
    assert (left["status"], left["attempts"], left["http_status"]) == ("pending", 3, 500)
    assert left["reason"].startswith("retrying: HTTP 500") and "gives up after" in left["reason"]
    assert as_utc(left["next_attempt_at"]) > datetime.now(timezone.utc) + timedelta(minutes=4)
    assert left["event_key"] in outbox_keys(warehouse)
    # Retrying is not a failure of the run.
    summary = runs.summarise(warehouse.engine, run_id, PARTITION.day)
    assert (summary.outcome, summary.counts, summary.requests_sent) == ("success", {"delivered": 1, "pending": 1}, 4)

    # A run before next_attempt_at does not try it.
    assert send_stage(warehouse, sandbox, new_run_id(), max_attempts=3).requests == 0
    # Later, still within give_up_after_hours: retried, left open again, a longer wait.
    age_event(warehouse, 1, retry_since=10, next_attempt_at=0.01)
    run2 = _send_run(warehouse)
    report = send_stage(warehouse, sandbox, run2, max_attempts=3)
    assert (report.requests, report.failed, report.left_open) == (3, 0, 1)
    assert as_utc(row(warehouse, 1)["next_attempt_at"]) > datetime.now(timezone.utc) + timedelta(minutes=9)
    assert runs.summarise(warehouse.engine, run2, PARTITION.day).outcome == "success"

    # Past give_up_after_hours (72 by default): the run's last attempt gives up, and that run fails.
    age_event(warehouse, 1, retry_since=73, next_attempt_at=0.01)
    run3 = _send_run(warehouse)
    report = send_stage(warehouse, sandbox, run3, max_attempts=3)
    assert (report.requests, report.failed) == (3, 1)
    failed = row(warehouse, 1)
    assert (failed["status"], failed["attempts"]) == ("failed", 9)
    assert failed["reason"].startswith("gave up after 73.0 h of retries (9 attempts; give_up_after_hours is 72)")
    assert [a["outcome"] for a in attempts_of(warehouse, 1)][-1] == "failed"
    summary = runs.summarise(warehouse.engine, run3, PARTITION.day)
    assert summary.outcome == "failed" and "gave up" in summary.message

    # Final for automatic runs: nothing is sent, and a later run is not failed by it.
    sandbox.set_faults({"permanent_errors": {}})
    run4 = _send_run(warehouse)
    assert send_stage(warehouse, sandbox, run4, max_attempts=3).requests == 0
    summary = runs.summarise(warehouse.engine, run4, PARTITION.day)
    assert (summary.outcome, summary.counts) == ("success", {"delivered": 1, "failed": 1})


def test_timeouts_are_retried(warehouse, sandbox):
    seed(warehouse, signup(1))
    sandbox.set_faults({"slow_rate": 1.0, "slow_ms": 1500})
    clock = FakeClock(on_sleep={1: lambda: sandbox.set_faults({"slow_rate": 0.0})})
    with sending(warehouse, sandbox, timeout=0.3, clock=clock) as sender:
        report = sender.run()
    assert (report.requests, report.delivered, report.by_status) == (2, 1, {"no_response": 1, "200": 1})
    # One backoff wait (full jitter below the 0.05 s base), and nothing else: no wait for the slow answer.
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.05 and clock.elapsed == pytest.approx(clock.sleeps[0])
    first, second = attempts_of(warehouse, 1)
    assert (first["http_status"], first["outcome"]) == (None, "unknown")
    assert "ReadTimeout" in first["error"] and first["latency_ms"] < 1000
    assert (second["http_status"], second["outcome"]) == (200, "delivered")
    assert row(warehouse, 1)["status"] == "delivered"


def test_timeouts_every_time_stay_pending_then_give_up(warehouse, sandbox):
    seed(warehouse, signup(1))
    sandbox.set_faults({"slow_rate": 1.0, "slow_ms": 1200})
    with sending(warehouse, sandbox, timeout=0.3, max_attempts=2) as sender:
        report = sender.run()
    assert (report.requests, report.failed, report.left_open) == (2, 0, 1)
    assert [(a["http_status"], a["outcome"]) for a in attempts_of(warehouse, 1)] == [(None, "unknown")] * 2
    left = row(warehouse, 1)
    assert left["status"] == "pending" and left["reason"].startswith("retrying: no response (ReadTimeout")
    age_event(warehouse, 1, retry_since=72.5, next_attempt_at=0.01)
    with sending(warehouse, sandbox, timeout=0.3, max_attempts=2) as sender:
        report = sender.run()
    assert (report.requests, report.failed) == (2, 1)
    assert [a["outcome"] for a in attempts_of(warehouse, 1)] == ["unknown"] * 3 + ["failed"]
    failed = row(warehouse, 1)
    assert failed["status"] == "failed" and "no response (ReadTimeout" in failed["reason"]


def test_connection_resets_are_retried(warehouse, sandbox):
    seed(warehouse, signup(1))
    sandbox.set_faults({"reset_rate": 1.0})
    clock = FakeClock(on_sleep={1: lambda: sandbox.set_faults({"reset_rate": 0.0})})
    with sending(warehouse, sandbox, clock=clock) as sender:
        report = sender.run()
    assert (report.requests, report.delivered) == (2, 1)
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.05
    first, second = attempts_of(warehouse, 1)
    assert first["http_status"] is None and first["error"].startswith("ConnectionError")
    assert second["http_status"] == 200
    stats = sandbox.stats()
    assert (stats["requests"], stats["resets"], stats["leads"]) == (2, 1, 1)


# --- final answers -------------------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_are_rejected_after_one_attempt(warehouse, sandbox, status):
    run_id = seed(warehouse, signup(1), signup(2, 1))
    sandbox.set_faults({"permanent_errors": {"1": status}})
    report = send_stage(warehouse, sandbox, run_id)
    assert (report.requests, report.rejected, report.delivered, report.failed) == (2, 1, 1, 0)
    assert [(a["http_status"], a["outcome"]) for a in attempts_of(warehouse, 1)] == [(status, "rejected")]
    rejected = row(warehouse, 1)
    assert (rejected["status"], rejected["attempts"], rejected["http_status"]) == ("rejected", 1, status)
    assert rejected["reason"] == f"rejected by the API: HTTP {status}: injected failure for this customer"
    assert rejected["event_key"] not in outbox_keys(warehouse)
    summary = runs.summarise(warehouse.engine, run_id, PARTITION.day)
    assert summary.outcome == "success" and summary.counts == {"delivered": 1, "rejected": 1}

    # Not retried by later runs while its source row is unchanged...
    sandbox.set_faults({"permanent_errors": {}})
    run2 = new_run_id()
    counts = stages.extract_and_map(warehouse.engine, load_config(), PARTITION, run2)
    assert counts["still_rejected"] == 1
    assert send_stage(warehouse, sandbox, run2).requests == 0
    assert len(sandbox.requests()) == 2
    if status != 422:
        return
    # ...and sent again once it changes.
    warehouse.execute("UPDATE signups SET click_id = 'click-1-fixed' WHERE customer_external_id = 1")
    run3 = new_run_id()
    stages.extract_and_map(warehouse.engine, load_config(), PARTITION, run3)
    assert send_stage(warehouse, sandbox, run3).delivered == 1
    assert row(warehouse, 1)["status"] == "delivered"
    assert sandbox.leads()[-1]["clickId"] == "click-1-fixed"


def test_409_counts_as_delivered_and_is_noted(warehouse, sandbox):
    seed(warehouse, signup(1))
    # Someone (an earlier, lost request) already recorded this lead.
    with CutMeShortClient(sandbox.url, TOKEN) as client:
        body = outbox_body(warehouse, row(warehouse, 1)["event_key"])
        assert client.track_lead(body).http_status == 200
    with sending(warehouse, sandbox) as sender:
        report = sender.run()
    assert (report.requests, report.delivered, report.by_status) == (1, 1, {"409": 1})
    done = row(warehouse, 1)
    assert (done["status"], done["http_status"]) == ("delivered", 409)
    assert "409" in done["reason"] and "already recorded" in done["reason"]
    assert [(a["http_status"], a["outcome"]) for a in attempts_of(warehouse, 1)] == [(409, "delivered")]
    assert len(sandbox.leads()) == 1


@pytest.mark.parametrize("refusal", ["revoked", "forbidden", "wrong_token"])
def test_refused_credentials_stop_the_run_and_leave_events_pending(warehouse, sandbox, refusal):
    run_id = seed(warehouse, signup(1), signup(2, 1), signup(3, 2, deferred=True),
                  verified=(verification(3),))
    token = TOKEN
    if refusal == "wrong_token":
        token = "some-other-token-123"
    else:
        sandbox.set_faults({refusal: True})
    with pytest.raises(CredentialsRefused) as caught:
        send_stage(warehouse, sandbox, run_id, connection="cme_production", token=token)
    message = str(caught.value)
    assert "cme_production" in message and "HTTP 40" in message
    assert TOKEN not in message and "some-other-token-123" not in message
    assert len(sandbox.requests()) == 1  # stopped at the first refusal
    assert warehouse.status_counts() == {"pending": 4}
    assert [a["outcome"] for a in warehouse.attempts()] == ["credentials"]
    assert outbox_keys(warehouse) == {r["event_key"] for r in warehouse.deliveries().values()}
    (run,) = warehouse.runs()
    assert run["send_result"] == "credentials_refused" and "cme_production" in run["message"]
    summary = runs.summarise(warehouse.engine, run_id, PARTITION.day)
    assert summary.outcome == "failed" and summary.counts == {"pending": 4}


# --- time budget ---------------------------------------------------------------------------

def test_time_budget_used_up_leaves_the_rest_pending(warehouse, sandbox):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 7)))
    # 4 requests a minute and a 2 s budget: the 5th slot is a minute away, so the sender stops at once.
    clock = FakeClock()
    report = send_stage(warehouse, sandbox, run_id, per_minute=4, bucket="budget", budget=2.0, clock=clock)
    assert clock.sleeps == [] and clock.elapsed == 0
    assert (report.requests, report.delivered, report.budget_exhausted) == (4, 4, True)
    statuses = {cid: row(warehouse, cid)["status"] for cid in range(1, 7)}
    assert statuses == {1: "delivered", 2: "delivered", 3: "delivered", 4: "delivered", 5: "pending", 6: "pending"}
    assert all(row(warehouse, cid)["attempts"] == 0 for cid in (5, 6))
    assert outbox_keys(warehouse) == {row(warehouse, cid)["event_key"] for cid in (5, 6)}
    (run,) = warehouse.runs()
    assert run["send_result"] == "budget_exhausted" and "pending" in run["message"]
    assert runs.summarise(warehouse.engine, run_id, PARTITION.day).outcome == "success"

    # Nothing dropped: the next run (with budget left) sends exactly the rest.
    run2 = new_run_id()
    stages.extract_and_map(warehouse.engine, load_config(), PARTITION, run2)
    report = send_stage(warehouse, sandbox, run2, per_minute=4, bucket="budget-next", budget=10.0)
    assert (report.requests, report.delivered, report.budget_exhausted) == (2, 2, False)
    assert [lead["customerExternalId"] for lead in sandbox.leads()] == ["1", "2", "3", "4", "5", "6"]
    assert warehouse.status_counts() == {"delivered": 6}


def test_a_retry_wait_past_the_budget_leaves_the_event_pending(warehouse, sandbox):
    seed(warehouse, signup(1))
    sandbox.set_faults({"burst_429": {"count": 1, "retry_after": 2}})
    with sending(warehouse, sandbox, budget=1.0) as sender:
        report = sender.run()
    assert sender.clock.sleeps == []  # did not sleep into the next run's time
    assert (report.requests, report.failed, report.delivered, report.budget_exhausted) == (1, 0, 0, True)
    waiting = row(warehouse, 1)
    assert (waiting["status"], waiting["attempts"]) == ("pending", 1)
    assert waiting["reason"].startswith("retrying: HTTP 429")
    assert waiting["event_key"] in outbox_keys(warehouse)


# --- deferred order ------------------------------------------------------------------------

def test_event_two_is_sent_only_after_event_one_is_delivered(warehouse, sandbox):
    seed(warehouse, signup(7, deferred=True), signup(8, 1), verified=(verification(7),))
    sandbox.set_faults({"latency_ms": 20})
    with sending(warehouse, sandbox, max_in_flight=1) as sender:  # one at a time: the order is exact
        report = sender.run()
    assert (report.requests, report.delivered) == (3, 3)
    assert sent(sandbox) == [("7", "signup_started", 200), ("8", "signup_started", 200),
                             ("7", "email_verified", 200)]
    two, one = row(warehouse, 7, "email_verified"), row(warehouse, 7)
    (confirm,) = attempts_of(warehouse, 7, "email_verified")
    assert as_utc(one["delivered_at"]) <= as_utc(confirm["sent_at"])
    assert two["tracking"] == "deferred_confirm" and two["status"] == "delivered"


@pytest.mark.parametrize("event_one_ends", ["retrying", "rejected"])
def test_event_two_is_not_sent_while_event_one_is_not_delivered(warehouse, sandbox, event_one_ends):
    seed(warehouse, signup(7, deferred=True), signup(8, 1), verified=(verification(7),))
    sandbox.set_faults({"permanent_errors": {"7": 500 if event_one_ends == "retrying" else 422}})
    with sending(warehouse, sandbox, max_attempts=2) as sender:
        sender.run()
    assert row(warehouse, 7)["status"] == ("pending" if event_one_ends == "retrying" else "rejected")
    assert row(warehouse, 7, "email_verified")["status"] == "pending"
    assert attempts_of(warehouse, 7, "email_verified") == []
    assert "email_verified" not in [event for _, event, _ in sent(sandbox)]

    # A later run, once the event is due again, with the API healthy again.
    age_event(warehouse, 7, next_attempt_at=0.01)
    sandbox.set_faults({"permanent_errors": {}})
    with sending(warehouse, sandbox) as sender:
        sender.run()
    if event_one_ends == "rejected":  # final until its source row changes: event 2 keeps waiting
        assert row(warehouse, 7)["status"] == "rejected"
        assert row(warehouse, 7, "email_verified")["status"] == "pending"
        assert "email_verified" not in [event for _, event, _ in sent(sandbox)]
        return
    assert row(warehouse, 7)["status"] == "delivered"
    assert row(warehouse, 7, "email_verified")["status"] == "delivered"
    assert sent(sandbox)[-2:] == [("7", "signup_started", 200), ("7", "email_verified", 200)]
    assert "404" not in sandbox.stats()["by_status"]


# --- senders running at once -----------------------------------------------------------------

def test_senders_running_at_once_send_each_event_exactly_once(warehouse, sandbox):
    seed(warehouse, *(signup(n, n) for n in range(1, 13)))
    sandbox.set_faults({"latency_ms": 30})
    reports = run_senders_at_once(warehouse, sandbox, 3, per_minute=60, budget=4.0)
    assert sum(r.requests for r in reports) == 12 and sum(r.delivered for r in reports) == 12
    assert sorted(int(c) for c, _, status in sent(sandbox) if status == 200) == list(range(1, 13))
    assert len(sandbox.requests()) == 12  # no event sent twice, no 409
    assert all(r["attempts"] == 1 for r in warehouse.deliveries().values())
    assert len(warehouse.attempts()) == 12


def test_senders_running_at_once_share_one_rate_limit(warehouse, sandbox):
    seed(warehouse, *(signup(n, n) for n in range(1, 9)))
    clock = FakeClock()
    # 5 a minute and a budget of 1.5 s: the 6th slot is a minute away, so neither sender waits for it.
    reports = run_senders_at_once(warehouse, sandbox, 2, per_minute=5, budget=1.5, clock=clock)
    assert clock.sleeps == [] and clock.elapsed == 0
    assert sum(r.requests for r in reports) == 5 and len(sandbox.requests()) == 5
    assert sandbox.stats()["max_requests_in_any_60s"] == 5
    assert any(r.budget_exhausted for r in reports)
    assert warehouse.status_counts() == {"delivered": 5, "pending": 3}


# --- a sender that died with a request in flight ----------------------------------------------

@pytest.mark.parametrize("reached_api", [False, True])
def test_abandoned_in_flight_request_is_audited_as_unknown_and_sent_once_more(warehouse, sandbox, reached_api):
    seed(warehouse, signup(1), signup(2, 1))
    key = row(warehouse, 1)["event_key"]
    if reached_api:  # the dead sender's request got through before it died
        with CutMeShortClient(sandbox.url, TOKEN) as client:
            assert client.track_lead(outbox_body(warehouse, key)).http_status == 200
    (dead,) = claims.claim_many(warehouse.engine, "dead_run", 0.5, datetime.now(timezone.utc), new=1).claims
    assert (dead.event_key, dead.attempt) == (key, 1)
    expiry, _ = claims.lease_expiries(warehouse.engine)
    if reached_api:
        time.sleep(0.6)  # the lease has run out before the next sender starts
    # Otherwise the next sender sends the rest, then waits for the lease to run out (and half a second).
    clock = FakeClock()
    with sending(warehouse, sandbox, clock=clock) as sender:
        report = sender.run()
    if reached_api:
        assert clock.sleeps == []
    else:
        started = datetime.fromtimestamp(clock.start, timezone.utc)
        assert clock.sleeps == [pytest.approx((expiry - started).total_seconds() + 0.5, abs=1e-5)]
    assert (report.recovered_unknown, report.delivered, report.requests) == (1, 2, 2)
    tries = attempts_of(warehouse, 1)
    assert [(a["attempt"], a["run_id"], a["outcome"], a["http_status"]) for a in tries] == [
        (1, "dead_run", "unknown", None),
        (2, sender.run_id, "delivered", 409 if reached_api else 200)]
    assert "outcome unknown" in tries[0]["error"] and sender.run_id in tries[0]["error"]
    done = row(warehouse, 1)
    assert (done["status"], done["attempts"], done["inflight_until"]) == ("delivered", 2, None)
    # The API saw the event once from the new sender (and once before, if the dead one got through).
    mine = [r for r in sent(sandbox) if r[0] == "1"]
    assert mine == ([("1", "signup_started", 200), ("1", "signup_started", 409)] if reached_api
                    else [("1", "signup_started", 200)])
    assert len(sandbox.leads()) == 2

    # Recovered once: a later sender finds nothing left to send.
    with sending(warehouse, sandbox) as again:
        assert again.run().requests == 0


# --- what the audit keeps --------------------------------------------------------------------

def test_audit_keeps_no_raw_email_name_or_token(warehouse, sandbox):
    people = {1: ("Zelda Quuxley", "zelda.quux@example.com"), 2: ("Yuri Frobisher", "yuri.frob@example.org"),
              3: ("Xena Plumtree", "xena.plum@example.net")}
    run_id = seed(warehouse, *(signup(cid, cid, name=n, email=e) for cid, (n, e) in people.items()),
                  signup(4, 5, deferred=True, name="Wanda Grist", email="wanda.grist@example.com"),
                  verified=(verification(4),))
    sandbox.set_faults({"permanent_errors": {"2": 422, "3": 500}})
    send_stage(warehouse, sandbox, run_id, max_attempts=2)
    runs.summarise(warehouse.engine, run_id, PARTITION.day)
    age_event(warehouse, 3, next_attempt_at=0.01)  # due again: the next run tries it, with a revoked token
    with pytest.raises(CredentialsRefused):
        send_stage(warehouse, sandbox, new_run_id(), token="wrong-token-456")
    emails = [lead.get("customerEmail") for lead in sandbox.leads()]
    assert emails == ["zelda.quux@example.com", "wanda.grist@example.com", None]

    audit = row(warehouse, 1)
    assert audit["payload"] and "zelda" not in audit["payload"].lower() and "sha256:" in audit["payload"]
    secrets = [TOKEN, "wrong-token-456"]
    pii = [text for name, email in [*people.values(), ("Wanda Grist", "wanda.grist@example.com")]
           for text in (name, email, name.split()[0], email.split("@")[0])]
    with warehouse.engine.connect() as conn:
        for table in metadata.sorted_tables:
            dump = "\n".join(repr(tuple(r)) for r in conn.execute(select(table))).lower()
            assert dump or table.name in ("lead_event_outbox", "lead_event_alert_state", "lead_event_dry_run_events",
                                          "lead_event_send_batches"), \
                table.name
            for secret in secrets:
                assert secret.lower() not in dump, (table.name, "token")
            if table.name == "lead_event_outbox":
                continue  # the exact bodies still to send; checked below
            for text in pii:
                assert text.lower() not in dump, (table.name, text)
    # The outbox keeps a body only while the event is open (here: the failed one, customer 3).
    assert outbox_keys(warehouse) == {row(warehouse, 3)["event_key"]}


def test_a_long_send_logs_progress_every_30_seconds(warehouse, sandbox, caplog):
    """A thread of its own logs a line at every tick (every 30 s), whatever the sender is doing."""
    seed(warehouse, *(signup(cid, cid) for cid in range(1, 7)))
    waits: list[float] = []

    def ticks(stopped: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 1:
            return False  # the first tick: one line
        return stopped.wait()  # then none until the send is over

    clock = FakeClock()
    prepare_engine(warehouse.engine)
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2) as client:
        limiter = SharedRateLimiter(warehouse.engine, "b", None, clock=clock)
        sender = Sender(warehouse.engine, client, limiter, RetryPolicy(), new_run_id(), clock() + 30, clock=clock,
                        sleep=clock.sleep, ticks=ticks)
        with caplog.at_level("INFO", logger="lead_sync.delivery.sender"):
            assert sender.run().delivered == 6
        assert waits == [30.0, 30.0]
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
        assert re.fullmatch(r"progress: \d event\(s\) settled \(\d requests\), \d left, [\d.]+ events/s, ETA \S+", line)
        # What a line says, on the injected clock: 6 settled after 20 s of it.
        clock.now += 20
        assert sender.progress() == "progress: 6 event(s) settled (6 requests), 0 left, 0.3 events/s, ETA 0s"

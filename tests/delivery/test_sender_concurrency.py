"""Several requests in flight (contract section 9) with every delivery rule of section 5 kept:
real warehouses (SQLite and PostgreSQL), the sandbox as a real loopback HTTP server, waits on a
FakeClock. Nothing here measures how long anything took on the machine."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from cutmeshort_sandbox import SandboxServer
from lead_sync.delivery import claims
from lead_sync import stages
from lead_sync.db.stores import ensure_stores
from lead_sync.db.schema import attempts
from lead_sync.delivery.policy import CredentialsRefused
from lead_sync.delivery.settings import ApiSettings, ApiTarget, parse_api_settings

from tests.support.processes import wait_for
from tests.support import TOKEN, signups, verifications
from tests.support.audit import attempts_of, row
from tests.support.clock import FakeClock
from tests.support.seeding import PARTITION, new_run_id, seed, signup
from tests.support.sending import run_senders_at_once, sending, sent

DAY_START = datetime(2026, 11, 27)


def many_signups(wh, count: int, deferred_every: int = 0, first: int = 1) -> int:
    """`count` signups of the day (every `deferred_every`-th deferred, with its verification), recorded
    by the pipeline's extract stage; returns the number of events."""
    rows, checks = [], []
    for n in range(first, first + count):
        deferred = bool(deferred_every) and n % deferred_every == 0
        at = DAY_START + timedelta(seconds=20 * n)
        rows.append(dict(customer_external_id=n, click_id=f"click-{n}", customer_name=None, customer_email=None,
                         customer_avatar=None, signed_up_at=at, requires_verification=deferred))
        if deferred:
            checks.append(dict(customer_external_id=str(n), event_name="email_verified",
                               verified_at=(at + timedelta(seconds=5)).replace(tzinfo=timezone.utc)))
    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    wh.add(signups, *rows)
    if checks:
        wh.add(verifications, *checks)
    from lead_sync.read.config import load_config
    assert stages.extract_and_map(wh.engine, load_config(), PARTITION, new_run_id())["new"] == count + len(checks)
    return count + len(checks)


def arrivals(sandbox) -> list[float]:
    """When the sandbox received each request (its log's timestamps, to the millisecond)."""
    return sorted(datetime.fromisoformat(r["received_at"].replace("Z", "+00:00")).timestamp()
                  for r in sandbox.requests())


def most_at_once(moments: list[float], each_takes: float) -> int:
    """Requests received within less than `each_takes` of each other: with every request taking at
    least that long to answer, they were all open at once."""
    best = start = 0
    for end, moment in enumerate(moments):
        while moment - moments[start] >= each_takes - 0.002:  # the log's millisecond rounding
            start += 1
        best = max(best, end - start + 1)
    return best


# --- several in flight --------------------------------------------------------------------------

def test_several_requests_are_in_flight_at_once_never_more_than_max_in_flight(warehouse, sandbox):
    total = many_signups(warehouse, 40)
    sandbox.set_faults({"latency_ms": 200})
    with sending(warehouse, sandbox, per_minute=None, max_in_flight=8) as sender:
        report = sender.run()
    assert (report.requests, report.delivered) == (40, 40) and total == 40
    assert Counter(status for _, _, status in sent(sandbox)) == {200: 40}
    # The sandbox had up to 8 open at once (each takes 200 ms to answer), never more.
    at_once = most_at_once(arrivals(sandbox), 0.2)
    assert 4 <= at_once <= 8
    assert sender.peak_in_flight == 8
    # The first request went alone (a refused token stops a run after one request).
    first, second = arrivals(sandbox)[:2]
    assert second - first >= 0.2 - 0.002
    assert sender.clock.sleeps == []
    assert warehouse.status_counts() == {"delivered": 40}
    assert all(r["attempts"] == 1 for r in warehouse.deliveries().values())


def test_max_in_flight_from_the_connection_reaches_the_send_stage(warehouse, sandbox):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 21)))
    sandbox.set_faults({"latency_ms": 150})
    api = ApiTarget(sandbox.url, TOKEN, ApiSettings(rate_limit_per_minute=1000, max_in_flight=3))
    report = stages.send(warehouse.engine, api, run_id, 60)
    assert report.delivered == 20
    assert 2 <= most_at_once(arrivals(sandbox), 0.15) <= 3


def test_default_in_flight_grows_from_one_with_the_limit_and_the_latency(warehouse, sandbox):
    many_signups(warehouse, 60)
    sandbox.set_faults({"latency_ms": 100})
    # No max_in_flight: no limit at all allows DEFAULT_MAX_IN_FLIGHT; the first request goes alone,
    # then each round trip at most doubles what is in flight.
    from lead_sync.delivery.pace import DEFAULT_MAX_IN_FLIGHT

    with sending(warehouse, sandbox, per_minute=None) as sender:
        assert sender.run().delivered == 60
    moments = arrivals(sandbox)
    assert moments[1] - moments[0] >= 0.1 - 0.002
    assert 8 < most_at_once(moments, 0.1) <= DEFAULT_MAX_IN_FLIGHT and 8 < sender.peak_in_flight
    assert sender.peak_in_flight <= min(DEFAULT_MAX_IN_FLIGHT, 60)


@pytest.mark.parametrize("value", [0, -1, 257, 2.5, "many", True])
def test_max_in_flight_is_validated_with_the_key_named(value):
    with pytest.raises(ValueError) as caught:
        parse_api_settings({"max_in_flight": value}, "cme_production")
    message = str(caught.value)
    assert message.startswith("connection 'cme_production' has invalid extra settings: max_in_flight:")


def test_max_in_flight_accepts_1_to_256_and_defaults_to_sized():
    assert parse_api_settings({}, "c").max_in_flight is None
    assert [parse_api_settings({"max_in_flight": n}, "c").max_in_flight for n in (1, 8, 256)] == [1, 8, 256]


# --- order and limits still hold -----------------------------------------------------------------

def test_event_two_goes_only_after_its_event_one_is_delivered_and_committed(warehouse, sandbox):
    # Every second signup deferred, each with its verification: 24 event 1s and 12 event 2s.
    many_signups(warehouse, 24, deferred_every=2)
    sandbox.set_faults({"latency_ms": 30})
    with sending(warehouse, sandbox, per_minute=None, max_in_flight=8) as sender:
        report = sender.run()
    assert report.delivered == 36 and sender.peak_in_flight > 1
    # The sandbox answers 404 to an event 2 whose event 1 it does not have: none.
    requests = sandbox.requests()
    assert Counter(r["status"] for r in requests) == {200: 36}
    order = {(r["body"]["customerExternalId"], r["body"]["eventName"]): r["seq"] for r in requests}
    with warehouse.engine.connect() as conn:
        ids = {(key, outcome): n for n, key, outcome in conn.execute(
            select(attempts.c.id, attempts.c.event_key, attempts.c.outcome))}
    for cid in range(2, 25, 2):
        one, two = row(warehouse, cid), row(warehouse, cid, "email_verified")
        assert order[(str(cid), "signup_started")] < order[(str(cid), "email_verified")]
        # Its event 1's outcome was committed (its attempt row written) before event 2 was even
        # claimed: event 2's attempt row comes from a later commit.
        assert ids[(one["event_key"], "delivered")] < ids[(two["event_key"], "delivered")]
        assert attempts_of(warehouse, cid)[0]["sent_at"] <= attempts_of(warehouse, cid, "email_verified")[0]["sent_at"]


def test_several_senders_each_with_several_in_flight_never_exceed_the_limit(warehouse, sandbox):
    many_signups(warehouse, 30)
    sandbox.set_faults({"latency_ms": 50, "rate_limit_per_minute": 10})  # more than 10 would get a 429
    clock = FakeClock()
    # 10 a minute, three senders with 4 in flight each, a budget (5 s) that ends before any slot frees.
    reports = run_senders_at_once(warehouse, sandbox, 3, per_minute=10, budget=5.0, clock=clock, max_in_flight=4)
    stats = sandbox.stats()
    assert sum(r.requests for r in reports) == 10 and stats["requests"] == 10
    assert stats["max_requests_in_any_60s"] == 10 and stats["by_status"] == {"200": 10}
    assert clock.sleeps == [] and all(r.budget_exhausted for r in reports)
    assert warehouse.status_counts() == {"delivered": 10, "pending": 20}


def test_the_limit_holds_and_is_used_in_full_across_windows(warehouse):
    """One sender, 4 in flight, 10 a minute, 25 events: three windows on a FakeClock that the sandbox
    counts on too. Exactly 10 in any 60 s, and each window starts as soon as the last one allows."""
    clock = FakeClock()
    with SandboxServer(host="127.0.0.1", port=0, token=TOKEN, rate_limit_per_minute=10, clock=clock) as sandbox:
        many_signups(warehouse, 25)
        with sending(warehouse, sandbox, per_minute=10, max_in_flight=4, clock=clock, budget=600) as sender:
            report = sender.run()
        stats = sandbox.stats()
    assert (report.requests, report.delivered, report.budget_exhausted) == (25, 25, False)
    assert stats["max_requests_in_any_60s"] == 10 and stats["by_status"] == {"200": 25}
    frees = sender.limiter.window  # 60 s and the margin after the last window's answers
    assert clock.sleeps == [pytest.approx(frees, abs=1e-6)] * 2
    moments = sorted(a["sent_at"] for a in warehouse.attempts())
    first_to_last = (moments[-1] - moments[0]).total_seconds()
    assert first_to_last == pytest.approx(2 * frees, abs=1e-5)
    # The share of the limit: 25 events need at least 2 minutes from first to last.
    assert (math.ceil(25 / 10) - 1) * 60 / first_to_last >= 0.99


def test_a_429_with_retry_after_holds_every_request_back_then_all_go(warehouse, sandbox):
    many_signups(warehouse, 12)
    sandbox.set_faults({"latency_ms": 30})
    clock = FakeClock()
    sandbox.set_faults({"burst_429": {"count": 1, "retry_after": 2}})
    with sending(warehouse, sandbox, per_minute=None, max_in_flight=4, clock=clock) as sender:
        report = sender.run()
    assert (report.requests, report.delivered) == (13, 12)
    # One wait, the Retry-After, for everyone: nothing was sent during it (the clock stood still
    # otherwise, so every request went at the start or after the wait).
    assert clock.sleeps == [pytest.approx(2.0, abs=1e-6)]
    moments = sorted({(a["sent_at"] - warehouse.attempts()[0]["sent_at"]).total_seconds()
                      for a in warehouse.attempts()})
    assert moments == [0.0, pytest.approx(2.0, abs=2e-6)]
    (limited,) = [key for key, n in Counter(a["event_key"] for a in warehouse.attempts()).items() if n > 1]
    assert [(a["http_status"], a["outcome"]) for a in warehouse.attempts() if a["event_key"] == limited] == [
        (429, "retry"), (200, "delivered")]
    assert warehouse.status_counts() == {"delivered": 12}


def test_every_answer_is_committed_before_the_sender_waits(warehouse, sandbox):
    many_signups(warehouse, 6)
    seen = []

    def committed() -> None:  # at the wait: what the warehouse has by then
        seen.append(sorted((a["http_status"], a["outcome"]) for a in warehouse.attempts()))

    clock = FakeClock(on_sleep={1: committed})
    # Customer 3 gets a 503 (retried after a backoff); the others go through meanwhile.
    sandbox.set_faults({"latency_ms": 20, "permanent_errors": {"3": 503}})
    with sending(warehouse, sandbox, per_minute=None, max_in_flight=4, clock=clock, max_attempts=2) as sender:
        report = sender.run()
    assert (report.delivered, report.left_open, report.requests) == (5, 1, 7)
    # The sender waited once (the backoff) with nothing on the wire: by then every answer was written.
    assert len(clock.sleeps) == 1
    assert seen == [[(200, "delivered")] * 5 + [(503, "retry")]]


def test_refused_credentials_with_several_in_flight_stop_at_once_and_leave_all_pending(warehouse, sandbox):
    total = many_signups(warehouse, 40)
    sandbox.set_faults({"latency_ms": 100})

    def revoke_after_some() -> None:
        wait_for(lambda: len(sandbox.requests()) >= 6, timeout=30, what="six requests", every=0.005)
        sandbox.set_faults({"revoked": True})

    revoker = threading.Thread(target=revoke_after_some, daemon=True)
    revoker.start()
    with pytest.raises(CredentialsRefused) as caught:
        with sending(warehouse, sandbox, per_minute=None, max_in_flight=8) as sender:
            sender.run()
    revoker.join(timeout=30)
    assert "cutmeshort_default" in str(caught.value)
    requests = sandbox.requests()
    refused = [r for r in requests if r["status"] == 401]
    assert refused and len(requests) < total  # it stopped: most events were never sent
    # Only what was on the wire when the first refusal came was refused too, at most 8.
    assert len(refused) <= 8
    audit = warehouse.deliveries().values()
    counts = warehouse.status_counts()
    assert counts == {"delivered": len(requests) - len(refused), "pending": total - len(requests) + len(refused)}
    # No lease is left, and every event's attempt count matches its attempt rows (claims not sent were given back).
    assert all(r["inflight_until"] is None for r in audit)
    rows = Counter(a["event_key"] for a in warehouse.attempts())
    assert all(r["attempts"] == rows.get(r["event_key"], 0) for r in audit)
    assert [a["outcome"] for a in warehouse.attempts()].count("credentials") == len(refused)
    # The events never sent look as if never taken.
    untouched = [r for r in audit if not rows.get(r["event_key"])]
    assert untouched and all(r["first_attempt_at"] is None and r["retry_since"] is None
                             and r["last_attempt_at"] is None for r in untouched)


# --- a sender killed with several requests in flight ----------------------------------------------

CHILD = r"""
import sys, time
from sqlalchemy import create_engine
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.sender import Sender
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy

url, api, token = sys.argv[1:4]
engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
with CutMeShortClient(api, token, timeout_seconds=5.0) as client:
    Sender(engine, client, SharedRateLimiter(engine, "kill-bucket", 600), RetryPolicy(3, 0.05, 0.5),
           "manual__killed", time.time() + 300, max_in_flight=8).run()
"""


def test_kill_9_with_several_in_flight_resends_exactly_those(warehouse, sandbox):
    many_signups(warehouse, 30)
    sandbox.set_faults({"latency_ms": 1500})
    url = warehouse.url.render_as_string(hide_password=False)
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, sandbox.url, TOKEN],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def delivered() -> int:
        return warehouse.status_counts().get("delivered", 0)

    try:
        # Once a few answers are committed, the sender has several requests on the wire (each takes
        # 1.5 s; the number in flight grows from one as answers come): kill -9 then.
        wait_for(lambda: delivered() >= 3 and len(sandbox.requests()) - delivered() >= 5,
                 timeout=60, what="several requests of the child in flight", every=0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    audit = warehouse.deliveries()
    done = {r["event_key"] for r in audit.values() if r["status"] == "delivered"}
    leased = {r["event_key"] for r in audit.values() if r["inflight_until"] is not None}
    seen = {row(warehouse, int(r["body"]["customerExternalId"]))["event_key"] for r in sandbox.requests()}
    on_the_wire = seen - done
    # What the API had in hand without its outcome committed is leased; so is anything claimed and not sent yet.
    assert len(on_the_wire) >= 5 and on_the_wire <= leased and not (leased & done)
    assert len(sandbox.requests()) == len(seen)  # nothing was sent twice before the kill

    sandbox.set_faults({"latency_ms": 0})
    _, expiry = claims.lease_expiries(warehouse.engine)  # when the last of the dead sender's leases runs out
    clock = FakeClock()
    with sending(warehouse, sandbox, per_minute=600, max_in_flight=8, clock=clock, budget=120) as sender:
        report = sender.run()
    # It sent the rest, waited for all the dead sender's leases (looking every 2 s whether they were
    # still there), audited each unknown and sent it again.
    started = datetime.fromtimestamp(clock.start, timezone.utc)
    assert sum(clock.sleeps) == pytest.approx((expiry - started).total_seconds() + 0.5, abs=1e-5)
    assert all(wait <= 2.0 for wait in clock.sleeps)
    assert report.recovered_unknown == len(leased)
    assert report.requests == report.delivered == 30 - len(done)
    unknown = [a for a in warehouse.attempts() if a["outcome"] == "unknown"]
    assert sorted(a["event_key"] for a in unknown) == sorted(leased)
    assert all(a["run_id"] == "manual__killed" and "in flight" in a["error"] for a in unknown)
    # The API saw exactly the requests that were on the wire twice (the second time it answered 409:
    # delivered); nothing else twice.
    hits = Counter(row(warehouse, int(r["body"]["customerExternalId"]))["event_key"] for r in sandbox.requests())
    assert {key for key, n in hits.items() if n > 1} == on_the_wire and max(hits.values()) == 2
    assert len(hits) == 30
    assert Counter(r["status"] for r in sandbox.requests()) == {200: 30, 409: len(on_the_wire)}
    assert warehouse.status_counts() == {"delivered": 30}
    for key in leased:
        tries = [(a["attempt"], a["outcome"]) for a in warehouse.attempts() if a["event_key"] == key]
        assert tries == [(1, "unknown"), (2, "delivered")]

"""One event, one send (contract section 12): an extraction that runs while a sender claims,
delivers or settles its events never rewrites them. Real warehouses (SQLite and PostgreSQL), the
sandbox as a real loopback HTTP server, the real sender. The interleavings are forced: a sender
runs right after the extraction read the rows it then writes. Last, reruns race a drain sending
thousands of events, and the sandbox counts what it received."""
from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, func, select

from lead_sync.db.engines import prepare_engine
from lead_sync.db.schema import deliveries, outbox
from lead_sync.delivery import claims
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.delivery.sender import Sender
from lead_sync.state import recording as state

from tests.support.processes import wait_for
from tests.support import TOKEN, signups
from tests.support.audit import outbox_keys, row, row_and_body
from tests.support.clock import FakeClock
from tests.support.seeding import NEXT_DAY, PARTITION, new_run_id, rename, rerun, seed, signup
from tests.support.sending import sending

CUSTOMERS = range(1, 7)


def after_first_call(monkeypatch, name: str, action) -> list:
    """Run `action` once, right after the first call of state.<name> (the name as recording looks
    it up) returned (a generator: once it has yielded everything). Returns a list that holds True
    once it ran."""
    original, ran = getattr(state, name), []

    def once() -> None:
        if not ran:
            ran.append(True)
            action()

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        once()
        return result

    def wrapped_stream(*args, **kwargs):
        yield from original(*args, **kwargs)
        once()

    monkeypatch.setattr(state, name, wrapped_stream if name == "stream" else wrapped)
    return ran


def sent_per_event(sandbox) -> Counter:
    return Counter((r["body"]["customerExternalId"], r["body"]["eventName"]) for r in sandbox.requests())


def drain(wh, sandbox) -> int:
    """A later sender (the drain DAG's): the requests it makes."""
    with sending(wh, sandbox, per_minute=None) as sender:
        return sender.run().requests


# --- forced interleavings --------------------------------------------------------------------

@pytest.mark.parametrize("day", ["home", "open"])
def test_events_delivered_between_the_read_and_the_write_stay_delivered(warehouse, sandbox, monkeypatch, day):
    seed(warehouse, *(signup(cid, cid) for cid in CUSTOMERS))
    rename(warehouse, "v2")  # the rerun re-evaluates every event to a new body
    with sending(warehouse, sandbox, per_minute=None) as sender:
        reports = []
        ran = after_first_call(monkeypatch, "rows_on_record", lambda: reports.append(sender.run()))
        summary = rerun(warehouse, PARTITION if day == "home" else NEXT_DAY)
    assert ran and reports[0].delivered == len(CUSTOMERS)
    for cid in CUSTOMERS:
        delivered = row(warehouse, cid)
        assert (delivered["status"], delivered["attempts"], delivered["reason"]) == ("delivered", 1, None)
        assert delivered["inflight_until"] is None and delivered["delivered_at"] is not None
    assert outbox_keys(warehouse) == set()
    # Nothing is sent again: a later sender finds nothing, the API saw each event once.
    assert drain(warehouse, sandbox) == 0
    assert sent_per_event(sandbox) == {(str(cid), "signup_started"): 1 for cid in CUSTOMERS}
    assert Counter(r["status"] for r in sandbox.requests()) == {200: len(CUSTOMERS)}
    # The run says what it left.
    assert summary["reevaluated"] == len(CUSTOMERS) and summary["changed_meanwhile"] == len(CUSTOMERS)


def test_an_event_claimed_between_the_read_and_the_write_is_left_to_its_sender(warehouse, sandbox, monkeypatch):
    seed(warehouse, signup(1), signup(2, 1))
    rename(warehouse, "v2")
    taken = []

    def claim() -> None:
        taken.extend(claims.claim_many(warehouse.engine, "manual__claimer", 60, datetime.now(timezone.utc),
                                       new=10).claims)

    after_first_call(monkeypatch, "rows_on_record", claim)
    summary = rerun(warehouse)
    assert len(taken) == 2
    for cid in (1, 2):
        held, body = row_and_body(warehouse, cid)
        # As the claim left it: held, its first attempt counted, the body it took unchanged.
        assert (held["status"], held["attempts"], held["inflight_run_id"]) == ("pending", 1, "manual__claimer")
        assert "customerName" not in body and held["last_run_id"] == "manual__claimer"
    assert summary["changed_meanwhile"] == 2


def test_events_delivered_after_the_close_missing_read_are_not_closed(warehouse, sandbox, monkeypatch):
    seed(warehouse, *(signup(cid, cid) for cid in CUSTOMERS))
    warehouse.execute("DELETE FROM signups WHERE customer_external_id IN (1, 2)")  # gone from the warehouse
    with sending(warehouse, sandbox, per_minute=None) as sender:
        reports = []
        ran = after_first_call(monkeypatch, "stream", lambda: reports.append(sender.run()))
        summary = rerun(warehouse)
    assert ran and reports[0].delivered == len(CUSTOMERS)
    assert {row(warehouse, cid)["status"] for cid in CUSTOMERS} == {"delivered"}
    assert all(row(warehouse, cid)["reason"] is None for cid in (1, 2))
    assert drain(warehouse, sandbox) == 0 and set(sent_per_event(sandbox).values()) == {1}
    assert summary.get("closed_missing", 0) == 0 and summary["changed_meanwhile"] == 2


def test_a_missing_event_still_open_is_closed(warehouse):
    seed(warehouse, signup(1), signup(2, 1))
    warehouse.execute("DELETE FROM signups WHERE customer_external_id = 1")
    summary = rerun(warehouse)
    assert summary["closed_missing"] == 1 and "changed_meanwhile" not in summary
    closed, body = row_and_body(warehouse, 1)
    assert closed["status"] == "skipped" and body is None
    assert row(warehouse, 2)["status"] == "pending"


# --- a drain sending while the partition is re-run -----------------------------------------------

EVENTS = 3_000
WIDEN = 100  # of the events a rerun read as open, those the drain delivers before the rerun goes on


def test_reruns_while_a_drain_sends_deliver_every_event_exactly_once(pg_warehouse, sandbox, monkeypatch):
    wh = pg_warehouse
    start = datetime(2026, 11, 27)
    wh.create_sources()
    wh.add(signups, *[dict(customer_external_id=n, click_id=f"click-{n}", customer_name=None, customer_email=None,
                           customer_avatar=None, signed_up_at=start + timedelta(seconds=20 * n),
                           requires_verification=False) for n in range(1, EVENTS + 1)])
    assert rerun(wh)["new"] == EVENTS
    sandbox.set_faults({"rate_limit_per_minute": None, "latency_ms": 0})
    done, errors, reports = threading.Event(), [], []

    def send() -> None:
        """The drain DAG: a sender run after another (its own engine and client) while any event is
        sendable. A sender ends its run early when the rows it would take are locked by a rerun's write."""
        engine = prepare_engine(create_engine(wh.url))
        try:
            with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=5.0) as client:
                while claims.has_sendable(engine) and len(reports) < 50:
                    clock = FakeClock()  # each run starts now
                    limiter = SharedRateLimiter(engine, "drain-bucket", None, clock=clock)
                    reports.append(Sender(engine, client, limiter, RetryPolicy(3, 0.05, 0.5), new_run_id(),
                                          clock() + 60, clock=clock, sleep=clock.sleep).run())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            engine.dispose()
            done.set()

    read = state.rows_on_record

    def read_then_let_the_drain_deliver(conn, keys):
        """The rerun's read, then a wait until the drain has delivered some of what it read as open
        (or has finished): each rerun then writes over events delivered since it read them."""
        rows = read(conn, keys)
        free = [k for k, r in rows.items() if r["status"] == "pending" and r["inflight_until"] is None]

        def delivered() -> int:
            with wh.engine.connect() as other:
                return other.execute(select(func.count()).where(
                    deliveries.c.event_key.in_(free), deliveries.c.status == "delivered")).scalar_one()

        wait_for(lambda: done.is_set() or delivered() >= min(WIDEN, len(free)), 20,
                 "the drain to deliver events the rerun read as open", every=0.005)
        return rows

    monkeypatch.setattr(state, "rows_on_record", read_then_let_the_drain_deliver)
    drainer = threading.Thread(target=send, daemon=True)
    drainer.start()
    wait_for(lambda: sandbox.stats()["requests"] or done.is_set(), 20, "the drain to start sending", every=0.005)
    reruns, overlapping, changed = 0, 0, 0
    while reruns < 3 or not done.is_set():  # at least three, and again as long as the drain sends
        assert reruns < 100, "the drain did not finish"
        busy = not done.is_set()
        rename(wh, f"v{reruns}")
        summary = rerun(wh)
        overlapping += busy
        changed += summary.get("changed_meanwhile", 0)
        reruns += 1
    drainer.join(timeout=30)
    assert not drainer.is_alive() and not errors, errors
    later = drain(wh, sandbox)  # nothing is left for a later sender
    print(f"\n{reruns} reruns, {overlapping} while the drain sent; {changed} events changed meanwhile; "
          f"{len(reports)} drain runs sent {sum(r.requests for r in reports)}, a later one {later}")
    per_event = sent_per_event(sandbox)
    twice = {event: n for event, n in per_event.items() if n > 1}
    assert not twice, f"{len(twice)} events sent more than once, e.g. {sorted(twice.items())[:3]}"
    assert len(per_event) == EVENTS and later == 0  # the API saw each event once
    assert Counter(r["status"] for r in sandbox.requests()) == {200: EVENTS}
    assert wh.status_counts() == {"delivered": EVENTS}
    with wh.engine.connect() as conn:
        assert conn.execute(select(outbox.c.event_key)).first() is None

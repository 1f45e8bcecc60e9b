"""The event-2 rule (contract: a deferred event 2 only after its event 1): how a pending event 2
stands against its customer's event 1s on record, and reading those on real warehouses."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import insert

from lead_sync.db.schema import deliveries, ensure_schema
from lead_sync.events import (
    DEFERRED_CONFIRM, DEFERRED_START, DELIVERED, FAILED, NON_DEFERRED, PENDING, REJECTED, SKIPPED, LeadEvent,
)
from lead_sync.state.judge import Judge, first_events_by_customer

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
WAIT_DAYS = 2.0


def confirm() -> LeadEvent:
    return LeadEvent("k2", "verifications", date(2026, 11, 27), DEFERRED_CONFIRM, PENDING, {"eventName": "x"}, "7")


def judged(firsts: list[dict], created_at: datetime | None = NOW) -> LeadEvent:
    event = confirm()
    Judge(WAIT_DAYS, NOW)(event, firsts, created_at)
    return event


def start(status: str) -> dict:
    return {"tracking": DEFERRED_START, "status": status}


def test_an_event_2_whose_event_1_is_delivered_goes_with_no_reason():
    event = judged([start(FAILED), start(DELIVERED)], created_at=NOW - timedelta(days=30))
    assert (event.status, event.reason) == (PENDING, None)


@pytest.mark.parametrize("firsts, reason", [
    ([start(PENDING)], "waiting for event 1 to be delivered"),
    ([], "waiting for event 1 (not on record yet)"),
])
def test_an_event_2_waits_for_its_event_1(firsts, reason):
    event = judged(firsts, created_at=NOW - timedelta(days=WAIT_DAYS) + timedelta(minutes=1))
    assert (event.status, event.reason) == (PENDING, reason)


def test_an_event_2_not_on_record_yet_has_not_waited():
    assert judged([], created_at=None).status == PENDING


@pytest.mark.parametrize("firsts, state", [([start(REJECTED), start(PENDING)], "pending, rejected"),
                                           ([], "not on record")])
def test_an_event_2_is_skipped_once_it_waited_longer_than_the_wait(firsts, state):
    event = judged(firsts, created_at=NOW - timedelta(days=WAIT_DAYS, minutes=1))
    assert event.status == SKIPPED
    assert event.reason == f"event 1 not delivered after 2 days of waiting (event 1: {state})"


def test_an_event_2_of_a_customer_with_only_a_non_deferred_signup_is_skipped():
    event = judged([{"tracking": NON_DEFERRED, "status": DELIVERED}])
    assert (event.status, event.reason) == (SKIPPED, "the customer's signup was non-deferred: no event 1 to confirm")
    # A deferred signup on record as well: that one is the event 1 to wait for.
    assert judged([{"tracking": NON_DEFERRED, "status": DELIVERED}, start(PENDING)]).status == PENDING


def test_first_events_by_customer_reads_only_event_1s_of_the_customers_asked(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    moment = datetime(2026, 11, 27, tzinfo=timezone.utc)
    rows = [("a", "1", DEFERRED_START, PENDING), ("b", "1", NON_DEFERRED, DELIVERED),
            ("c", "1", DEFERRED_CONFIRM, PENDING), ("d", "2", DEFERRED_START, FAILED),
            ("e", "3", DEFERRED_START, PENDING)]
    with engine.begin() as conn:
        conn.execute(insert(deliveries), [
            dict(event_key=key, source="s", partition_date=moment.date(), customer_external_id=customer,
                 tracking=tracking, status=status, attempts=0, created_at=moment, updated_at=moment)
            for key, customer, tracking, status in rows])
    with engine.connect() as conn:
        found = first_events_by_customer(conn, ["1", "2", "absent"])
    assert {customer: sorted((r["tracking"], r["status"]) for r in firsts) for customer, firsts in found.items()} == {
        "1": [(DEFERRED_START, PENDING), (NON_DEFERRED, DELIVERED)], "2": [(DEFERRED_START, FAILED)]}

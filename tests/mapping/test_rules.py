"""The rules of each source kind (contract section 4): the body of event 1 (non-deferred or
deferred) and of event 2, what is skipped and under which key, the columns a source must
return, and which rows belong to a partition."""
from __future__ import annotations

import warnings
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED
from lead_sync.mapping.days import map_rows
from lead_sync.mapping.payloads import event_key
from lead_sync.mapping.rules import SourceShapeError
from lead_sync.read.config import SourceConfig
from lead_sync.read.partition import Partition
from tests.support.mapping import (
    DAY,
    PART,
    SIGNUP_COLS,
    SIGNUPS,
    T0,
    VERIFICATION_COLS,
    VERIFICATIONS,
    as_read,
    map_chunk,
    map_signups,
    map_verifications,
    one,
    plain,
    signup,
    verification,
)

UTC_T0 = T0.replace(tzinfo=timezone.utc)


# --- event 1: non-deferred or deferred -------------------------------------------------

def test_non_deferred_signup_payload():
    event = one(map_signups(signup(customer_external_id=1, click_id="c1", customer_name="Ann",
                                   customer_email="ann@example.com",
                                   customer_avatar="https://img.example.com/a.png")))
    assert event.payload == {
        "eventName": "signup_started", "customerExternalId": "1", "clickId": "c1",
        "timestamp": "2026-11-27T08:00:00Z", "customerName": "Ann", "customerEmail": "ann@example.com",
        "customerAvatar": "https://img.example.com/a.png",
    }
    assert (event.tracking, event.status, event.reason, event.notes) == (NON_DEFERRED, PENDING, None, [])
    assert (event.source, event.partition_date, event.event_name) == ("signups", DAY, "signup_started")
    assert event.event_time == UTC_T0


def test_deferred_signup_payload():
    event = one(map_signups(signup(customer_external_id=2, click_id=" c2 ", requires_verification=True,
                                   customer_name="Bob")))
    assert event.payload == {
        "eventName": "signup_started", "customerExternalId": "2", "clickId": "c2", "mode": "deferred",
        "timestamp": "2026-11-27T08:00:00Z", "customerName": "Bob",
    }
    assert (event.tracking, event.status) == (DEFERRED_START, PENDING)


def test_event_name_comes_from_the_source():
    booked = SourceConfig(name="demo_bookings", kind="signup", sql="demo_bookings.sql", event_name="demo_booked")
    event = one(map_chunk(booked, [signup()], SIGNUP_COLS))
    assert event.payload == {"eventName": "demo_booked", "customerExternalId": "42", "clickId": "clk_1",
                             "timestamp": "2026-11-27T08:00:00Z"}
    assert event.event_key == event_key("42", "demo_booked") != event_key("42", "signup_started")
    assert event.source == "demo_bookings"


def test_signup_source_may_omit_optional_columns():
    # demo_bookings.sql returns no avatar; a minimal source returns only the required columns.
    assert one(map_chunk(SIGNUPS, [signup()], ["customer_external_id", "click_id", "event_time"])).payload == plain()


# --- event 2 ---------------------------------------------------------------------------

def test_verification_payload():
    event = one(map_verifications(verification(customer_external_id=" 2 ", event_name="email_verified",
                                               event_time=datetime(2026, 11, 27, 9, 5, tzinfo=timezone.utc))))
    assert event.payload == {"eventName": "email_verified", "customerExternalId": "2",
                             "timestamp": "2026-11-27T09:05:00Z"}
    assert (event.tracking, event.status, event.event_name) == (DEFERRED_CONFIRM, PENDING, "email_verified")
    assert event.event_key == event_key("2", "email_verified")


def test_verification_ignores_click_and_mode_columns():
    cols = VERIFICATION_COLS + ["click_id", "mode", "requires_verification", "customer_email"]
    row = verification(click_id="c9", mode="deferred", requires_verification=True, customer_email="a@example.com")
    event = one(map_chunk(VERIFICATIONS, [row], cols))
    assert event.payload == {"eventName": "email_verified", "customerExternalId": "42",
                             "timestamp": "2026-11-27T08:00:00Z"}


def test_verification_without_customer_id_is_skipped():
    event = one(map_verifications(verification(customer_external_id=None)))
    assert (event.status, event.reason, event.tracking) == (SKIPPED, "no customer id", DEFERRED_CONFIRM)


# --- skips -----------------------------------------------------------------------------

@pytest.mark.parametrize("click", [None, float("nan")])
def test_signup_without_click_id_is_skipped(click):
    event = one(map_signups(signup(click_id=click, customer_email="ann@example.com")))
    assert (event.status, event.reason, event.payload) == (SKIPPED, "no click_id", None)
    # Named: it holds the key of that customer's event, so a later repeat is counted against it.
    assert event.event_key == event_key("42", "signup_started")
    assert (event.customer_external_id, event.event_name) == ("42", "signup_started")
    assert event.tracking == NON_DEFERRED


def test_deferred_signup_without_click_id_keeps_its_tracking():
    event = one(map_signups(signup(click_id=None, requires_verification="t")))
    assert (event.status, event.reason, event.tracking) == (SKIPPED, "no click_id", DEFERRED_START)


@pytest.mark.parametrize("click, reason", [
    ("", "click_id is empty"),
    ("  ", "click_id is empty"),
    ("c" * 256, "click_id is longer than 255 characters"),
    ("c\tl", "click_id contains control characters"),
    (True, "click_id is a boolean, not an identifier"),
])
def test_signup_with_unusable_click_id_is_skipped(click, reason):
    event = one(map_signups(signup(click_id=click)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, reason, None)
    assert event.event_key == event_key("42", "signup_started")


def test_numeric_click_id_is_text_without_decimal_part():
    assert one(map_signups(signup(click_id=1234.0))).payload["clickId"] == "1234"
    assert one(map_signups(signup(click_id=99))).payload["clickId"] == "99"


def test_the_first_failing_check_gives_the_reason():
    # Several faults at once: flag, then customer id, then click_id (event 2: customer id, then
    # event_name). What was read before the failing check stays on the event.
    flag_first = one(map_signups(signup(requires_verification="maybe", customer_external_id=None, click_id=None)))
    assert flag_first.reason.startswith("requires_verification is not a boolean")
    assert (flag_first.tracking, flag_first.customer_external_id) == (NON_DEFERRED, None)
    customer_next = one(map_signups(signup(requires_verification="t", customer_external_id=None, click_id=None)))
    assert (customer_next.reason, customer_next.tracking) == ("no customer id", DEFERRED_START)
    assert customer_next.event_key.startswith("row_")
    verification_first = one(map_verifications(verification(customer_external_id=None, event_name=None)))
    assert verification_first.reason == "no customer id"


def test_missing_required_column_is_a_source_shape_error():
    with pytest.raises(SourceShapeError, match="source 'signups': its SQL must return column\\(s\\) click_id"):
        map_chunk(SIGNUPS, [signup()], ["customer_external_id", "customer_name", "event_time"])
    with pytest.raises(SourceShapeError, match="event_name"):
        map_chunk(VERIFICATIONS, [verification()], ["customer_external_id", "event_time"])
    # Also when the query returned no rows: the source is wrong, whatever the day.
    with pytest.raises(SourceShapeError, match="click_id, event_time"):
        map_chunk(SIGNUPS, [], ["customer_external_id"])


def test_empty_read_maps_to_nothing():
    assert map_chunk(SIGNUPS, [], SIGNUP_COLS) == []
    assert map_chunk(VERIFICATIONS, [], VERIFICATION_COLS) == []


def test_a_column_returned_twice_is_read_from_its_last_one():
    columns = ["customer_external_id", "click_id", "event_time", "click_id"]
    values = [(42, "first", T0, "last"), (7, "first", T0, None)]
    with pytest.warns(UserWarning, match="source 'signups': its SQL returns column\\(s\\) click_id more than once"):
        events = _map_tuples(SIGNUPS, columns, values)
    assert [(e.status, e.payload and e.payload["clickId"], e.reason) for e in events] == [
        (PENDING, "last", None), (SKIPPED, None, "no click_id")]


def _map_tuples(source, columns, values):
    events, _ = map_rows(source, columns, values, {DAY: PART}, PART, {}, {})
    return events.get(DAY, [])


def test_unique_columns_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _map_tuples(SIGNUPS, SIGNUP_COLS, as_read([signup()], SIGNUP_COLS))


# --- partition membership --------------------------------------------------------------

def test_rows_outside_the_partition_are_dropped():
    rows = [
        signup(customer_external_id=1, event_time=datetime(2026, 11, 26, 23, 59, 59, 999999)),
        signup(customer_external_id=2, event_time=datetime(2026, 11, 27, 0, 0)),
        signup(customer_external_id=3, event_time="2026-11-27 23:59:59.999999"),
        signup(customer_external_id=4, event_time="2026-11-28 00:00:00"),
        signup(customer_external_id=5, event_time="2026-11-28T01:00:00+02:00"),  # 23:00 UTC on the 27th
        signup(customer_external_id=6, event_time="2026-11-27T23:00:00-02:00"),  # 01:00 UTC on the 28th
        # Outside the partition: dropped, even when it would have been skipped.
        signup(customer_external_id=None, event_time=datetime(2026, 11, 26, 12, 0)),
        signup(click_id=None, customer_external_id=7, event_time=datetime(2026, 11, 28, 12, 0)),
    ]
    assert [e.customer_external_id for e in map_signups(*rows)] == ["2", "3", "5"]
    vrows = [verification(customer_external_id=str(i), event_time=r["event_time"]) for i, r in enumerate(rows)]
    assert [e.customer_external_id for e in map_verifications(*vrows)] == ["1", "2", "4"]


@pytest.mark.parametrize("zone, inside, outside", [
    ("America/New_York",  # UTC-5 in November
     ["2026-11-27 05:00:00", "2026-11-28 04:59:59.999999", "2026-11-27T00:00:00-05:00", "2026-11-27T23:30:00-05:00"],
     ["2026-11-27 04:59:59", "2026-11-28 05:00:00", "2026-11-27 00:00:00"]),
    ("Asia/Tokyo",  # UTC+9
     ["2026-11-26 15:00:00", "2026-11-27 14:59:59", "2026-11-27T00:00:00+09:00"],
     ["2026-11-26 14:59:59", "2026-11-27 15:00:00", "2026-11-27T23:59:00"]),
    ("Asia/Kathmandu",  # UTC+5:45
     ["2026-11-26 18:15:00", "2026-11-27 18:14:59"],
     ["2026-11-26 18:14:59", "2026-11-27 18:15:00"]),
])
def test_partition_membership_in_a_non_utc_zone(zone, inside, outside):
    part = Partition(DAY, ZoneInfo(zone))
    rows = [signup(customer_external_id=f"in{i}", event_time=t) for i, t in enumerate(inside)]
    rows += [signup(customer_external_id=f"out{i}", event_time=t) for i, t in enumerate(outside)]
    events = map_signups(*rows, partition=part)
    assert [e.customer_external_id for e in events] == [f"in{i}" for i in range(len(inside))]
    assert all(e.partition_date == DAY for e in events)
    # The wire timestamp is UTC whatever the partition zone.
    assert all(e.payload["timestamp"].endswith("Z") for e in events)


def test_partition_across_dst_change():
    # 2026-03-08 in New York has 23 hours: [05:00Z, 04:00Z next day).
    part = Partition(date(2026, 3, 8), ZoneInfo("America/New_York"))
    rows = [signup(customer_external_id=1, event_time="2026-03-08 04:59:59"),
            signup(customer_external_id=2, event_time="2026-03-08 05:00:00"),
            signup(customer_external_id=3, event_time="2026-03-09 03:59:59"),
            signup(customer_external_id=4, event_time="2026-03-09 04:00:00")]
    assert [e.customer_external_id for e in map_signups(*rows, partition=part)] == ["2", "3"]


def test_unreadable_time_stays_in_the_partition_of_its_query():
    part = Partition(DAY, ZoneInfo("Asia/Tokyo"))
    event = one(map_signups(signup(event_time="not a time"), partition=part))
    assert (event.status, event.partition_date) == (SKIPPED, DAY)

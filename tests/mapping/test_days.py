"""Rows read for several days at once: each to the partition of its event time, the look-back's
passing over what is on record, the tally of what was read, and one event per key."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from lead_sync.events import NON_DEFERRED, PENDING, SKIPPED, LeadEvent
from lead_sync.mapping.days import ReadTally, first_per_key, map_rows
from lead_sync.mapping.payloads import event_key
from lead_sync.read.partition import Partition
from tests.support.mapping import (
    DAY,
    SIGNUP_COLS,
    SIGNUPS,
    VERIFICATION_COLS,
    VERIFICATIONS,
    as_read,
    map_signups,
    map_verifications,
    signup,
    verification,
)

UTC = timezone.utc
BEFORE, AFTER = DAY - timedelta(days=1), DAY + timedelta(days=1)


def days_of(zone: str = "UTC", *days: date) -> dict[date, Partition]:
    return {d: Partition(d, ZoneInfo(zone)) for d in days or (BEFORE, DAY)}


def customers(events: dict[date, list[LeadEvent]]) -> dict[date, list[str | None]]:
    return {day: [e.customer_external_id for e in found] for day, found in events.items()}


# --- sorting rows into days --------------------------------------------------------------

def test_each_row_goes_to_the_partition_of_its_event_time():
    days = days_of("Asia/Tokyo", BEFORE, DAY)  # UTC+9: the 27th there is [26th 15:00Z, 27th 15:00Z)
    rows = [signup(customer_external_id=1, event_time="2026-11-26 14:00:00"),  # the 26th in Tokyo
            signup(customer_external_id=2, event_time="2026-11-26 16:00:00"),  # the 27th
            signup(customer_external_id=3, event_time="2026-11-27 16:00:00"),  # the 28th: not read
            signup(customer_external_id=4, event_time="2026-11-25 14:00:00")]  # the 25th
    events, passed = map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows, SIGNUP_COLS), days, days[DAY], {}, {})
    assert customers(events) == {BEFORE: ["1"], DAY: ["2"]}
    assert passed == 0
    assert all(e.partition_date == day for day, found in events.items() for e in found)


def test_a_time_at_the_calendars_end_is_no_days_row_and_stops_nothing():
    # 9999-12-31 23:00Z is already the next year in Kiritimati (UTC+14), and 0001-01-01 01:00Z the
    # year before in New York: past the calendar, so no partition's; the rows beside them still map.
    for zone, edge in (("Pacific/Kiritimati", datetime(9999, 12, 31, 23, tzinfo=UTC)),
                       ("America/New_York", datetime(1, 1, 1, 1, tzinfo=UTC))):
        rows = [signup(customer_external_id=1, event_time=edge), signup(customer_external_id=2)]
        days = days_of(zone, BEFORE, DAY)
        events, _ = map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows, SIGNUP_COLS), days, days[DAY], {}, {})
        assert "1" not in [c for found in customers(events).values() for c in found]
        assert sum(customers(events).values(), []) != []


def test_a_row_whose_time_cannot_be_read_goes_to_the_runs_own_partition():
    rows = [signup(customer_external_id=1, event_time="garbage"), signup(customer_external_id=2)]
    days = days_of("UTC", BEFORE, DAY)
    events, _ = map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows, SIGNUP_COLS), days, days[BEFORE], {}, {})
    assert [(e.status, e.partition_date) for e in events[BEFORE]] == [(SKIPPED, BEFORE)]
    assert customers(events)[DAY] == ["2"]
    # A read without the run's own partition among its days leaves such a row to that partition's read.
    events, _ = map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows, SIGNUP_COLS), days, None, {}, {})
    assert customers(events) == {DAY: ["2"]}


def test_the_tally_counts_every_row_kept_with_its_key():
    rows = [signup(customer_external_id=1), signup(customer_external_id=1, click_id="again"),
            signup(customer_external_id=None), signup(customer_external_id=3, event_time="2026-11-26 10:00:00"),
            signup(customer_external_id=4, event_time="2026-11-20 10:00:00")]  # a day not read
    tally: dict[date, ReadTally] = {}
    events, _ = map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows, SIGNUP_COLS), days_of(), None, {}, tally)
    assert set(tally) == {BEFORE, DAY}
    assert tally[DAY].rows == 3 and tally[BEFORE].rows == 1
    assert tally[DAY].keys == {e.event_key for e in events[DAY]}  # the repeat shares its key
    assert len(tally[DAY].keys) == 2
    # A later chunk of the same read adds to the same tally.
    map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows[:1], SIGNUP_COLS), days_of(), None, {}, tally)
    assert tally[DAY].rows == 4 and len(tally[DAY].keys) == 2


# --- the look-back: what is on record is passed over ------------------------------------

def test_rows_on_record_of_a_lookback_day_are_passed_over_unmapped():
    on_record = event_key("1", "signup_started")
    rows = [signup(customer_external_id=1, customer_email="not an address", event_time="2026-11-26 10:00:00"),
            signup(customer_external_id=2, event_time="2026-11-26 11:00:00"),  # late: not on record
            signup(customer_external_id=1)]  # the run's own day: mapped whatever is known elsewhere
    days = days_of()
    tally: dict[date, ReadTally] = {}
    events, passed = map_rows(SIGNUPS, SIGNUP_COLS, as_read(rows, SIGNUP_COLS), days, days[DAY],
                              {BEFORE: {on_record}}, tally)
    assert customers(events) == {BEFORE: ["2"], DAY: ["1"]}
    assert passed == 1
    # Passed over, yet read: it counts for its day, under its key.
    assert tally[BEFORE].rows == 2 and on_record in tally[BEFORE].keys


def test_a_row_whose_key_only_its_mapping_tells_is_mapped_then_passed_over():
    # A bad flag makes the row a skip under its row key: known only once it is mapped.
    row = signup(customer_external_id=1, requires_verification="maybe", event_time="2026-11-26 10:00:00")
    days = days_of()
    first, _ = map_rows(SIGNUPS, SIGNUP_COLS, as_read([row], SIGNUP_COLS), days, None, {}, {})
    (skipped,) = first[BEFORE]
    assert skipped.status == SKIPPED and skipped.event_key.startswith("row_")
    tally: dict[date, ReadTally] = {}
    again, passed = map_rows(SIGNUPS, SIGNUP_COLS, as_read([row], SIGNUP_COLS), days, None,
                             {BEFORE: {skipped.event_key}}, tally)
    assert (again, passed) == ({}, 1)
    assert tally[BEFORE].keys == {skipped.event_key} and tally[BEFORE].rows == 1


def test_a_verification_on_record_is_passed_over():
    rows = [verification(event_time="2026-11-26 10:00:00"),
            verification(event_name="phone_verified", event_time="2026-11-26 10:00:00")]
    known = {BEFORE: {event_key("42", "email_verified")}}
    events, passed = map_rows(VERIFICATIONS, VERIFICATION_COLS, as_read(rows, VERIFICATION_COLS), days_of(), None,
                              known, {})
    assert [e.event_name for e in events[BEFORE]] == ["phone_verified"]
    assert passed == 1


# --- one event per key -------------------------------------------------------------------

def test_repeats_share_their_key_and_first_per_key_keeps_the_earliest():
    rows = [
        signup(customer_external_id="42", click_id="late", event_time=datetime(2026, 11, 27, 20, 0)),
        signup(customer_external_id=42, click_id="early", event_time=datetime(2026, 11, 27, 1, 0)),
        signup(customer_external_id=42.0, click_id="mid", event_time="2026-11-27 10:00:00"),
        signup(customer_external_id=7, click_id="other", event_time=datetime(2026, 11, 27, 5, 0)),
    ]
    events = map_signups(*rows)
    assert len({e.event_key for e in events[:3]}) == 1
    kept, repeats = first_per_key(events)
    assert repeats == 2
    assert sorted((e.customer_external_id, e.payload["clickId"]) for e in kept) == [("42", "early"), ("7", "other")]


def test_first_per_key_earliest_may_be_a_skip():
    events = map_signups(signup(click_id="later", event_time=datetime(2026, 11, 27, 9, 0)),
                         signup(click_id=None, event_time=datetime(2026, 11, 27, 8, 0)))
    (kept,), repeats = first_per_key(events)
    assert (kept.status, kept.reason, repeats) == (SKIPPED, "no click_id", 1)


def test_first_per_key_verification_repeats():
    events = map_verifications(verification(event_time="2026-11-27 09:00:00"),
                               verification(customer_external_id=42, event_time="2026-11-27 08:30:00"),
                               verification(event_name="phone_verified"))
    kept, repeats = first_per_key(events)
    assert repeats == 1
    assert sorted((e.event_name, e.payload["timestamp"]) for e in kept) == [
        ("email_verified", "2026-11-27T08:30:00Z"), ("phone_verified", "2026-11-27T08:00:00Z")]


def test_first_per_key_folds_identical_unreadable_rows():
    events = map_signups(signup(event_time="garbage"), signup(event_time="garbage"),
                         signup(event_time="other garbage"))
    assert len({e.event_key for e in events}) == 2
    kept, repeats = first_per_key(events)
    assert (len(kept), repeats) == (2, 1)


def test_first_per_key_prefers_a_timed_event():
    timed = LeadEvent("k", "s", DAY, NON_DEFERRED, PENDING, {"a": 1}, event_time=datetime(2026, 11, 27, tzinfo=UTC))
    untimed = LeadEvent("k", "s", DAY, NON_DEFERRED, SKIPPED, None, reason="x")
    assert first_per_key([untimed, timed]) == ([timed], 1)
    assert first_per_key([timed, untimed]) == ([timed], 1)
    assert first_per_key([]) == ([], 0)


def test_first_per_key_on_ties_does_not_depend_on_row_order():
    # Same customer, same moment, different rows: the warehouse may return them in any order
    # (PostgreSQL without ORDER BY does), and every run must keep the same one.
    rows = [signup(click_id="b"), signup(click_id="a"), signup(click_id=None), signup(click_id="c")]
    kept = {first_per_key(map_signups(*order))[0][0].payload["clickId"]
            for order in (rows, rows[::-1], rows[1:] + rows[:1], rows[2:] + rows[:2])}
    assert len(kept) == 1
    # A sendable row is kept over a skipped one of the same moment.
    (only,), repeats = first_per_key(map_signups(signup(click_id=None), signup(click_id="z")))
    assert (only.status, only.payload["clickId"], repeats) == (PENDING, "z", 1)

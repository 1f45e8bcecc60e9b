"""Which day a run syncs, the partition's bounds in its time zone, and the SQL window (partition.py)."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pendulum
import pytest

from lead_sync.read.partition import Partition, contiguous, days_window, parse_partition_date, resolve_partition

UTC = timezone.utc
UTC_ZONE = ZoneInfo("UTC")


# --- resolve_partition -----------------------------------------------------------------

def test_conf_partition_date_wins_over_the_data_interval():
    part = resolve_partition("2026-11-20", datetime(2026, 11, 27, tzinfo=UTC), UTC_ZONE)
    assert part == Partition(date(2026, 11, 20), UTC_ZONE)


def test_conf_partition_date_without_data_interval():
    assert resolve_partition("2026-11-20", None, UTC_ZONE).day == date(2026, 11, 20)


def test_conf_partition_date_is_trimmed():
    assert resolve_partition(" 2026-11-20\n", None, UTC_ZONE).day == date(2026, 11, 20)


def test_data_interval_start_gives_the_day():
    # A scheduled run for [2026-11-27, 2026-11-28) syncs 2026-11-27.
    assert resolve_partition(None, datetime(2026, 11, 27, tzinfo=UTC), UTC_ZONE).day == date(2026, 11, 27)
    assert resolve_partition("", datetime(2026, 11, 27, tzinfo=UTC), UTC_ZONE).day == date(2026, 11, 27)


def test_data_interval_start_as_pendulum_datetime():
    # What Airflow hands over.
    start = pendulum.datetime(2026, 11, 27, tz="UTC")
    assert resolve_partition(None, start, UTC_ZONE).day == date(2026, 11, 27)


def test_naive_data_interval_start_is_utc():
    assert resolve_partition(None, datetime(2026, 11, 27, 23, 30), UTC_ZONE).day == date(2026, 11, 27)
    # In a UTC-5 partition zone, 23:30 UTC is still the 27th; 03:00 UTC is the 26th there.
    ny = ZoneInfo("America/New_York")
    assert resolve_partition(None, datetime(2026, 11, 27, 23, 30), ny).day == date(2026, 11, 27)
    assert resolve_partition(None, datetime(2026, 11, 27, 3, 0), ny).day == date(2026, 11, 26)


@pytest.mark.parametrize("start, zone, expected", [
    # Midnight in Berlin is 23:00 UTC the day before.
    (datetime(2026, 11, 27, 0, 0, tzinfo=ZoneInfo("Europe/Berlin")), "UTC", date(2026, 11, 26)),
    (datetime(2026, 11, 27, 1, 0, tzinfo=ZoneInfo("Europe/Berlin")), "UTC", date(2026, 11, 27)),
    (datetime(2026, 11, 27, 0, 0, tzinfo=timezone(timedelta(hours=-8))), "UTC", date(2026, 11, 27)),
    (datetime(2026, 11, 27, 20, 0, tzinfo=timezone(timedelta(hours=-8))), "UTC", date(2026, 11, 28)),
    # The day is taken in the partition zone.
    (datetime(2026, 11, 27, 0, 0, tzinfo=UTC), "Asia/Tokyo", date(2026, 11, 27)),
    (datetime(2026, 11, 27, 15, 0, tzinfo=UTC), "Asia/Tokyo", date(2026, 11, 28)),
    (datetime(2026, 11, 27, 5, 0, tzinfo=UTC), "America/New_York", date(2026, 11, 27)),
    (datetime(2026, 11, 27, 0, 0, tzinfo=ZoneInfo("America/New_York")), "America/New_York", date(2026, 11, 27)),
])
def test_data_interval_start_in_another_zone(start, zone, expected):
    part = resolve_partition(None, start, ZoneInfo(zone))
    assert part.day == expected
    assert part.zone == ZoneInfo(zone)


def test_missing_both_is_a_clear_error():
    with pytest.raises(ValueError) as info:
        resolve_partition(None, None, UTC_ZONE)
    message = str(info.value)
    assert "no data interval" in message
    assert '{"partition_date": "YYYY-MM-DD"}' in message
    with pytest.raises(ValueError, match="partition_date"):
        resolve_partition("", None, UTC_ZONE)


@pytest.mark.parametrize("value", [
    "2026/11/27", "27-11-2026", "2026-11-27T00:00:00", "2026-11-27 00:00", "20261127", "2026-1-27",
    "tomorrow", "2026-11-27x", " ", "2026-11-27\n2026-11-28",
])
def test_bad_partition_date_names_the_expected_format(value):
    with pytest.raises(ValueError) as info:
        resolve_partition(value, datetime(2026, 11, 27, tzinfo=UTC), UTC_ZONE)
    assert "YYYY-MM-DD" in str(info.value)
    assert repr(value) in str(info.value)


def test_partition_date_in_other_digits_is_refused():
    # Arabic-Indic digits: not a date the run could use, whichever message explains it.
    with pytest.raises(ValueError, match="partition_date"):
        parse_partition_date("٢٠٢٦-١١-٢٧")


@pytest.mark.parametrize("value", [20261127, ["2026-11-27"], b"2026-11-27"])
def test_partition_date_that_is_not_text(value):
    with pytest.raises(ValueError, match="partition_date must be YYYY-MM-DD"):
        resolve_partition(value, None, UTC_ZONE)


@pytest.mark.parametrize("value", ["2026-13-01", "2026-02-30", "2026-00-10", "2025-02-29"])
def test_partition_date_that_is_not_a_calendar_date(value):
    with pytest.raises(ValueError) as info:
        parse_partition_date(value)
    assert "not a calendar date" in str(info.value)
    assert repr(value) in str(info.value)


def test_leap_day_is_a_date():
    assert parse_partition_date("2024-02-29") == date(2024, 2, 29)


# --- partition_date: absurd days ---------------------------------------------------------

NOW = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)  # tomorrow (UTC) is 2026-11-28


@pytest.fixture
def fixed_now(monkeypatch):
    from lead_sync import clock

    monkeypatch.setattr(clock, "utcnow", lambda: NOW)


@pytest.mark.parametrize("value", ["9999-12-31", "0001-01-01", "1999-12-31", "2026-11-29", "2100-01-01"])
def test_partition_date_out_of_range_names_the_key_and_the_limits(fixed_now, value):
    with pytest.raises(ValueError) as info:
        resolve_partition(value, datetime(2026, 11, 27, tzinfo=UTC), UTC_ZONE)
    message = str(info.value)
    assert "partition_date" in message and repr(value) in message
    assert "2000-01-01" in message and "2026-11-28" in message and "tomorrow" in message


def test_partition_date_range_bounds_are_accepted(fixed_now):
    assert parse_partition_date("2000-01-01") == date(2000, 1, 1)
    assert parse_partition_date("2026-11-28") == date(2026, 11, 28)  # tomorrow: already today east of UTC
    assert resolve_partition("2026-11-27", None, ZoneInfo("Pacific/Kiritimati")).day == date(2026, 11, 27)


def test_far_future_partition_date_is_a_value_error_not_an_overflow():
    # 9999-12-31 once parsed, and its partition's end overflowed ("date value out of range", retried).
    with pytest.raises(ValueError, match=r"partition_date must be from 2000-01-01 to "):
        resolve_partition("9999-12-31", None, UTC_ZONE)


# --- Partition bounds ------------------------------------------------------------------

def test_utc_partition_bounds():
    part = Partition(date(2026, 11, 27), UTC_ZONE)
    assert part.start == datetime(2026, 11, 27, tzinfo=UTC)
    assert part.end == datetime(2026, 11, 28, tzinfo=UTC)
    assert part.start.utcoffset() == timedelta(0) and part.end.utcoffset() == timedelta(0)
    assert part.contains(datetime(2026, 11, 27, tzinfo=UTC))
    assert part.contains(datetime(2026, 11, 27, 23, 59, 59, 999999, tzinfo=UTC))
    assert not part.contains(datetime(2026, 11, 28, tzinfo=UTC))
    assert not part.contains(datetime(2026, 11, 26, 23, 59, 59, 999999, tzinfo=UTC))


@pytest.mark.parametrize("zone, day, start, end, hours", [
    # Spring forward: a 23-hour day.
    ("America/New_York", date(2026, 3, 8), datetime(2026, 3, 8, 5), datetime(2026, 3, 9, 4), 23),
    ("Europe/Berlin", date(2026, 3, 29), datetime(2026, 3, 28, 23), datetime(2026, 3, 29, 22), 23),
    # Fall back: a 25-hour day.
    ("America/New_York", date(2026, 11, 1), datetime(2026, 11, 1, 4), datetime(2026, 11, 2, 5), 25),
    ("Europe/Berlin", date(2026, 10, 25), datetime(2026, 10, 24, 22), datetime(2026, 10, 25, 23), 25),
    # Southern hemisphere: clocks go back in April.
    ("Australia/Sydney", date(2026, 4, 5), datetime(2026, 4, 4, 13), datetime(2026, 4, 5, 14), 25),
    # Ordinary days next to them.
    ("America/New_York", date(2026, 3, 9), datetime(2026, 3, 9, 4), datetime(2026, 3, 10, 4), 24),
    ("America/New_York", date(2026, 11, 27), datetime(2026, 11, 27, 5), datetime(2026, 11, 28, 5), 24),
])
def test_partition_bounds_across_dst(zone, day, start, end, hours):
    part = Partition(day, ZoneInfo(zone))
    assert part.start == start.replace(tzinfo=UTC)
    assert part.end == end.replace(tzinfo=UTC)
    assert part.start.tzinfo == UTC and part.end.tzinfo == UTC
    assert part.end - part.start == timedelta(hours=hours)
    assert part.contains(part.start)
    assert part.contains(part.end - timedelta(microseconds=1))
    assert not part.contains(part.end)
    assert not part.contains(part.start - timedelta(microseconds=1))
    # Consecutive partitions tile time: no gap, no overlap.
    assert Partition(day + timedelta(days=1), ZoneInfo(zone)).start == part.end


def test_sql_window():
    assert Partition(date(2026, 11, 27), UTC_ZONE).sql_window() == {
        "window_start": "2026-11-25", "window_end": "2026-11-30"}
    assert Partition(date(2026, 12, 31), UTC_ZONE).sql_window() == {
        "window_start": "2026-12-29", "window_end": "2027-01-03"}
    assert Partition(date(2028, 3, 1), UTC_ZONE).sql_window() == {  # 2028 is a leap year
        "window_start": "2028-02-28", "window_end": "2028-03-04"}


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kathmandu",
                                  "America/St_Johns", "Australia/Lord_Howe"])
@pytest.mark.parametrize("day", [date(2026, 1, 1), date(2026, 3, 8), date(2026, 11, 1), date(2026, 12, 31)])
def test_sql_window_covers_the_partition_in_any_zone(zone, day):
    part = Partition(day, ZoneInfo(zone))
    window = part.sql_window()
    low = datetime.fromisoformat(window["window_start"]).replace(tzinfo=UTC)
    high = datetime.fromisoformat(window["window_end"]).replace(tzinfo=UTC)
    # Every UTC instant of the partition (a naive UTC timestamp compares as such) lies in the
    # window the SQL filters on, with room to spare for the zone's offset.
    assert low <= part.start and part.end <= high
    assert high - low == timedelta(days=5)
    assert window["window_start"] == (day - timedelta(days=2)).isoformat()


# --- several days in one read ------------------------------------------------------------

def test_days_window_and_contiguous_runs():
    assert days_window(date(2026, 11, 24), date(2026, 11, 27)) == {
        "window_start": "2026-11-22", "window_end": "2026-11-30"}
    days = [date(2026, 11, d) for d in (27, 24, 25, 26, 20, 1)]
    assert contiguous(days) == [(date(2026, 11, 1), date(2026, 11, 1)), (date(2026, 11, 20), date(2026, 11, 20)),
                                (date(2026, 11, 24), date(2026, 11, 27))]

"""Which day a run syncs (partition.py) and the lead-source configuration (config.py)."""
from __future__ import annotations

import textwrap
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pendulum
import pytest

from lead_sync.read import config as config_module
from lead_sync.read.config import DEFAULT_SOURCES_FILE, SOURCES_ENV, ConfigError, load_config
from lead_sync.read.partition import Partition, parse_partition_date, resolve_partition

UTC = timezone.utc
UTC_ZONE = ZoneInfo("UTC")
SOURCES_DIR = Path(__file__).resolve().parents[2] / "include" / "sources"


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


# --- load_config: the shipped files ----------------------------------------------------

def test_shipped_default_configuration_loads():
    config = load_config(SOURCES_DIR / "lead_sources.yaml")
    assert config.partition_timezone == "UTC"
    assert config.zone == ZoneInfo("UTC")
    assert config.verification_wait_days == 7
    assert [(s.name, s.kind, s.event_name, s.sql) for s in config.sources] == [
        ("signups", "signup", "signup_started", "signups.sql"),
        ("verifications", "verification", None, "verifications.sql"),
    ]
    assert config.base_dir == SOURCES_DIR
    signups_sql = config.sql_text(config.sources[0])
    assert "FROM signups" in signups_sql and ":window_start" in signups_sql and ":window_end" in signups_sql
    assert "FROM verifications" in config.sql_text(config.sources[1])


def test_shipped_demo_configuration_loads():
    config = load_config(SOURCES_DIR / "demo_lead_sources.yaml")
    assert [(s.name, s.kind, s.event_name) for s in config.sources] == [
        ("signups", "signup", "signup_started"),
        ("verifications", "verification", None),
        ("demo_bookings", "signup", "demo_booked"),
    ]
    assert "FROM demo_bookings" in config.sql_text(config.sources[2])


def test_default_file_and_environment_override(tmp_path, monkeypatch):
    monkeypatch.delenv(SOURCES_ENV, raising=False)
    assert config_module.sources_file() == DEFAULT_SOURCES_FILE
    assert [s.name for s in load_config().sources] == ["signups", "verifications"]
    path = write_config(tmp_path, """
        sources:
          - {name: bookings, kind: signup, event_name: demo_booked, sql: q.sql}
    """)
    monkeypatch.setenv(SOURCES_ENV, str(path))
    assert config_module.sources_file() == path
    assert [s.name for s in load_config().sources] == ["bookings"]


# --- load_config: written configurations -----------------------------------------------

def write_config(folder: Path, body: str, sql_files: tuple[str, ...] = ("q.sql", "v.sql")) -> Path:
    for name in sql_files:
        (folder / name).write_text("SELECT 1 WHERE :window_start < :window_end\n", encoding="utf-8")
    path = folder / "sources.yaml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


VALID = """
    partition_timezone: Europe/Paris
    verification_wait_days: 2.5
    sources:
      - name: signups
        kind: signup
        event_name: signup_started
        sql: q.sql
      - name: verifications
        kind: verification
        sql: sub/v.sql
"""


def test_a_written_configuration_loads(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v.sql").write_text("SELECT 2", encoding="utf-8")
    config = load_config(write_config(tmp_path, VALID))
    assert config.zone == ZoneInfo("Europe/Paris")
    assert config.verification_wait_days == 2.5
    assert config.sql_text(config.sources[1]) == "SELECT 2"  # relative to the YAML file's folder


def test_defaults_when_only_sources_are_given(tmp_path):
    config = load_config(write_config(tmp_path, """
        sources:
          - {name: signups, kind: signup, event_name: signup_started, sql: q.sql}
    """))
    assert (config.partition_timezone, config.verification_wait_days) == ("UTC", 7)


def config_error(tmp_path: Path, body: str, names_file: bool = True) -> str:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    if names_file:
        assert str(path) in message  # says which file
    return message


def test_unknown_top_level_key(tmp_path):
    message = config_error(tmp_path, """
        partition_timezone: UTC
        retries: 3
        sources:
          - {name: signups, kind: signup, event_name: signup_started, sql: q.sql}
    """)
    assert "retries" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_key_in_a_source(tmp_path):
    message = config_error(tmp_path, """
        sources:
          - {name: signups, kind: signup, event_name: signup_started, sql: q.sql, table: signups}
    """)
    assert "sources.0.table" in message
    assert "Extra inputs are not permitted" in message


def test_duplicate_source_name(tmp_path):
    message = config_error(tmp_path, """
        sources:
          - {name: signups, kind: signup, event_name: signup_started, sql: q.sql}
          - {name: signups, kind: signup, event_name: demo_booked, sql: q.sql}
    """)
    assert "source names must be unique" in message


def test_signup_without_event_name(tmp_path):
    message = config_error(tmp_path, """
        sources:
          - {name: signups, kind: signup, sql: q.sql}
    """)
    assert "source 'signups': kind 'signup' needs an event_name" in message


def test_signup_with_empty_event_name(tmp_path):
    message = config_error(tmp_path, """
        sources:
          - {name: signups, kind: signup, event_name: "", sql: q.sql}
    """)
    assert "event_name" in message


def test_verification_with_event_name(tmp_path):
    message = config_error(tmp_path, """
        sources:
          - {name: checks, kind: verification, event_name: email_verified, sql: v.sql}
    """)
    assert "source 'checks': a verification takes its event name from each row" in message


def test_missing_sql_file(tmp_path):
    message = config_error(tmp_path, """
        sources:
          - {name: signups, kind: signup, event_name: signup_started, sql: missing.sql}
    """, names_file=False)
    assert "source 'signups': cannot read SQL file" in message
    assert str(tmp_path / "missing.sql") in message


def test_unknown_time_zone(tmp_path):
    message = config_error(tmp_path, """
        partition_timezone: Mars/Olympus_Mons
        sources:
          - {name: signups, kind: signup, event_name: signup_started, sql: q.sql}
    """)
    assert "unknown time zone 'Mars/Olympus_Mons'" in message


@pytest.mark.parametrize("zone", ["", "../../etc/passwd", "UTC+5"])
def test_invalid_time_zone_strings(tmp_path, zone):
    message = config_error(tmp_path, f"""
        partition_timezone: "{zone}"
        sources:
          - {{name: signups, kind: signup, event_name: signup_started, sql: q.sql}}
    """)
    assert "partition_timezone" in message


@pytest.mark.parametrize("body, expected", [
    ("sources: []\n", "sources"),
    ("partition_timezone: UTC\n", "sources"),
    ("sources:\n  - {name: Signups, kind: signup, event_name: x, sql: q.sql}\n", "sources.0.name"),
    ("sources:\n  - {name: signups, kind: sale, event_name: x, sql: q.sql}\n", "sources.0.kind"),
    ("sources:\n  - {name: signups, kind: signup, event_name: x}\n", "sources.0.sql"),
    ("verification_wait_days: -1\nsources:\n  - {name: s, kind: signup, event_name: x, sql: q.sql}\n",
     "verification_wait_days"),
])
def test_invalid_values_name_the_field(tmp_path, body, expected):
    assert expected in config_error(tmp_path, body)


@pytest.mark.parametrize("value", ["366", "365.5", ".inf", "-.inf", ".nan", "1e12", "1.0e+12", "1e309"])
def test_absurd_verification_wait_days_names_the_key_and_the_limit(tmp_path, value):
    message = config_error(tmp_path, f"verification_wait_days: {value}\n" + ONE_SOURCE)
    assert "verification_wait_days" in message
    assert "365" in message or "greater than or equal to 0" in message  # -.inf: below the lower limit


def test_verification_wait_days_bounds_accepted(tmp_path):
    for value in (0, 365):
        config = load_config(write_config(tmp_path, f"verification_wait_days: {value}\n" + ONE_SOURCE))
        assert config.verification_wait_days == value


@pytest.mark.parametrize("key, value, limit", [
    ("rejected_share", ".inf", "less than or equal to 1"), ("rejected_share", ".nan", "less than or equal to 1"),
    ("rejected_share", "1e12", "less than or equal to 1"),
    ("backlog_hours", ".inf", "less than or equal to 8784"), ("backlog_hours", ".nan", "less than or equal to 8784"),
    ("backlog_hours", "1e12", "less than or equal to 8784"), ("backlog_hours", "-.inf", "greater than 0"),
])
def test_absurd_alert_thresholds_name_the_key_and_the_limit(tmp_path, key, value, limit):
    message = config_error(tmp_path, f"alerts: {{{key}: {value}}}\n" + ONE_SOURCE)
    assert f"alerts.{key}" in message and limit in message


# --- time_budget_seconds ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [86_401, 86_400.5, 1e12, float("inf"), float("-inf"), float("nan"), 0, -1,
                                   "1e12", "inf", "nan", "", "soon", None, True, 10**400, [3300]])
def test_absurd_time_budget_names_the_key_and_the_limit(value):
    from lead_sync.read.config import check_time_budget

    with pytest.raises(ConfigError) as info:
        check_time_budget(value)
    message = str(info.value)
    assert "time_budget_seconds" in message and "86400" in message and "above 0" in message


@pytest.mark.parametrize("value, seconds", [(3300, 3300.0), ("1200", 1200.0), (" 60 ", 60.0), (0.5, 0.5),
                                            (86_400, 86_400.0), ("86400", 86_400.0)])
def test_time_budget_within_the_limit(value, seconds):
    from lead_sync.read.config import check_time_budget

    assert check_time_budget(value) == seconds


@pytest.mark.parametrize("body, expected", [
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("", "expected a mapping at the top level"),
    ("sources: [unclosed\n", "cannot read lead-source configuration"),
])
def test_not_a_configuration(tmp_path, body, expected):
    assert expected in config_error(tmp_path, body)


def test_missing_configuration_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read lead-source configuration"):
        load_config(tmp_path / "nope.yaml")


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)


# --- the shipped SQL and the window, end to end -----------------------------------------

def _rows_returned(zone: str, stamps: list[str]) -> list[str]:
    """Text timestamps (as SQLite stores them) that the shipped signups SQL returns for 2026-11-27."""
    from sqlalchemy import create_engine

    from lead_sync.mapping.rows import map_frame
    from lead_sync.read.sources import read_source

    config = load_config(SOURCES_DIR / "lead_sources.yaml")
    part = Partition(date(2026, 11, 27), ZoneInfo(zone))
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE signups (customer_external_id, click_id, customer_name, customer_email, "
                                 "customer_avatar, requires_verification, signed_up_at)")
            conn.exec_driver_sql("INSERT INTO signups VALUES (?, 'c', NULL, NULL, NULL, NULL, ?)",
                                 [(i, s) for i, s in enumerate(stamps)])
        frame = read_source(engine, config, config.sources[0], part)
        return [stamps[int(e.customer_external_id)] for e in map_frame(config.sources[0], frame, part)]
    finally:
        engine.dispose()


def _edge_stamps(zone: str) -> list[str]:
    """The first and last instant of the partition, written with the extreme real-world offsets."""
    part = Partition(date(2026, 11, 27), ZoneInfo(zone))
    stamps = []
    for instant in (part.start, part.end - timedelta(microseconds=1)):
        for hours in (-12, 0, 14):
            stamps.append(instant.astimezone(timezone(timedelta(hours=hours))).isoformat(sep=" "))
    return stamps


@pytest.mark.parametrize("zone", [
    "UTC", "America/New_York", "Asia/Tokyo", "Asia/Kathmandu", "Australia/Sydney",
    "Pacific/Kiritimati", "Pacific/Auckland", "Pacific/Pago_Pago",
])
def test_shipped_sql_returns_every_row_of_the_partition_whatever_its_offset(zone):
    stamps = _edge_stamps(zone)
    assert _rows_returned(zone, stamps) == stamps


def test_shipped_sql_and_mapping_drop_rows_just_outside():
    part = Partition(date(2026, 11, 27), ZoneInfo("Asia/Tokyo"))
    before = (part.start - timedelta(microseconds=1)).astimezone(timezone(timedelta(hours=-5))).isoformat(sep=" ")
    after = part.end.astimezone(timezone(timedelta(hours=9))).isoformat(sep=" ")
    assert _rows_returned("Asia/Tokyo", [before, after]) == []


# --- look-back and alerts -------------------------------------------------------------------

ONE_SOURCE = """
sources:
  - {name: signups, kind: signup, event_name: signup_started, sql: q.sql}
"""


def test_lookback_and_alerts_defaults(tmp_path):
    config = load_config(write_config(tmp_path, ONE_SOURCE))
    assert config.lookback_days == 3
    assert config.alerts is None  # no section: no alerts


@pytest.mark.parametrize("value, limit", [("-1", "greater than or equal to 0"), ("91", "less than or equal to 90"),
                                          ("2.5", "valid integer"), ('"3"', "valid integer"), ("true", "valid integer")])
def test_lookback_days_out_of_range_names_the_key_and_the_limit(tmp_path, value, limit):
    message = config_error(tmp_path, f"lookback_days: {value}\n" + ONE_SOURCE)
    assert "lookback_days" in message and limit in message


def test_lookback_days_bounds_accepted(tmp_path):
    for value in (0, 90):
        assert load_config(write_config(tmp_path, f"lookback_days: {value}\n" + ONE_SOURCE)).lookback_days == value


def test_alerts_section(tmp_path):
    config = load_config(write_config(tmp_path, textwrap.dedent("""
        alerts:
          email: Data-Oncall@Example.com
          slack_conn_id: slack_alerts
          rejected_share: 0.1
          backlog_hours: 6
    """) + ONE_SOURCE))
    assert config.alerts.email == ("Data-Oncall@example.com",)  # one address or a list; domain normalised
    assert (config.alerts.slack_conn_id, config.alerts.rejected_share, config.alerts.backlog_hours) == \
        ("slack_alerts", 0.1, 6)


@pytest.mark.parametrize("body, key", [
    ("alerts: {emails: [a@example.com]}", "alerts.emails"),
    ("alerts: {email: [ops@example.com, not-an-address]}", "alerts.email"),
    ("alerts: {email: ['ops@@example.com']}", "alerts.email"),
    ("alerts: {rejected_share: 1.5}", "alerts.rejected_share"),
    ("alerts: {backlog_hours: 0}", "alerts.backlog_hours"),
    ("alerts: {slack_conn_id: 'has space'}", "alerts.slack_conn_id"),
])
def test_bad_alerts_section_names_the_key(tmp_path, body, key):
    message = config_error(tmp_path, body + "\n" + ONE_SOURCE)
    assert key in message


def test_days_window_and_contiguous_runs():
    from lead_sync.read.partition import contiguous, days_window

    assert days_window(date(2026, 11, 24), date(2026, 11, 27)) == {
        "window_start": "2026-11-22", "window_end": "2026-11-30"}
    days = [date(2026, 11, d) for d in (27, 24, 25, 26, 20, 1)]
    assert contiguous(days) == [(date(2026, 11, 1), date(2026, 11, 1)), (date(2026, 11, 20), date(2026, 11, 20)),
                                (date(2026, 11, 24), date(2026, 11, 27))]


def test_drain_interval(tmp_path):
    assert load_config(write_config(tmp_path, ONE_SOURCE)).drain_interval_minutes == 5
    assert load_config(write_config(tmp_path, "drain_interval_minutes: 1\n" + ONE_SOURCE)).drain_interval_minutes == 1
    for bad in ("0", "6", "2.5"):
        message = config_error(tmp_path, f"drain_interval_minutes: {bad}\n" + ONE_SOURCE)
        assert "drain_interval_minutes" in message


def test_send_batches(tmp_path):
    config = load_config(write_config(tmp_path, ONE_SOURCE))
    assert (config.send_batch_size, config.max_send_batches) == (500, 16)
    config = load_config(write_config(tmp_path, "send_batch_size: 1\nmax_send_batches: 1024\n" + ONE_SOURCE))
    assert (config.send_batch_size, config.max_send_batches) == (1, 1024)
    for key, bad in [("send_batch_size", 0), ("send_batch_size", 100_001), ("send_batch_size", "'50'"),
                     ("send_batch_size", 2.5), ("max_send_batches", 0), ("max_send_batches", 1025),
                     ("max_send_batches", "true")]:
        message = config_error(tmp_path, f"{key}: {bad}\n" + ONE_SOURCE)
        assert key in message, (key, bad, message)

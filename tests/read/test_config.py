"""The lead-source configuration (config.py): the shipped files, written ones, and their limits."""
from __future__ import annotations

import textwrap
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lead_sync.read import config as config_module
from lead_sync.read.config import DEFAULT_SOURCES_FILE, SOURCES_ENV, ConfigError, load_config

SOURCES_DIR = Path(__file__).resolve().parents[2] / "include" / "sources"


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

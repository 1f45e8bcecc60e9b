"""Mapping rules (contract section 4): source rows as the warehouse returns them, to lead events.

Frames are built the way sources.read_source builds them (dtype=object, values as the
driver returned them) unless a test is about another dtype on purpose. Payloads are
compared as whole dicts, so an extra, missing or null field fails the test.
"""
from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from lead_sync.mapping import rows as mapping
from lead_sync.read.config import SourceConfig
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED, LeadEvent
from lead_sync.mapping.rows import (
    InvalidValue,
    SourceShapeError,
    event_key,
    first_per_key,
    map_frame,
    payload_digest,
    redact,
)
from lead_sync.read.partition import Partition

UTC = timezone.utc
DAY = date(2026, 11, 27)
PART = Partition(DAY, ZoneInfo("UTC"))
SIGNUPS = SourceConfig(name="signups", kind="signup", sql="signups.sql", event_name="signup_started")
VERIFICATIONS = SourceConfig(name="verifications", kind="verification", sql="verifications.sql")
SIGNUP_COLS = ["customer_external_id", "click_id", "customer_name", "customer_email", "customer_avatar",
               "requires_verification", "event_time"]
VERIFICATION_COLS = ["customer_external_id", "event_name", "event_time"]
T0 = datetime(2026, 11, 27, 8, 0)


def signup(**values) -> dict:
    row = {"customer_external_id": 42, "click_id": "clk_1", "customer_name": None, "customer_email": None,
           "customer_avatar": None, "requires_verification": False, "event_time": T0}
    row.update(values)
    return row


def verification(**values) -> dict:
    row = {"customer_external_id": "42", "event_name": "email_verified", "event_time": T0}
    row.update(values)
    return row


def frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """As read_source returns it: one object column per SQL column."""
    return pd.DataFrame([[r.get(c) for c in columns] for r in rows], columns=columns, dtype=object)


def map_signups(*rows: dict, partition: Partition = PART) -> list[LeadEvent]:
    return map_frame(SIGNUPS, frame(list(rows), SIGNUP_COLS), partition)


def map_verifications(*rows: dict, partition: Partition = PART) -> list[LeadEvent]:
    return map_frame(VERIFICATIONS, frame(list(rows), VERIFICATION_COLS), partition)


def one(events: list[LeadEvent]) -> LeadEvent:
    assert len(events) == 1, events
    return events[0]


def plain(customer: str = "42", **extra) -> dict:
    """The non-deferred event 1 body for the default signup row."""
    return {"eventName": "signup_started", "customerExternalId": customer, "clickId": "clk_1",
            "timestamp": "2026-11-27T08:00:00Z", **extra}


# --- customerExternalId ----------------------------------------------------------------

@pytest.mark.parametrize("value", [
    42,
    np.int64(42),
    np.int32(42),
    np.uint16(42),
    42.0,
    np.float64(42.0),
    np.float32(42.0),
    Decimal("42"),
    Decimal("42.000"),
    Decimal("4.2E+1"),
    "42",
    "  42\t",
    "\n42 ",
])
def test_customer_id_renders_as_integer_text(value):
    event = one(map_signups(signup(customer_external_id=value)))
    assert event.payload == plain("42")
    assert event.customer_external_id == "42"
    assert event.event_key == event_key("42", "signup_started")
    assert event.status == PENDING


@pytest.mark.parametrize("value, expected", [
    ("042", "042"),  # text is kept as text: leading zeros are part of the id
    (" cus_0042 ", "cus_0042"),
    ("a b", "a b"),
    (0, "0"),
    (-7, "-7"),
    (-0.0, "0"),
    (2**63 - 1, "9223372036854775807"),  # BIGINT max, exact
    (np.int64(2**63 - 1), "9223372036854775807"),
    (Decimal("12345678901234567890123"), "12345678901234567890123"),  # NUMERIC beyond int64, exact
    (1e20, "100000000000000000000"),
    ("顧客-42 🚀", "顧客-42 🚀"),
])
def test_customer_id_other_values(value, expected):
    event = one(map_signups(signup(customer_external_id=value)))
    assert event.payload["customerExternalId"] == expected
    assert event.customer_external_id == expected


def test_customer_id_from_nullable_integer_column_read_as_float():
    # A driver or a default-dtype frame turns a nullable integer column into float64 with NaN.
    data = pd.DataFrame({"customer_external_id": [42, None, 7],
                         "click_id": ["a", "b", "c"],
                         "event_time": [T0, T0, T0]})
    assert data["customer_external_id"].dtype == np.float64
    events = map_frame(SIGNUPS, data, PART)
    assert [(e.status, e.customer_external_id, e.reason) for e in events] == [
        (PENDING, "42", None), (SKIPPED, None, "no customer id"), (PENDING, "7", None)]
    assert events[0].payload == {"eventName": "signup_started", "customerExternalId": "42", "clickId": "a",
                                 "timestamp": "2026-11-27T08:00:00Z"}


def test_customer_id_from_pandas_nullable_integer_dtype():
    data = pd.DataFrame({"customer_external_id": pd.array([42, None], dtype="Int64"),
                         "click_id": ["a", "b"], "event_time": [T0, T0]})
    events = map_frame(SIGNUPS, data, PART)
    assert [(e.status, e.customer_external_id, e.reason) for e in events] == [
        (PENDING, "42", None), (SKIPPED, None, "no customer id")]


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_boolean_customer_id_is_skipped(value):
    event = one(map_signups(signup(customer_external_id=value)))
    assert event.status == SKIPPED
    assert event.payload is None
    assert event.reason == "customer id is a boolean, not an identifier"
    assert event.customer_external_id is None
    assert event.event_key.startswith("row_")


@pytest.mark.parametrize("value", [None, float("nan"), np.nan, np.float64("nan"), pd.NA, pd.NaT])
def test_missing_customer_id_is_skipped(value):
    event = one(map_signups(signup(customer_external_id=value)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, "no customer id", None)
    assert event.customer_external_id is None and event.event_name is None
    assert event.tracking == NON_DEFERRED
    assert event.event_time == T0.replace(tzinfo=UTC)
    assert event.event_key.startswith("row_")


@pytest.mark.parametrize("value, reason", [
    ("", "customer id is empty"),
    ("   ", "customer id is empty"),
    ("x" * 256, "customer id is longer than 255 characters"),
    ("4\x002", "customer id contains control characters"),
    ("42\n43", "customer id contains control characters"),
    ("\ud800", "customer id contains control characters"),
    (float("inf"), "customer id is not a finite number"),
    (Decimal("NaN"), "customer id is not a finite number"),
    (b"42", "customer id has unsupported type bytes"),
    # A NUMERIC column or a float can hold these; the API takes at most 255 characters.
    pytest.param(10**300, "customer id is longer than 255 characters", id="int-301-digits"),
    pytest.param(10**5000, "customer id is longer than 255 characters", id="int-beyond-str-limit"),
    pytest.param(1e300, "customer id is longer than 255 characters", id="float-1e300"),
    pytest.param(1e-300, "customer id is longer than 255 characters", id="float-1e-300"),
    pytest.param(Decimal("1E+300"), "customer id is longer than 255 characters", id="decimal-1e300"),
    pytest.param(Decimal("1E+999999999"), "customer id is longer than 255 characters", id="decimal-huge-exponent"),
    pytest.param(Decimal("1E-999999999"), "customer id is longer than 255 characters", id="decimal-tiny-exponent"),
])
def test_unusable_customer_id_is_skipped(value, reason):
    event = one(map_signups(signup(customer_external_id=value)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, reason, None)


def test_id_text_limits():
    assert mapping.id_text("x" * 255, "id") == "x" * 255
    assert mapping.id_text(int("9" * 255), "id") == "9" * 255
    with pytest.raises(InvalidValue, match="longer than 255"):
        mapping.id_text(int("9" * 256), "id")
    assert mapping.id_text(42.5, "id") == "42.5"
    assert mapping.id_text(Decimal("42.50"), "id") == "42.5"
    assert mapping.id_text(Decimal("-0.050"), "id") == "-0.05"
    assert mapping.id_text(Decimal("0E+7"), "id") == "0"
    # Never rounded to the decimal context's 28 digits.
    assert mapping.id_text(Decimal("12345678901234567890123456789.5"), "id") == "12345678901234567890123456789.5"
    assert mapping.id_text(Decimal("1234567890123456789012345678901"), "id") == "1234567890123456789012345678901"


def test_verification_carries_exactly_the_signup_id():
    # Different column types on each side, same customer: one string on the wire.
    first = one(map_signups(signup(customer_external_id=np.int64(42), requires_verification=True)))
    second = one(map_verifications(verification(customer_external_id=" 42 ")))
    third = one(map_verifications(verification(customer_external_id=42.0, event_name="phone_verified")))
    assert first.payload["customerExternalId"] == second.payload["customerExternalId"] == "42"
    assert third.payload["customerExternalId"] == "42"
    assert first.customer_external_id == second.customer_external_id == third.customer_external_id


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
    assert event.event_time == datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


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
    event = one(map_frame(booked, frame([signup()], SIGNUP_COLS), PART))
    assert event.payload == {"eventName": "demo_booked", "customerExternalId": "42", "clickId": "clk_1",
                             "timestamp": "2026-11-27T08:00:00Z"}
    assert event.event_key == event_key("42", "demo_booked") != event_key("42", "signup_started")
    assert event.source == "demo_bookings"


def test_signup_source_may_omit_optional_columns():
    # demo_bookings.sql returns no avatar; a minimal source returns only the required columns.
    data = frame([signup()], ["customer_external_id", "click_id", "event_time"])
    assert one(map_frame(SIGNUPS, data, PART)).payload == plain()


@pytest.mark.parametrize("flag", [True, np.bool_(True), 1, np.int64(1), 1.0, "t", "T", "true", "TRUE",
                                  " True ", "1", "yes", "y"])
def test_requires_verification_true_values(flag):
    event = one(map_signups(signup(requires_verification=flag)))
    assert event.tracking == DEFERRED_START
    assert event.payload == plain(mode="deferred") | {}  # same keys as plain plus mode
    assert event.payload["mode"] == "deferred"


@pytest.mark.parametrize("flag", [False, np.bool_(False), 0, np.int64(0), 0.0, "f", "false", "FALSE", "0", "no",
                                  "n", "", None, float("nan"), pd.NA])
def test_requires_verification_false_values(flag):
    event = one(map_signups(signup(requires_verification=flag)))
    assert event.tracking == NON_DEFERRED
    assert event.payload == plain()
    assert "mode" not in event.payload


def test_requires_verification_from_a_numeric_column():
    assert one(map_signups(signup(requires_verification=Decimal("1")))).tracking == DEFERRED_START
    assert one(map_signups(signup(requires_verification=Decimal("0.0")))).tracking == NON_DEFERRED


@pytest.mark.parametrize("flag", ["maybe", "2", 2, -1, 0.5, "tru", b"1", "yes please", Decimal("2"),
                                  Decimal("NaN"), Decimal("sNaN"), "t" * 100])
def test_requires_verification_garbage_is_skipped(flag):
    event = one(map_signups(signup(requires_verification=flag)))
    assert event.status == SKIPPED
    assert event.payload is None
    assert event.reason.startswith("requires_verification is not a boolean: ")
    assert repr(str(flag)[:40]) in event.reason
    assert event.event_time == T0.replace(tzinfo=UTC)


def test_huge_values_in_a_skipped_row_do_not_break_its_audit():
    event = one(map_signups(signup(requires_verification=10**5000, customer_name=10**5000)))
    assert event.status == SKIPPED
    assert event.reason == "requires_verification is not a boolean: '<int too large to show>'"
    assert event.event_key.startswith("row_")
    other = one(map_signups(signup(requires_verification=10**5000 + 1, customer_name=10**5000)))
    assert other.event_key != event.event_key


# --- event 2 ---------------------------------------------------------------------------

def test_verification_payload():
    event = one(map_verifications(verification(customer_external_id=" 2 ", event_name="email_verified",
                                               event_time=datetime(2026, 11, 27, 9, 5, tzinfo=UTC))))
    assert event.payload == {"eventName": "email_verified", "customerExternalId": "2",
                             "timestamp": "2026-11-27T09:05:00Z"}
    assert (event.tracking, event.status, event.event_name) == (DEFERRED_CONFIRM, PENDING, "email_verified")
    assert event.event_key == event_key("2", "email_verified")


def test_verification_ignores_click_and_mode_columns():
    cols = VERIFICATION_COLS + ["click_id", "mode", "requires_verification", "customer_email"]
    row = verification(click_id="c9", mode="deferred", requires_verification=True, customer_email="a@example.com")
    event = one(map_frame(VERIFICATIONS, frame([row], cols), PART))
    assert event.payload == {"eventName": "email_verified", "customerExternalId": "42",
                             "timestamp": "2026-11-27T08:00:00Z"}


def test_verification_event_name_is_trimmed_text():
    event = one(map_verifications(verification(event_name="  phone_verified ")))
    assert event.payload["eventName"] == "phone_verified" == event.event_name


@pytest.mark.parametrize("name, reason", [
    (None, "no event_name"),
    (float("nan"), "no event_name"),
    ("", "event_name is empty"),
    (" ", "event_name is empty"),
    (5, "event_name is not text"),
    (True, "event_name is not text"),
    ("x" * 256, "event_name is longer than 255 characters"),
    ("email\x07verified", "event_name contains control characters"),
])
def test_verification_without_usable_event_name_is_skipped(name, reason):
    event = one(map_verifications(verification(event_name=name)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, reason, None)
    assert event.tracking == DEFERRED_CONFIRM
    assert event.event_key.startswith("row_")


def test_verification_without_customer_id_is_skipped():
    event = one(map_verifications(verification(customer_external_id=None)))
    assert (event.status, event.reason, event.tracking) == (SKIPPED, "no customer id", DEFERRED_CONFIRM)


# --- timestamp -------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (datetime(2026, 11, 27, 8, 0), "2026-11-27T08:00:00Z"),  # naive means UTC
    (datetime(2026, 11, 27, 8, 0, tzinfo=UTC), "2026-11-27T08:00:00Z"),
    (datetime(2026, 11, 27, 10, 30, tzinfo=timezone(timedelta(hours=2, minutes=30))), "2026-11-27T08:00:00Z"),
    (datetime(2026, 11, 27, 3, 0, tzinfo=ZoneInfo("America/New_York")), "2026-11-27T08:00:00Z"),
    (datetime(2026, 11, 27, 8, 0, 0, 123456), "2026-11-27T08:00:00.123456Z"),
    (datetime(2026, 11, 27, 8, 0, 0, 500000), "2026-11-27T08:00:00.500000Z"),
    (datetime(2026, 11, 27, 8, 0, 0, 1), "2026-11-27T08:00:00.000001Z"),
    (datetime(2026, 11, 27, 23, 59, 59, 999999), "2026-11-27T23:59:59.999999Z"),
    (pd.Timestamp("2026-11-27 08:00:00"), "2026-11-27T08:00:00Z"),
    (pd.Timestamp("2026-11-27 09:00:00.25", tz="Europe/Berlin"), "2026-11-27T08:00:00.250000Z"),
    (pd.Timestamp("2026-11-27 08:00:00.000000500"), "2026-11-27T08:00:00Z"),  # nanoseconds are not sent
    (np.datetime64("2026-11-27T08:00:00"), "2026-11-27T08:00:00Z"),
    (date(2026, 11, 27), "2026-11-27T00:00:00Z"),
    # SQLite hands back text
    ("2026-11-27 08:00:00", "2026-11-27T08:00:00Z"),
    ("2026-11-27T08:00:00", "2026-11-27T08:00:00Z"),
    ("2026-11-27 08:00:00.000000", "2026-11-27T08:00:00Z"),
    ("2026-11-27 08:00:00.123", "2026-11-27T08:00:00.123000Z"),
    ("2026-11-27T08:00:00Z", "2026-11-27T08:00:00Z"),
    ("2026-11-27T08:00:00z", "2026-11-27T08:00:00Z"),
    ("2026-11-27 13:45:00+05:45", "2026-11-27T08:00:00Z"),
    ("2026-11-27T03:00:00-05:00", "2026-11-27T08:00:00Z"),
    (" 2026-11-27 08:00:00 ", "2026-11-27T08:00:00Z"),
    ("2026-11-27", "2026-11-27T00:00:00Z"),
])
def test_timestamp_rendering(value, expected):
    event = one(map_signups(signup(event_time=value)))
    assert event.payload["timestamp"] == expected
    assert event.event_time.tzinfo is not None
    assert mapping.iso_utc(event.event_time) == expected


def test_timestamp_of_event_two():
    event = one(map_verifications(verification(event_time="2026-11-27 08:00:00.5+00:00")))
    assert event.payload["timestamp"] == "2026-11-27T08:00:00.500000Z"


@pytest.mark.parametrize("value, reason", [
    (None, "no event time"),
    (float("nan"), "no event time"),
    (pd.NaT, "no event time"),
    ("yesterday", "event time is not a timestamp: 'yesterday'"),
    ("2026-11-27 25:00:00", "event time is not a timestamp: '2026-11-27 25:00:00'"),
    ("", "event time is not a timestamp: ''"),
    (1795766400, "event time has unsupported type int"),
    (b"2026-11-27", "event time has unsupported type bytes"),
])
def test_unreadable_event_time_is_skipped_and_kept(value, reason):
    # The SQL returned it for this partition: it is audited here rather than lost.
    event = one(map_signups(signup(event_time=value)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, reason, None)
    assert event.partition_date == DAY
    assert event.event_time is None
    assert event.event_key.startswith("row_")
    again = one(map_signups(signup(event_time=value)))
    assert again.event_key == event.event_key  # the same row keeps its key across runs


def test_unreadable_time_reason_is_bounded_and_escaped():
    event = one(map_signups(signup(event_time="2026\x00" + "z" * 500)))
    assert event.status == SKIPPED
    assert "\x00" not in event.reason and len(event.reason) < 100


# --- absent and invalid optional values ------------------------------------------------

@pytest.mark.parametrize("absent", [None, float("nan"), pd.NA, pd.NaT, np.datetime64("NaT")])
def test_absent_values_are_omitted_never_null(absent):
    event = one(map_signups(signup(customer_name=absent, customer_email=absent, customer_avatar=absent,
                                   requires_verification=absent)))
    assert event.payload == plain()
    assert event.notes == []
    assert None not in event.payload.values()


def test_blank_name_is_omitted_without_note():
    event = one(map_signups(signup(customer_name="   ")))
    assert event.payload == plain()
    assert event.notes == []


def test_enrichment_text_is_trimmed():
    event = one(map_signups(signup(customer_name="  Zoë Ångström ", customer_email=" zoe@example.org ",
                                   customer_avatar=" http://cdn.example.org/z.png ")))
    assert event.payload == plain(customerName="Zoë Ångström", customerEmail="zoe@example.org",
                                  customerAvatar="http://cdn.example.org/z.png")


@pytest.mark.parametrize("column, value, note", [
    ("customer_email", "not-an-email", "customerEmail left out: customerEmail is not an email address"),
    ("customer_email", "ann@", "customerEmail left out: customerEmail is not an email address"),
    ("customer_email", "ann@example", "customerEmail left out: customerEmail is not an email address"),
    ("customer_email", "a b@example.com", "customerEmail left out: customerEmail is not an email address"),
    ("customer_email", "a@b@example.com", "customerEmail left out: customerEmail is not an email address"),
    ("customer_email", "", "customerEmail left out: customerEmail is empty"),
    ("customer_email", 42, "customerEmail left out: customerEmail is not text"),
    ("customer_email", "ann\n@example.com", "customerEmail left out: customerEmail contains control characters"),
    ("customer_avatar", "ftp://img.example.com/a.png", "customerAvatar left out: customerAvatar is not an http(s) URL"),
    ("customer_avatar", "javascript:alert(1)", "customerAvatar left out: customerAvatar is not an http(s) URL"),
    ("customer_avatar", "img.example.com/a.png", "customerAvatar left out: customerAvatar is not an http(s) URL"),
    ("customer_avatar", "https://", "customerAvatar left out: customerAvatar is not an http(s) URL"),
    ("customer_avatar", "https://[::1", "customerAvatar left out: customerAvatar is not an http(s) URL"),
    ("customer_avatar", "https://img.example.com/a b.png",
     "customerAvatar left out: customerAvatar is not an http(s) URL"),
    ("customer_avatar", 7, "customerAvatar left out: customerAvatar is not text"),
    ("customer_avatar", "https://x.example/" + "a" * 2100,
     "customerAvatar left out: customerAvatar is longer than 2048 characters"),
    ("customer_name", 5, "customerName left out: customerName is not text"),
    ("customer_name", b"Ann", "customerName left out: customerName is not text"),
    ("customer_name", "A" * 256, "customerName left out: customerName is longer than 255 characters"),
    ("customer_name", "Ann\x1b[31m", "customerName left out: customerName contains control characters"),
    ("customer_name", "Ann\udc80", "customerName left out: customerName contains control characters"),
])
def test_invalid_optional_field_is_left_out_with_note(column, value, note):
    good = {"customer_name": "Ann", "customer_email": "ann@example.com",
            "customer_avatar": "https://img.example.com/a.png"}
    event = one(map_signups(signup(**{**good, column: value})))
    expected = plain(customerName="Ann", customerEmail="ann@example.com",
                     customerAvatar="https://img.example.com/a.png")
    field = {"customer_name": "customerName", "customer_email": "customerEmail",
             "customer_avatar": "customerAvatar"}[column]
    del expected[field]
    assert event.status == PENDING
    assert event.payload == expected
    assert event.notes == [note]


def test_all_optional_fields_invalid_notes_each():
    event = one(map_signups(signup(customer_name=3, customer_email="nope", customer_avatar="mailto:x@y.z")))
    assert event.payload == plain()
    assert [n.split(":")[0] for n in event.notes] == [
        "customerName left out", "customerEmail left out", "customerAvatar left out"]


# --- skips -----------------------------------------------------------------------------

@pytest.mark.parametrize("click", [None, float("nan"), pd.NA])
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
    assert one(map_signups(signup(click_id=np.int64(99)))).payload["clickId"] == "99"


def test_missing_required_column_is_a_source_shape_error():
    data = frame([signup()], ["customer_external_id", "customer_name", "event_time"])
    with pytest.raises(SourceShapeError, match="source 'signups': its SQL must return column\\(s\\) click_id"):
        map_frame(SIGNUPS, data, PART)
    with pytest.raises(SourceShapeError, match="event_name"):
        map_frame(VERIFICATIONS, frame([verification()], ["customer_external_id", "event_time"]), PART)


def test_empty_frame_maps_to_nothing():
    assert map_frame(SIGNUPS, frame([], SIGNUP_COLS), PART) == []
    assert map_frame(VERIFICATIONS, frame([], VERIFICATION_COLS), PART) == []


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


# --- keys and repeats ------------------------------------------------------------------

def test_event_key_is_deterministic():
    key = event_key("42", "signup_started")
    expected = "ev_" + hashlib.sha256("42\x1fsignup_started".encode()).hexdigest()[:40]
    assert key == expected == event_key("42", "signup_started")
    assert len(key) <= 64
    assert event_key("42", "email_verified") != key
    assert event_key("420", "signup_started") != key
    # The separator keeps (customer, name) pairs apart when concatenations agree.
    assert event_key("4", "2signup_started") != event_key("42", "signup_started")


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


# --- redaction and digests -------------------------------------------------------------

def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def test_redact_hashes_name_and_email():
    payload = plain(customerName="Ann Smith", customerEmail="Ann.Smith@Example.com",
                    customerAvatar="https://img.cdn.test/a.png")
    original = dict(payload)
    redacted = redact(payload)
    assert redacted == plain(customerName=_sha("ann smith"), customerEmail=_sha("ann.smith@example.com"),
                             customerAvatar="https://img.cdn.test/a.png")
    assert payload == original  # not modified in place
    text = json.dumps(redacted)
    for raw in ("Ann", "ann", "Smith", "smith", "Example.com", "example.com"):
        assert raw not in text
    assert redact(None) is None
    assert redact(plain()) == plain()


def test_redacted_mapped_payload_keeps_nothing_raw():
    event = one(map_signups(signup(customer_name="Émilie Zola", customer_email="emilie.zola@example.fr")))
    text = json.dumps(redact(event.payload), ensure_ascii=False)
    assert "Émilie" not in text and "Zola" not in text and "emilie" not in text
    assert json.loads(text)["customerEmail"] == _sha("emilie.zola@example.fr")


def test_payload_digest():
    a = plain()
    assert payload_digest(a) == payload_digest(dict(reversed(list(a.items()))))  # key order does not matter
    assert payload_digest(a) == hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()
    assert payload_digest(a) != payload_digest(plain(customerName="Ann"))
    assert payload_digest(a) != payload_digest(plain(timestamp="2026-11-27T08:00:01Z"))
    assert payload_digest(a) != payload_digest(plain("43"))
    assert payload_digest(None) is None


def test_digest_follows_the_source_row():
    before = one(map_signups(signup(customer_email="ann@example.com")))
    same = one(map_signups(signup(customer_email="ann@example.com")))
    after = one(map_signups(signup(customer_email="ann@example.org")))
    assert payload_digest(before.payload) == payload_digest(same.payload) != payload_digest(after.payload)
    assert before.event_key == after.event_key


# --- helpers ---------------------------------------------------------------------------

def test_is_absent():
    for value in (None, float("nan"), np.float32("nan"), pd.NA, pd.NaT, np.datetime64("NaT")):
        assert mapping.is_absent(value), value
    for value in (0, 0.0, "", " ", False, "nan", Decimal("0")):
        assert not mapping.is_absent(value), value


def test_check_text():
    assert mapping.check_text("  x y ", "f") == "x y"
    assert mapping.check_text("🙂", "f") == "🙂"
    with pytest.raises(InvalidValue, match="^f is empty$"):
        mapping.check_text(" \t\n ", "f")
    with pytest.raises(InvalidValue, match="^f is longer than 3 characters$"):
        mapping.check_text("abcd", "f", max_len=3)
    with pytest.raises(InvalidValue, match="^f contains control characters$"):
        mapping.check_text("a\x7fb", "f")


def test_utc_moment():
    assert mapping.utc_moment("2026-11-27T08:00:00Z", "t") == datetime(2026, 11, 27, 8, tzinfo=UTC)
    assert mapping.utc_moment(datetime(2026, 11, 27, 8), "t") == datetime(2026, 11, 27, 8, tzinfo=UTC)
    with pytest.raises(InvalidValue, match="^no t$"):
        mapping.utc_moment(None, "t")
    with pytest.raises(InvalidValue, match="^t is not a timestamp"):
        mapping.utc_moment("soon", "t")


def test_as_flag():
    assert mapping.as_flag(None) is False
    assert mapping.as_flag("t") is True and mapping.as_flag(1) is True and mapping.as_flag(0) is False
    with pytest.raises(InvalidValue, match="requires_verification is not a boolean"):
        mapping.as_flag("perhaps")


def test_optional_field_rules():
    assert mapping.email_or_none(None) is None
    assert mapping.email_or_none(" a@example.com ") == "a@example.com"
    assert mapping.avatar_or_none("HTTPS://img.example.com/a.png") == "HTTPS://img.example.com/a.png"
    assert mapping.avatar_or_none(float("nan")) is None
    assert mapping.name_or_none(" ") is None
    assert mapping.name_or_none(" Ann ") == "Ann"
    with pytest.raises(InvalidValue):
        mapping.avatar_or_none("//img.example.com/a.png")
    with pytest.raises(InvalidValue):
        mapping.email_or_none("@example.com")


def test_row_key_depends_on_source_and_contents():
    row = {"customer_external_id": None, "event_time": "x"}
    assert mapping.row_key("signups", row) == mapping.row_key("signups", dict(reversed(list(row.items()))))
    assert mapping.row_key("signups", row) != mapping.row_key("demo_bookings", row)
    assert mapping.row_key("signups", row) != mapping.row_key("signups", {**row, "click_id": "c"})
    assert mapping.row_key("signups", row).startswith("row_") and len(mapping.row_key("signups", row)) <= 64

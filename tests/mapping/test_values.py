"""Each source value as the API must see it (contract section 4): ids, event times, the
verification flag and the optional customer fields, through the mapping of whole rows and
value by value.

Values are of the types the warehouse drivers hand back (psycopg2, sqlite3): None, str, int,
float, bool, Decimal, date, datetime, bytes or memoryview, UUID.
"""
from __future__ import annotations

import math
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED
from lead_sync.mapping import values
from lead_sync.mapping.payloads import event_key
from lead_sync.mapping.values import InvalidValue
from tests.support.mapping import DAY, T0, map_signups, map_verifications, one, plain, signup, verification

UTC = timezone.utc


# --- customerExternalId ----------------------------------------------------------------

@pytest.mark.parametrize("value", [
    42,
    42.0,
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
    (Decimal("12345678901234567890123"), "12345678901234567890123"),  # NUMERIC beyond int64, exact
    (1e20, "100000000000000000000"),
    ("顧客-42 🚀", "顧客-42 🚀"),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
])
def test_customer_id_other_values(value, expected):
    event = one(map_signups(signup(customer_external_id=value)))
    assert event.payload["customerExternalId"] == expected
    assert event.customer_external_id == expected


def test_customer_id_from_nullable_integer_column_read_as_float():
    # A float column (or a driver that reads a nullable integer column as one) gives NaN for NULL.
    events = map_signups(signup(customer_external_id=42.0, click_id="a"),
                         signup(customer_external_id=math.nan, click_id="b"),
                         signup(customer_external_id=7.0, click_id="c"))
    assert [(e.status, e.customer_external_id, e.reason) for e in events] == [
        (PENDING, "42", None), (SKIPPED, None, "no customer id"), (PENDING, "7", None)]
    assert events[0].payload == {"eventName": "signup_started", "customerExternalId": "42", "clickId": "a",
                                 "timestamp": "2026-11-27T08:00:00Z"}


@pytest.mark.parametrize("value", [True, False])
def test_boolean_customer_id_is_skipped(value):
    event = one(map_signups(signup(customer_external_id=value)))
    assert event.status == SKIPPED
    assert event.payload is None
    assert event.reason == "customer id is a boolean, not an identifier"
    assert event.customer_external_id is None
    assert event.event_key.startswith("row_")


@pytest.mark.parametrize("value", [None, float("nan"), -math.nan])
def test_missing_customer_id_is_skipped(value):
    event = one(map_signups(signup(customer_external_id=value)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, "no customer id", None)
    assert event.customer_external_id is None and event.event_name is None
    assert event.tracking == NON_DEFERRED
    assert event.event_time == T0.replace(tzinfo=UTC)
    assert event.event_key.startswith("row_")


def test_a_float_nan_is_keyed_as_a_null():
    # NaN is NULL in the row as audited too: the two rows are one row, under one key.
    nan, none = (one(map_signups(signup(customer_external_id=v, customer_name=v))) for v in (math.nan, None))
    assert nan.event_key == none.event_key


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
    (memoryview(b"42"), "customer id has unsupported type memoryview"),  # PostgreSQL bytea
    (timedelta(days=1), "customer id has unsupported type timedelta"),  # PostgreSQL interval
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
    assert values.id_text("x" * 255, "id") == "x" * 255
    assert values.id_text(int("9" * 255), "id") == "9" * 255
    with pytest.raises(InvalidValue, match="longer than 255"):
        values.id_text(int("9" * 256), "id")
    assert values.id_text(42.5, "id") == "42.5"
    assert values.id_text(Decimal("42.50"), "id") == "42.5"
    assert values.id_text(Decimal("-0.050"), "id") == "-0.05"
    assert values.id_text(Decimal("0E+7"), "id") == "0"
    # Never rounded to the decimal context's 28 digits.
    assert values.id_text(Decimal("12345678901234567890123456789.5"), "id") == "12345678901234567890123456789.5"
    assert values.id_text(Decimal("1234567890123456789012345678901"), "id") == "1234567890123456789012345678901"


def test_verification_carries_exactly_the_signup_id():
    # Different column types on each side, same customer: one string on the wire.
    first = one(map_signups(signup(customer_external_id=Decimal("42"), requires_verification=True)))
    second = one(map_verifications(verification(customer_external_id=" 42 ")))
    third = one(map_verifications(verification(customer_external_id=42.0, event_name="phone_verified")))
    assert first.payload["customerExternalId"] == second.payload["customerExternalId"] == "42"
    assert third.payload["customerExternalId"] == "42"
    assert first.customer_external_id == second.customer_external_id == third.customer_external_id


# --- requires_verification -------------------------------------------------------------

@pytest.mark.parametrize("flag", [True, 1, 1.0, "t", "T", "true", "TRUE", " True ", "1", "yes", "y"])
def test_requires_verification_true_values(flag):
    event = one(map_signups(signup(requires_verification=flag)))
    assert event.tracking == DEFERRED_START
    assert event.payload == plain(mode="deferred")


@pytest.mark.parametrize("flag", [False, 0, 0.0, "f", "false", "FALSE", "0", "no", "n", "", None, float("nan")])
def test_requires_verification_false_values(flag):
    event = one(map_signups(signup(requires_verification=flag)))
    assert event.tracking == NON_DEFERRED
    assert event.payload == plain()
    assert "mode" not in event.payload


def test_requires_verification_from_a_numeric_column():
    assert one(map_signups(signup(requires_verification=Decimal("1")))).tracking == DEFERRED_START
    assert one(map_signups(signup(requires_verification=Decimal("0.0")))).tracking == NON_DEFERRED


@pytest.mark.parametrize("flag", ["maybe", "2", 2, -1, 0.5, "tru", b"1", "yes please", Decimal("2"),
                                  Decimal("NaN"), Decimal("sNaN"), "t" * 100, float("inf")])
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


def test_as_flag():
    assert values.as_flag(None) is False
    assert values.as_flag("t") is True and values.as_flag(1) is True and values.as_flag(0) is False
    with pytest.raises(InvalidValue, match="requires_verification is not a boolean"):
        values.as_flag("perhaps")


# --- event_name (event 2) --------------------------------------------------------------

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
    (Decimal("5"), "event_name is not text"),
    ("x" * 256, "event_name is longer than 255 characters"),
    ("email\x07verified", "event_name contains control characters"),
])
def test_verification_without_usable_event_name_is_skipped(name, reason):
    event = one(map_verifications(verification(event_name=name)))
    assert (event.status, event.reason, event.payload) == (SKIPPED, reason, None)
    assert event.tracking == DEFERRED_CONFIRM
    assert event.event_key.startswith("row_")


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
    # The event's time is the instant sent, in UTC.
    assert event.event_time.utcoffset() == timedelta(0)
    assert event.event_time == datetime.fromisoformat(expected.replace("Z", "+00:00"))


def test_timestamp_of_event_two():
    event = one(map_verifications(verification(event_time="2026-11-27 08:00:00.5+00:00")))
    assert event.payload["timestamp"] == "2026-11-27T08:00:00.500000Z"


@pytest.mark.parametrize("value, reason", [
    (None, "no event time"),
    (float("nan"), "no event time"),
    ("yesterday", "event time is not a timestamp: 'yesterday'"),
    ("2026-11-27 25:00:00", "event time is not a timestamp: '2026-11-27 25:00:00'"),
    ("", "event time is not a timestamp: ''"),
    (1795766400, "event time has unsupported type int"),
    (b"2026-11-27", "event time has unsupported type bytes"),
    (Decimal("1795766400"), "event time has unsupported type Decimal"),
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


def test_utc_moment():
    assert values.utc_moment("2026-11-27T08:00:00Z", "t") == datetime(2026, 11, 27, 8, tzinfo=UTC)
    assert values.utc_moment(datetime(2026, 11, 27, 8), "t") == datetime(2026, 11, 27, 8, tzinfo=UTC)
    with pytest.raises(InvalidValue, match="^no t$"):
        values.utc_moment(None, "t")
    with pytest.raises(InvalidValue, match="^t is not a timestamp"):
        values.utc_moment("soon", "t")


def test_event_moment_is_utc_moment_or_its_reason():
    for value in (datetime(2026, 11, 27, 8), datetime(2026, 11, 27, 9, tzinfo=ZoneInfo("Europe/Berlin")),
                  "2026-11-27 08:00:00+05:45", date(2026, 11, 27)):
        assert values.event_moment(value) == values.utc_moment(value, "event time")
    assert values.event_moment(None) == "no event time"
    assert values.event_moment("soon") == "event time is not a timestamp: 'soon'"
    # A moment beyond the last one an aware datetime can hold in UTC.
    far = datetime.max.replace(tzinfo=timezone(-timedelta(hours=1)))
    assert values.event_moment(far).startswith("event time is not a timestamp: ")


# --- absent and invalid optional values ------------------------------------------------

@pytest.mark.parametrize("absent", [None, float("nan")])
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
    ("customer_email", "a" * 310 + "@example.com",
     "customerEmail left out: customerEmail is longer than 320 characters"),
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
    ("customer_name", Decimal("NaN"), "customerName left out: customerName is not text"),
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


def test_optional_field_rules():
    assert values.email_or_none(None) is None
    assert values.email_or_none(" a@example.com ") == "a@example.com"
    assert values.avatar_or_none("HTTPS://img.example.com/a.png") == "HTTPS://img.example.com/a.png"
    assert values.avatar_or_none(float("nan")) is None
    assert values.name_or_none(" ") is None
    assert values.name_or_none(" Ann ") == "Ann"
    with pytest.raises(InvalidValue):
        values.avatar_or_none("//img.example.com/a.png")
    with pytest.raises(InvalidValue):
        values.email_or_none("@example.com")


# --- the checks every text goes through ---------------------------------------------------

def test_is_absent():
    for value in (None, float("nan"), -math.nan):
        assert values.is_absent(value), value
    for value in (0, 0.0, "", " ", False, "nan", Decimal("0"), Decimal("NaN"), float("inf")):
        assert not values.is_absent(value), value


def test_check_text():
    assert values.check_text("  x y ", "f") == "x y"
    assert values.check_text("🙂", "f") == "🙂"
    with pytest.raises(InvalidValue, match="^f is empty$"):
        values.check_text(" \t\n ", "f")
    with pytest.raises(InvalidValue, match="^f is longer than 3 characters$"):
        values.check_text("abcd", "f", max_len=3)
    with pytest.raises(InvalidValue, match="^f contains control characters$"):
        values.check_text("a\x7fb", "f")

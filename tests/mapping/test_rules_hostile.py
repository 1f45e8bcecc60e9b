"""Hostile source rows through the core pipeline, as properties.

Rows with nulls anywhere, huge strings, control characters, emoji, numeric ids as floats,
odd and naive timestamps, text that is not a timestamp, repeats and wrong types are
stored in a real warehouse (SQLite, whose untyped columns keep any value, and
PostgreSQL with permissive column types), then extract_and_map and send_open_events run
against the in-process sandbox. Whatever the rows:

- the run does not raise;
- every row of the partition (event time in [D, D+1) UTC, naive = UTC) is in
  lead_event_deliveries with a status, skipped ones with a reason; rows whose time cannot
  be read but that the SQL returned are audited too; repeats of a customer and event name
  share one row, and nothing else is recorded;
- the sandbox rejects nothing, and every body it received is valid for the vendor's own
  model (cutmeshort.models.lead_payload.LeadPayload).

The expected outcome of each row is worked out here from the contract, independently of
lead_sync.mapping.

Lone surrogates cannot reach either warehouse through its driver (sqlite3 and psycopg2
encode text as UTF-8, and PostgreSQL refuses NUL as well): the mapping-only property at
the end feeds them, and test_text_that_is_not_utf8_in_sqlite_is_audited_not_fatal covers
the bytes SQLite can hold anyway.
"""
from __future__ import annotations

import json
import math
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cutmeshort.models.lead_payload import LeadPayload
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine

from cutmeshort_sandbox import SandboxServer
from cutmeshort_sandbox.validation import validate_lead
from lead_sync import stages
from lead_sync.db.stores import ensure_stores
from lead_sync.db.schema import deliveries
from lead_sync.db.schema import drop_schema
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.read.config import DEFAULT_SOURCES_FILE, SourceConfig, load_config
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED, STATUSES
from lead_sync.mapping.days import first_per_key, map_rows
from lead_sync.mapping.payloads import redact
from lead_sync.read.partition import Partition
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from tests.support import TOKEN

UTC = timezone.utc
DAY = date(2026, 11, 27)
PARTITION = Partition(DAY, ZoneInfo("UTC"))
START, END = PARTITION.start, PARTITION.end  # aware UTC
WINDOW = PARTITION.sql_window()
WINDOW_START, WINDOW_END = WINDOW["window_start"], WINDOW["window_end"]
SIGNUP_EVENT = "signup_started"
POLICY = RetryPolicy(max_attempts=2, backoff_base_seconds=0, backoff_max_seconds=0)
MAX_ID = 255

SIGNUP_COLUMNS = ("customer_external_id", "click_id", "customer_name", "customer_email", "customer_avatar",
                  "requires_verification", "signed_up_at")
VERIFICATION_COLUMNS = ("customer_external_id", "event_name", "verified_at")

SQLITE_DDL = (
    # No declared type: SQLite keeps every value exactly as given (int, float, text, blob).
    "CREATE TABLE signups (gen_id INTEGER, customer_external_id, click_id, customer_name, customer_email, "
    "customer_avatar, requires_verification, signed_up_at)",
    "CREATE TABLE verifications (gen_id INTEGER, customer_external_id, event_name, verified_at)",
)
PG_DDL = (
    "DROP TABLE IF EXISTS signups",
    "DROP TABLE IF EXISTS verifications",
    # Permissive types: NUMERIC ids on one side, text on the other; text flags; a real
    # naive timestamp for signups and free text (byte order) for verification times.
    "CREATE TABLE signups (gen_id integer, customer_external_id numeric, click_id text, customer_name text, "
    "customer_email text, customer_avatar text, requires_verification text, signed_up_at timestamp)",
    'CREATE TABLE verifications (gen_id integer, customer_external_id text, event_name text, '
    'verified_at text COLLATE "C")',
)


# --- generated rows --------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    values: tuple  # in SIGNUP_COLUMNS / VERIFICATION_COLUMNS order
    moment: datetime | None  # the UTC instant the time value stands for, when it is a timestamp
    time_kind: str  # "moment" | "garbage" (looks dated, is not a timestamp) | "other"


def _clean(value: Any, pg: bool) -> Any:
    # PostgreSQL text cannot hold NUL; everything else goes in as generated.
    return value.replace("\x00", "") if pg and isinstance(value, str) else value


CHARS = st.characters(exclude_categories=("Cs",))  # control characters, emoji, any script
short_text = st.text(CHARS, max_size=12)
huge_text = st.builds(lambda chunk, n: chunk * n, st.text(CHARS, min_size=1, max_size=3), st.integers(90, 4000))
odd_words = st.sampled_from([
    "Ann", "  Zoë Ångström ", "🦄🚀", "\u202eevil", "a\x00b", "tab\there", "line\nbreak", "\x1b[31mred",
    "", "   ", "null", "None", "NaN", "\u2028", "\ufeffbom", "x" * 256, "ǅ" * 255,
])
any_text = st.one_of(short_text, huge_text, odd_words)
small = st.integers(0, 4)  # few distinct customers, so that rows repeat and match up
ints = st.integers(-2**63, 2**63 - 1)  # what SQLite can store
odd_numbers = st.sampled_from([2**63 - 1, -2**63, 1e20, 1e300, 1.5, 0.1, -0.0, float("nan"), float("inf"),
                               -1e-300, 7.25])


def mostly(plausible: st.SearchStrategy, hostile: st.SearchStrategy, pg: bool, mode: str) -> st.SearchStrategy:
    """A field's values by mode: "tame" plausible only, "hostile" hostile only, "mixed" plausible
    about three times in four (so that rows also get delivered and matched up)."""
    if mode == "tame":
        chosen = plausible
    elif mode == "hostile":
        chosen = hostile
    else:
        chosen = st.one_of(plausible, plausible, plausible, hostile)
    return chosen.map(lambda v: _clean(v, pg))


def customer_ids(pg: bool, numeric_column: bool = False, mode: str = "mixed") -> st.SearchStrategy:
    if numeric_column:  # PostgreSQL NUMERIC
        return mostly(
            st.one_of(small, small.map(float), small.map(Decimal)),
            st.one_of(odd_numbers, st.none(), st.sampled_from([Decimal("3.000"), Decimal("1E+300"), 10**300,
                                                                Decimal("12345678901234567890123456789012")])),
            pg, mode)
    plausible = st.one_of(small, small.map(str), small.map(lambda n: f"  {n}\t"))
    if not pg:
        plausible = st.one_of(plausible, small.map(float))  # a float column in SQLite stays a float
    hostile = [odd_numbers, odd_numbers, any_text,
               st.sampled_from([None, True, False, "01", "", " ", "\t", "4\x002", "1\n", "🙂", "x" * 256])]
    if not pg:
        hostile.append(st.binary(max_size=4))
    return mostly(plausible, st.one_of(*hostile), pg, mode)


def clicks(pg: bool, mode: str = "mixed") -> st.SearchStrategy:
    hostile = st.one_of(st.sampled_from([None, None, "", "  ", 1234, 12.0]), customer_ids(pg, mode="hostile"))
    return mostly(st.sampled_from(["c1", "c2", " c3 ", "c4"]), hostile, pg, mode)


def names(pg: bool, mode: str = "mixed") -> st.SearchStrategy:
    hostile = [any_text, ints, st.floats()]
    if not pg:
        hostile.append(st.binary(max_size=4))
    return mostly(st.sampled_from([None, "Ann", " Zoë Ångström ", "李小龍"]), st.one_of(*hostile), pg, mode)


def emails(pg: bool, mode: str = "mixed") -> st.SearchStrategy:
    return mostly(
        st.sampled_from([None, "ann@example.com", " bob@example.org "]),
        st.one_of(
            st.sampled_from(["zoë@exämple.com", "no-at-sign", "a@b", "a@b.c", "x@[127.0.0.1]", '"q@x"@example.com',
                             "a b@example.com", "ann@example.com\n", "ann@@example.com", "ann\u2028@example.com",
                             "@example.com", "ann@localhost", "ann@" + "d" * 300 + ".com", "ann@exa_mple.com",
                             "ann@-example.com", "ann.@example.com", "ann@example.com."]),
            any_text, ints),
        pg, mode)


def avatars(pg: bool, mode: str = "mixed") -> st.SearchStrategy:
    return mostly(
        st.sampled_from([None, "https://img.example.com/a.png", "http://x.test/a"]),
        st.one_of(
            st.sampled_from(["ftp://x/y", "HTTPS://IMG.EXAMPLE.COM/A.PNG", "http://[::1", "https://",
                             "javascript:alert(1)", "https://ex ample.com/", "https://x.example/" + "a" * 3000,
                             "//img.example.com/a.png", "https://user:pw@img.example.com:99999/a.png",
                             "https://🦄.example/🚀.png", "http://[::1]/a.png", "https://exa\u2028mple.com/"]),
            any_text, ints),
        pg, mode)


FLAG_WORDS_TRUE = {"true", "t", "yes", "y", "1"}
FLAG_WORDS_FALSE = {"false", "f", "no", "n", "0", ""}


def flags(pg: bool, mode: str = "mixed") -> st.SearchStrategy:
    return mostly(
        st.sampled_from([None, True, False, 0, 1, "t", "f", "true", "false", "TRUE", " True ", "1", "0"]),
        st.one_of(st.sampled_from(["maybe", "2", 2, -1, 0.5, 0.0, 1.0, "tru", "yes please", float("nan")]),
                  short_text.map(lambda s: s + "?" if s.strip().lower() in FLAG_WORDS_TRUE | FLAG_WORDS_FALSE else s)),
        pg, mode)


def event_names(pg: bool, mode: str = "mixed") -> st.SearchStrategy:
    # "signup_started" is left out: a verification of that name would be, by the contract,
    # a repeat of the signup event itself (one key per customer and event name).
    return mostly(
        st.sampled_from(["email_verified", " email_verified ", "phone_verified"]),
        st.one_of(
            st.sampled_from(["✅ verified", "", "  ", None, 5, "x" * 256, "a\x07b", "e\x00v", "ph\u200bone_verified"]),
            short_text.filter(lambda s: s.strip() != SIGNUP_EVENT),
            ints),
        pg, mode)


OFFSETS = [timedelta(0), -timedelta(hours=23, minutes=59), timedelta(hours=-12), timedelta(hours=-5),
           -timedelta(hours=3, minutes=30), timedelta(hours=5, minutes=45), timedelta(hours=9), timedelta(hours=14),
           timedelta(hours=23, minutes=59), timedelta(hours=5, minutes=30, seconds=15)]
_naive = lambda moment: moment.replace(tzinfo=None)  # noqa: E731
BOUNDARIES = [_naive(START) - timedelta(microseconds=1), _naive(START), _naive(END) - timedelta(microseconds=1),
              _naive(END), _naive(START) + timedelta(hours=12)]
partition_instants = st.datetimes(min_value=_naive(START), max_value=_naive(END) - timedelta(microseconds=1))
instants = st.one_of(
    partition_instants,
    st.datetimes(min_value=datetime(2026, 11, 26, 20), max_value=datetime(2026, 11, 28, 4)),
    st.datetimes(min_value=datetime(2026, 11, 25), max_value=datetime(2026, 11, 30)),
    st.sampled_from(BOUNDARIES),
    st.datetimes(),  # far years, both ways
)
hostile_instants = st.one_of(st.sampled_from(BOUNDARIES), st.datetimes())
GARBAGE_SUFFIXES = [" 25:00:00", "T24:61", " 10:00 PM", "T10:00:00 UTC", " not a time", "T10:00:00+25:00", "T",
                    " x", "T10:00:00.5Z+01:00", " 10h00", "T1O:00"]
GARBAGE_PREFIXES = ["2026-11-26", "2026-11-27", "2026-11-28"]  # inside the SQL window, so the SQL returns them
for _p in GARBAGE_PREFIXES:  # make sure they really are not ISO 8601
    for _s in GARBAGE_SUFFIXES:
        _t = (_p + _s).strip()
        with pytest.raises(ValueError):
            datetime.fromisoformat(_t[:-1] + "+00:00" if _t.endswith("Z") else _t)


def _truncate(moment: datetime, spec: str) -> datetime:
    if spec == "seconds":
        return moment.replace(microsecond=0)
    if spec == "minutes":
        return moment.replace(second=0, microsecond=0)
    if spec == "milliseconds":
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return moment


def _in_window_text(value: str) -> bool:
    return WINDOW_START <= value < WINDOW_END


@st.composite
def event_times(draw, store: str, mode: str = "mixed"):
    """(value to store, UTC instant or None, kind). store: sqlite | pg_text | pg_timestamp."""
    tame = mode == "tame"
    choices = {"tame": ["moment"], "hostile": ["moment", "garbage", "other"]}.get(mode)
    kind = draw(st.sampled_from(choices or ["moment"] * 8 + ["garbage", "other"]))
    if store == "pg_timestamp":
        if kind != "moment":
            return None, None, "other"
        instant = draw(partition_instants if tame else hostile_instants if mode == "hostile" else instants)
        return instant, instant.replace(tzinfo=UTC), "moment"
    pg = store == "pg_text"
    if kind == "moment":
        instant = draw(partition_instants if tame else hostile_instants if mode == "hostile" else instants)
        offset = draw(st.one_of(st.none(), st.sampled_from(OFFSETS)))
        spec = draw(st.sampled_from(["auto", "seconds", "minutes", "milliseconds", "microseconds"]))
        sep = draw(st.sampled_from([" ", "T"]))
        try:
            wall = _truncate(instant + (offset or timedelta(0)), spec)
            instant = wall - (offset or timedelta(0))
        except OverflowError:
            offset, wall = None, _truncate(instant, spec)
            instant = wall
        if offset is None:
            value = wall.isoformat(sep=sep, timespec=spec)
            if wall.time() == time(0) and draw(st.booleans()):
                value = wall.date().isoformat()
        else:
            value = wall.replace(tzinfo=timezone(offset)).isoformat(sep=sep, timespec=spec)
            if offset == timedelta(0) and draw(st.booleans()):
                value = value[: -len("+00:00")] + "Z"
        return value, instant.replace(tzinfo=UTC), "moment"
    if kind == "garbage":
        value = draw(st.sampled_from(GARBAGE_PREFIXES)) + draw(st.sampled_from(GARBAGE_SUFFIXES))
        if value.endswith(" x"):
            value += draw(short_text)
        return _clean(value, pg), None, "garbage"
    other = [st.none(), ints, st.floats(), st.booleans(),
             short_text.map(lambda v: _clean(v, pg)).filter(lambda v: not _in_window_text(v))]
    if not pg:
        other.append(st.binary(max_size=8))
    return draw(st.one_of(*other)), None, "other"


def _field_modes(draw, count: int) -> list[str]:
    """A row is tame, tame but for one hostile field, or wild (every field mixed)."""
    kind = draw(st.sampled_from(["tame", "one", "one", "wild"]))
    if kind == "one":
        odd = draw(st.sampled_from([0, 0, *range(count)]))  # the customer id (field 0) more often
        return ["hostile" if i == odd else "tame" for i in range(count)]
    return [kind if kind == "tame" else "mixed"] * count


@st.composite
def signup_rows(draw, pg: bool):
    m = _field_modes(draw, 7)
    value, moment, kind = draw(event_times("pg_timestamp" if pg else "sqlite", m[6]))
    values = (draw(customer_ids(pg, numeric_column=pg, mode=m[0])), draw(clicks(pg, m[1])), draw(names(pg, m[2])),
              draw(emails(pg, m[3])), draw(avatars(pg, m[4])), draw(flags(pg, m[5])), value)
    return Row(values, moment, kind)


@st.composite
def verification_rows(draw, pg: bool):
    m = _field_modes(draw, 3)
    value, moment, kind = draw(event_times("pg_text" if pg else "sqlite", m[2]))
    return Row((draw(customer_ids(pg, mode=m[0])), draw(event_names(pg, m[1])), value), moment, kind)


@st.composite
def datasets(draw, pg: bool):
    signups = draw(st.lists(signup_rows(pg), min_size=2, max_size=16))
    verifications = draw(st.lists(verification_rows(pg), max_size=12))
    # Verifications of the customers who signed up, in whatever type and spacing.
    for i, row in enumerate(verifications):
        if draw(st.booleans()):
            customer = draw(st.sampled_from(signups)).values[0]
            if draw(st.booleans()) and not isinstance(customer, (bytes, float)):
                customer = f" {customer} "
            verifications[i] = Row((_clean(customer, pg), *row.values[1:]), row.moment, row.time_kind)
    # Exact duplicates too, not only rows that happen to share a customer.
    if signups:
        signups += draw(st.lists(st.sampled_from(signups), max_size=3))
    if verifications:
        verifications += draw(st.lists(st.sampled_from(verifications), max_size=2))
    return signups, verifications


# --- the expected outcome, from the contract -------------------------------------------

def _unusable_text(value: str) -> bool:
    return not value or len(value) > MAX_ID or any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


def _plain_number(number: Decimal) -> str | None:
    """A number as written in plain digits; integers without a decimal part."""
    if not number.is_finite():
        return None
    if number == number.to_integral_value():
        if number.is_zero():
            return "0"
        return None if number.adjusted() >= MAX_ID else str(int(number))
    if number.adjusted() < -MAX_ID:
        return None
    return format(number, "f").rstrip("0")


def expected_id(value: Any) -> str | None:
    """The identifier the API must see, or None when the row cannot be sent with it."""
    if value is None or isinstance(value, (bool, bytes)):
        return None
    if isinstance(value, int):
        rendered = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        rendered = _plain_number(Decimal(repr(value)))
    elif isinstance(value, Decimal):
        rendered = _plain_number(value)
    elif isinstance(value, str):
        rendered = value
    else:
        return None
    if rendered is None:
        return None
    rendered = rendered.strip()
    return None if _unusable_text(rendered) else rendered


def expected_flag(value: Any) -> bool | None:
    """requires_verification; None when it is not a boolean at all."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, Decimal)):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in FLAG_WORDS_TRUE else False if word in FLAG_WORDS_FALSE else None
    return None


def expected_event_name(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    name = value.strip()
    return None if _unusable_text(name) else name


def returned_by_sql(stored: Any) -> bool:
    """The default SQL keeps rows whose time is within [window_start, window_end)."""
    if isinstance(stored, str):
        return _in_window_text(stored)
    if isinstance(stored, datetime):
        return datetime.fromisoformat(WINDOW_START) <= stored < datetime.fromisoformat(WINDOW_END)
    return False


def _row_identity(values: tuple) -> tuple:
    return tuple((type(v).__name__, repr(v)) for v in values)


@dataclass
class Candidate:
    moment: datetime
    tracking: str
    status: str  # expected after the run


@dataclass
class Expected:
    named: dict[tuple[str, str], list[Candidate]]
    unnamed: dict[str, set]  # source -> identities of distinct rows that cannot be named


def expect(stored_signups: list[tuple[Row, tuple]], stored_verifications: list[tuple[Row, tuple]]) -> Expected:
    named: dict[tuple[str, str], list[Candidate]] = {}
    unnamed: dict[str, set] = {"signups": set(), "verifications": set()}

    def in_partition(row: Row, time_value: Any) -> bool:
        returned = returned_by_sql(time_value)
        if row.time_kind == "moment":
            inside = START <= row.moment < END
            assert returned or not inside, f"an event time of the partition that the SQL misses: {time_value!r}"
            return inside and returned
        if row.time_kind == "garbage":
            assert returned, time_value
            return True
        assert not returned, f"generated a non-timestamp the SQL returns: {time_value!r}"
        return False

    for row, stored in stored_signups:
        customer, click, _name, _email, _avatar, flag, when = stored
        if not in_partition(row, when):
            continue
        deferred, who = expected_flag(flag), expected_id(customer)
        if row.time_kind != "moment" or deferred is None or who is None:
            unnamed["signups"].add(_row_identity(stored))
            continue
        tracking = DEFERRED_START if deferred else NON_DEFERRED
        status = "delivered" if expected_id(click) is not None else SKIPPED
        named.setdefault((who, SIGNUP_EVENT), []).append(Candidate(row.moment, tracking, status))

    firsts = {who: _earliest(c) for (who, _), c in named.items()}
    for row, stored in stored_verifications:
        customer, event_name, when = stored
        if not in_partition(row, when):
            continue
        who, name = expected_id(customer), expected_event_name(event_name)
        if row.time_kind != "moment" or who is None or name is None:
            unnamed["verifications"].add(_row_identity(stored))
            continue
        named.setdefault((who, name), []).append(Candidate(row.moment, DEFERRED_CONFIRM, "?"))
    for (who, name), candidates in named.items():
        if name == SIGNUP_EVENT:
            continue
        outcomes = set()
        for first in firsts.get(who, []):
            if first.tracking == NON_DEFERRED:
                outcomes.add(SKIPPED)  # nothing to confirm
            elif first.status == "delivered":
                outcomes.add("delivered")
            else:
                outcomes.add(PENDING)  # event 1 is on record but not delivered: waits
        for candidate in candidates:
            candidate.status = "|".join(sorted(outcomes or {PENDING}))  # no event 1 on record yet: waits
    return Expected(named, unnamed)


def _earliest(candidates: list[Candidate]) -> list[Candidate]:
    first = min(c.moment for c in candidates)
    return [c for c in candidates if c.moment == first]


# --- running it ------------------------------------------------------------------------

def insert_rows(engine: Engine, signups: list[Row], verifications: list[Row], placeholder: str) -> None:
    with engine.begin() as conn:
        for table, columns, rows in (("signups", SIGNUP_COLUMNS, signups),
                                     ("verifications", VERIFICATION_COLUMNS, verifications)):
            if not rows:
                continue
            marks = ", ".join([placeholder] * (len(columns) + 1))
            conn.exec_driver_sql(f"INSERT INTO {table} (gen_id, {', '.join(columns)}) VALUES ({marks})",
                                 [(i, *row.values) for i, row in enumerate(rows)])


def stored_rows(engine: Engine, table: str, columns: tuple, rows: list[Row]) -> list[tuple[Row, tuple]]:
    """Each generated row with its values as the driver hands them back (what the SQL sees)."""
    with engine.connect() as conn:
        found = conn.exec_driver_sql(f"SELECT gen_id, {', '.join(columns)} FROM {table} ORDER BY gen_id").all()
    assert len(found) == len(rows)
    return [(rows[r[0]], tuple(r[1:])) for r in found]


def run_core(engine: Engine, sandbox: SandboxServer, run_id: str):
    # The expectations here are of one partition alone; the look-back has tests of its own.
    config = load_config(DEFAULT_SOURCES_FILE).model_copy(update={"lookback_days": 0})
    ensure_stores(engine)  # as each task does before its stage
    mapped = stages.extract_and_map(engine, config, PARTITION, run_id)
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=10) as client:
        limiter = SharedRateLimiter(engine, "test", 100000)
        report = stages.send_open_events(engine, client, limiter, POLICY, run_id, 60, "cutmeshort_default")
    return mapped, report


def check_outcome(engine: Engine, sandbox: SandboxServer, expected: Expected) -> None:
    with engine.connect() as conn:
        audit = [dict(r) for r in conn.execute(select(deliveries)).mappings()]
    note(f"audit: {[(r['customer_external_id'], r['event_name'], r['status'], r['reason']) for r in audit]}")

    for row in audit:
        assert row["status"] in STATUSES
        assert row["status"] not in ("rejected", "failed"), row
        assert row["partition_date"] == DAY
        if row["status"] in (SKIPPED, PENDING):
            assert row["reason"], row
        if row["status"] == PENDING:
            assert row["tracking"] == DEFERRED_CONFIRM, row  # only an event 2 may still wait

    # Rows that name their customer and event: exactly one audit row per pair.
    named = {(r["customer_external_id"], r["event_name"]): r for r in audit if r["event_name"] is not None}
    assert len(named) == sum(1 for r in audit if r["event_name"] is not None)
    assert set(named) == set(expected.named)
    for pair, candidates in expected.named.items():
        row = named[pair]
        allowed = {(c.tracking, s) for c in _earliest(candidates) for s in c.status.split("|")}
        assert (row["tracking"], row["status"]) in allowed, (pair, row, allowed)

    # Rows that cannot name them: skipped, one audit row per distinct source row.
    for source, identities in expected.unnamed.items():
        rows = [r for r in audit if r["event_name"] is None and r["source"] == source]
        assert len(rows) == len(identities), (source, rows, identities)
        assert all(r["status"] == SKIPPED and r["reason"] for r in rows)
        assert all(r["customer_external_id"] is None for r in rows)

    # What the API saw: nothing rejected, every body valid for the vendor's model.
    requests = sandbox.requests()
    assert [r["status"] for r in requests if r["status"] not in (200, 409)] == [], requests
    bodies = {}
    for request in requests:
        body = request["body"]
        assert validate_lead(body) is None
        assert LeadPayload.model_validate(body).to_dict().keys() == body.keys()  # no field the vendor lacks
        assert None not in body.values()
        bodies[(body["customerExternalId"], body["eventName"])] = body
    delivered = {pair: r for pair, r in named.items() if r["status"] == "delivered"}
    event(f"delivered: {min(len(delivered), 3)}{'+' if len(delivered) >= 3 else ''}")
    event(f"event 2 delivered: {any(r['tracking'] == DEFERRED_CONFIRM for r in delivered.values())}")
    event(f"unnamed skips: {sum(map(len, expected.unnamed.values())) > 0}")
    event(f"repeats folded: {any(len(c) > 1 for c in expected.named.values())}")
    assert set(bodies) == set(delivered)
    assert len(requests) == len(delivered)  # each sent once
    for pair, row in delivered.items():
        body = bodies[pair]
        assert json.loads(row["payload"]) == redact(body)  # audited as sent, PII hashed
        for field in ("customerName", "customerEmail"):
            if field in body:
                assert json.loads(row["payload"])[field].startswith("sha256:")
        if row["tracking"] == DEFERRED_CONFIRM:
            assert "clickId" not in body and "mode" not in body
        elif row["tracking"] == DEFERRED_START:
            assert body["mode"] == "deferred" and body["clickId"]
        else:
            assert "mode" not in body and body["clickId"]
        assert START <= datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")) < END


@pytest.fixture(scope="module")
def fast_sandbox():
    with SandboxServer(host="127.0.0.1", port=0, token=TOKEN, rate_limit_per_minute=100000) as server:
        yield server


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                     HealthCheck.data_too_large, HealthCheck.large_base_example])


def _at(text_time: str) -> datetime:
    moment = datetime.fromisoformat(text_time.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _signup(customer, time_value: str, click="c1", flag=None) -> Row:
    values = (customer, click, None, None, None, flag, time_value)
    if "not a time" in time_value:
        return Row(values, None, "garbage")
    return Row(values, _at(time_value), "moment")


def _verification(customer, name: str, time_value: str) -> Row:
    return Row((customer, name, time_value), _at(time_value), "moment")


# Pinned cases, run every time before the generated ones.
SQLITE_CASES = [
    # Numeric ids too long for the API once rendered (a REAL column holds 1e300 exactly as an integer).
    ([_signup(1e300, "2026-11-27 10:00:00", flag=1), _signup(2.0, "2026-11-27 10:00:00", flag="t")],
     [_verification(1e300, "email_verified", "2026-11-27 11:00:00"),
      _verification(" 2 ", "email_verified", "2026-11-27T11:00:00Z")]),
    # Non-integral and negative numeric ids, an id that is a boolean, one row that is not dated.
    ([_signup(1.5, "2026-11-27 10:00:00", flag=True), _signup(-2**63, "2026-11-27T23:59:59.999999"),
      _signup(True, "2026-11-27 10:00:00"), _signup(3, "2026-11-27 not a time")],
     [_verification("1.5", "email_verified", "2026-11-28T00:30:00+01:00")]),
]
TEN = datetime(2026, 11, 27, 10)
PG_CASES = [
    ([Row((Decimal("1E+300"), "c1", None, None, None, "t", TEN), TEN.replace(tzinfo=UTC), "moment"),
      Row((10**300, "c2", None, None, None, None, TEN), TEN.replace(tzinfo=UTC), "moment"),
      Row((Decimal("7.50"), "c3", "Ann", "ann@example.com", None, "true", TEN), TEN.replace(tzinfo=UTC), "moment")],
     [_verification("7.5", "email_verified", "2026-11-27 11:00:00")]),
]


@settings(max_examples=60, **COMMON)
@given(data=datasets(pg=False))
@example(data=SQLITE_CASES[0])
@example(data=SQLITE_CASES[1])
def test_hostile_rows_sqlite(fast_sandbox, data):
    signups, verifications = data
    fast_sandbox.reset()
    with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
        engine = create_engine(f"sqlite:///{Path(folder) / 'warehouse.db'}")
        try:
            with engine.begin() as conn:
                for ddl in SQLITE_DDL:
                    conn.exec_driver_sql(ddl)
            insert_rows(engine, signups, verifications, "?")
            expected = expect(stored_rows(engine, "signups", SIGNUP_COLUMNS, signups),
                              stored_rows(engine, "verifications", VERIFICATION_COLUMNS, verifications))
            run_core(engine, fast_sandbox, "hostile-sqlite")
            check_outcome(engine, fast_sandbox, expected)
        finally:
            engine.dispose()


@pytest.mark.postgres
@settings(max_examples=15, **COMMON)
@given(data=datasets(pg=True))
@example(data=PG_CASES[0])
def test_hostile_rows_postgres(pg_warehouse, fast_sandbox, data):
    signups, verifications = data
    fast_sandbox.reset()
    engine = pg_warehouse.engine
    drop_schema(engine)
    with engine.begin() as conn:
        for ddl in PG_DDL:
            conn.exec_driver_sql(ddl)
    insert_rows(engine, signups, verifications, "%s")
    expected = expect(stored_rows(engine, "signups", SIGNUP_COLUMNS, signups),
                      stored_rows(engine, "verifications", VERIFICATION_COLUMNS, verifications))
    run_core(engine, fast_sandbox, "hostile-postgres")
    check_outcome(engine, fast_sandbox, expected)


def test_a_rerun_of_hostile_rows_sends_nothing_more(fast_sandbox, tmp_path):
    """A fixed hostile batch, run twice: the second run sends nothing and changes no status."""
    fast_sandbox.reset()
    engine = create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    rows = [
        Row((1, "c1", "Ann\x00", "ann@example.com", None, "t", "2026-11-27 08:00:00"), None, "moment"),
        Row((1.0, "c1", None, None, None, 1, "2026-11-27T09:00:00+05:00"), None, "moment"),
        Row((" 2 ", None, 7, "nope", "ftp://x", None, "2026-11-27 10:00:00"), None, "moment"),
        Row((None, "c3", None, None, None, None, "2026-11-27 not a time"), None, "garbage"),
        Row(("🦄" * 300, "c4", None, None, None, "maybe", "2026-11-27 11:00:00.000001"), None, "moment"),
    ]
    checks = [Row(("1", "email_verified", "2026-11-27T12:00:00Z"), None, "moment"),
              Row((2, "email_verified", "2026-11-27 12:00:00"), None, "moment"),
              Row(("3", "email_verified", "2026-11-27 12:00:00"), None, "moment")]
    with engine.begin() as conn:
        for ddl in SQLITE_DDL:
            conn.exec_driver_sql(ddl)
    insert_rows(engine, rows, checks, "?")
    run_core(engine, fast_sandbox, "first")
    with engine.connect() as conn:
        first = {r["event_key"]: (r["status"], r["reason"]) for r in conn.execute(select(deliveries)).mappings()}
    sent = len(fast_sandbox.requests())
    assert sent == 2  # customer 1: event 1 (deferred) and event 2; customer 2's signup has no click
    run_core(engine, fast_sandbox, "second")
    with engine.connect() as conn:
        second = {r["event_key"]: (r["status"], r["reason"]) for r in conn.execute(select(deliveries)).mappings()}
    assert len(fast_sandbox.requests()) == sent
    assert second == first
    assert sorted(s for s, _ in first.values()) == ["delivered", "delivered", "pending", "skipped", "skipped",
                                                     "skipped", "skipped"]
    engine.dispose()


def test_text_that_is_not_utf8_in_sqlite_is_audited_not_fatal(fast_sandbox, tmp_path):
    """SQLite keeps whatever bytes it is given as TEXT, e.g. a lone surrogate encoded by another
    tool (ED A0 80) or Latin-1 text. One such value must not stop the other rows."""
    fast_sandbox.reset()
    engine = create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    try:
        with engine.begin() as conn:
            for ddl in SQLITE_DDL:
                conn.exec_driver_sql(ddl)
            conn.exec_driver_sql(
                "INSERT INTO signups VALUES (0, 1, 'c1', CAST(x'416eeda080' AS TEXT), NULL, NULL, NULL, "
                "'2026-11-27 08:00:00')")
            conn.exec_driver_sql(
                "INSERT INTO signups VALUES (1, 2, 'c2', 'Bob', NULL, NULL, NULL, '2026-11-27 09:00:00')")
        run_core(engine, fast_sandbox, "not-utf8")
        with engine.connect() as conn:
            audit = {r["customer_external_id"]: r for r in conn.execute(select(deliveries)).mappings()}
        assert audit["2"]["status"] == "delivered"
        assert audit["1"]["status"] in ("delivered", "skipped")
        for request in fast_sandbox.requests():
            assert request["status"] == 200 and validate_lead(request["body"]) is None
    finally:
        engine.dispose()


# --- the mapping alone, on any value a driver can hand back ------------------------------

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(10**5000), st.floats(), st.decimals(),
    st.text(st.characters(exclude_categories=()), max_size=20),  # lone surrogates included
    any_text, st.binary(max_size=8), st.dates(),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.uuids(), st.timedeltas(), st.binary(max_size=8).map(memoryview),  # PostgreSQL uuid, interval, bytea
    st.sampled_from([Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity"), float("nan"), float("-inf")]),
)
NEAR_TIMES = st.one_of(
    event_times("sqlite").map(lambda t: t[0]),
    st.datetimes(min_value=datetime(2026, 11, 26), max_value=datetime(2026, 11, 29),
                 timezones=st.one_of(st.none(), st.timezones())),
    ANY_VALUE,
)
SIGNUP_SOURCE = SourceConfig(name="signups", kind="signup", sql="signups.sql", event_name=SIGNUP_EVENT)
VERIFICATION_SOURCE = SourceConfig(name="verifications", kind="verification", sql="verifications.sql")
MAP_COLUMNS = ["customer_external_id", "click_id", "customer_name", "customer_email", "customer_avatar",
               "requires_verification", "event_name", "event_time"]


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(*([ANY_VALUE] * 7), NEAR_TIMES), max_size=6),
       zone=st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu", "Pacific/Kiritimati"]))
def test_mapping_never_emits_an_invalid_body(rows, zone):
    part = Partition(DAY, ZoneInfo(zone))
    for source in (SIGNUP_SOURCE, VERIFICATION_SOURCE):
        mapped_days, _ = map_rows(source, MAP_COLUMNS, rows, {DAY: part}, part, {}, {})
        events = mapped_days.get(DAY, [])
        first_per_key(events)
        for mapped in events:
            assert mapped.partition_date == DAY and len(mapped.event_key) <= 64
            for message in [mapped.reason or "", *mapped.notes]:
                message.encode("utf-8")  # storable: no lone surrogate
                assert "\x00" not in message  # PostgreSQL text cannot hold NUL
            if mapped.status == SKIPPED:
                assert mapped.reason and mapped.payload is None
                continue
            assert mapped.status == PENDING and mapped.reason is None
            body = mapped.payload
            assert validate_lead(body) is None, (body, validate_lead(body))
            LeadPayload.model_validate(body)
            json.dumps(body, ensure_ascii=False).encode("utf-8")
            json.dumps(redact(body), ensure_ascii=False).encode("utf-8")
            assert body["customerExternalId"] == mapped.customer_external_id
            assert body["eventName"] == mapped.event_name
            assert part.start <= mapped.event_time < part.end
            assert datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")) == mapped.event_time

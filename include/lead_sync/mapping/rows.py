"""Payload rules: warehouse rows (pandas frames) to CutMeShort lead events.

Everything the contract says about what is sent, and what is not, lives here.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
import uuid
import dataclasses
from datetime import date, datetime, time, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any, Iterator
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from email_validator import EmailNotValidError, validate_email
from pandas.api.extensions import ExtensionDtype
from pandas.core.dtypes.cast import maybe_box_native

from lead_sync.read.config import SourceConfig
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED, LeadEvent
from lead_sync.read.partition import Partition

MAX_TEXT = 255
MAX_URL = 2048

SIGNUP_COLUMNS = ("customer_external_id", "click_id", "event_time")
SIGNUP_OPTIONAL = ("customer_name", "customer_email", "customer_avatar", "requires_verification")
VERIFICATION_COLUMNS = ("customer_external_id", "event_name", "event_time")

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0", ""}


class InvalidValue(ValueError):
    """A source value that cannot be put on the wire; the message is the audit reason."""


class SourceShapeError(ValueError):
    """A source query did not return the columns its kind needs."""


def _preview(value: Any) -> str:
    """A short, escaped view of a source value for an audit reason."""
    try:
        text = str(value)
    except ValueError:  # e.g. an integer beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    return repr(text[:40])


def is_absent(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, np.datetime64) and np.isnat(value)


def check_text(value: str, what: str, max_len: int = MAX_TEXT) -> str:
    """A stripped, non-empty, printable string of bounded length, or InvalidValue."""
    text = value.strip()
    if not text:
        raise InvalidValue(f"{what} is empty")
    if len(text) > max_len:
        raise InvalidValue(f"{what} is longer than {max_len} characters")
    # Printable text has neither (checked in C); only other text is looked at per character.
    if not text.isprintable() and any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise InvalidValue(f"{what} contains control characters")
    return text


def _integer_text(number: int, what: str) -> str:
    # Decide on the length before rendering: str() of a huge integer is slow, or refused
    # outright beyond Python's digit limit (a NUMERIC column can hold such a value).
    if abs(number).bit_length() > 4 * MAX_TEXT:
        raise InvalidValue(f"{what} is longer than {MAX_TEXT} characters")
    return check_text(str(number), what)


def _decimal_text(number: Decimal, what: str) -> str:
    """A NUMERIC value as plain digits: integral ones without a decimal part, never rounded."""
    if not number.is_finite():
        raise InvalidValue(f"{what} is not a finite number")
    if number.is_zero():
        return "0"
    if not -MAX_TEXT <= number.adjusted() < MAX_TEXT:
        raise InvalidValue(f"{what} is longer than {MAX_TEXT} characters")
    if number == number.to_integral_value():
        return _integer_text(int(number), what)
    # format() keeps every digit (normalize() would round to the context precision).
    return check_text(format(number, "f").rstrip("0"), what)


def id_text(value: Any, what: str) -> str:
    """An identifier as the API must see it: integers without a decimal part, trimmed text."""
    if is_absent(value):
        raise InvalidValue(f"no {what}")
    if isinstance(value, (bool, np.bool_)):
        raise InvalidValue(f"{what} is a boolean, not an identifier")
    if isinstance(value, (int, np.integer)):
        return _integer_text(int(value), what)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise InvalidValue(f"{what} is not a finite number")
        if value == int(value):
            return _integer_text(int(value), what)
        return _decimal_text(Decimal(str(value)), what)
    if isinstance(value, Decimal):
        return _decimal_text(value, what)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        return check_text(value, what)
    raise InvalidValue(f"{what} has unsupported type {type(value).__name__}")


def utc_moment(value: Any, what: str) -> datetime:
    """An aware UTC datetime; naive values are UTC by contract."""
    if is_absent(value):
        raise InvalidValue(f"no {what}")
    try:
        if isinstance(value, pd.Timestamp):
            moment = value.to_pydatetime(warn=False)
        elif isinstance(value, datetime):
            moment = value
        elif isinstance(value, date):
            moment = datetime.combine(value, time(0))
        elif isinstance(value, np.datetime64):
            moment = pd.Timestamp(value).to_pydatetime(warn=False)
        elif isinstance(value, str):
            text = value.strip()
            if text.endswith(("Z", "z")):
                text = text[:-1] + "+00:00"
            moment = datetime.fromisoformat(text)
        else:
            raise InvalidValue(f"{what} has unsupported type {type(value).__name__}")
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        if isinstance(exc, InvalidValue):
            raise
        raise InvalidValue(f"{what} is not a timestamp: {_preview(value)}") from exc


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="auto").replace("+00:00", "Z")


def as_flag(value: Any) -> bool:
    """requires_verification: null is false; booleans, 0/1 and true/false words accepted."""
    if is_absent(value):
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, (float, np.floating)) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, Decimal) and value.is_finite() and value in (0, 1):  # a NUMERIC flag column
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidValue(f"requires_verification is not a boolean: {_preview(value)}")


def _optional_text(value: Any, field: str, max_len: int = MAX_TEXT) -> str | None:
    """None when absent; otherwise stripped, printable, bounded text, or InvalidValue."""
    if is_absent(value):
        return None
    if not isinstance(value, str):
        raise InvalidValue(f"{field} is not text")
    return check_text(value, field, max_len)


# A plain ASCII address: letters and digits, single dots, underscores, pluses or hyphens between
# them before the @-sign. email_validator accepts every such local part, so whether the address
# is valid is whether its domain is (and its length); the domain's verdict is email_validator's
# own, cached per domain. Any other address is validated whole.
_PLAIN_EMAIL = re.compile(r"[A-Za-z0-9]+(?:[._+-][A-Za-z0-9]+)*@([A-Za-z0-9.-]+)")
_EMAIL_MAX_LENGTH = 254


@lru_cache(maxsize=4096)
def _email_domain_valid(domain: str) -> bool:
    try:
        validate_email("a@" + domain, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def _valid_email(text: str) -> bool:
    plain = _PLAIN_EMAIL.fullmatch(text)
    if plain is not None and len(text) <= _EMAIL_MAX_LENGTH:
        return _email_domain_valid(plain.group(1))
    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def email_or_none(value: Any) -> str | None:
    text = _optional_text(value, "customerEmail", 320)
    if text is not None and not _valid_email(text):
        raise InvalidValue("customerEmail is not an email address")
    return text


_SPACE = re.compile(r"\s")  # what str.isspace() is true for
# An http(s) URL of ASCII host name, port and path, nothing urlsplit could read otherwise:
# what the checks below accept, decided without splitting it.
_PLAIN_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]*)?(?:/[!-~]*)?")


def avatar_or_none(value: Any) -> str | None:
    text = _optional_text(value, "customerAvatar", MAX_URL)
    if text is None:
        return None
    if _PLAIN_URL.fullmatch(text):
        return text
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InvalidValue("customerAvatar is not an http(s) URL") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or _SPACE.search(text):
        raise InvalidValue("customerAvatar is not an http(s) URL")
    return text


def name_or_none(value: Any) -> str | None:
    if isinstance(value, str) and not value.strip():
        return None  # a blank name is no name
    return _optional_text(value, "customerName")


def event_key(customer_external_id: str, event_name: str) -> str:
    """Deterministic key: one lead event per customer and event name."""
    digest = hashlib.sha256(f"{customer_external_id}\x1f{event_name}".encode()).hexdigest()
    return f"ev_{digest[:40]}"


def _keyable(value: Any) -> Any:
    # json.dumps renders integers in decimal, which Python refuses beyond its digit limit.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 4 * MAX_TEXT:
        return f"int:{value:x}"
    return value


def row_key(source: str, row: dict) -> str:
    """Key of a row that cannot name its customer or event: its source and contents."""
    body = json.dumps({k: _keyable(v) for k, v in row.items()}, sort_keys=True, default=repr, ensure_ascii=True)
    digest = hashlib.sha256(f"{source}\x1f{body}".encode()).hexdigest()
    return f"row_{digest[:40]}"


# A payload of text values (every payload the mapping makes) is written here as json.dumps
# writes it, one value at a time with the json module's own string encoders; any other goes
# through json.dumps itself.
_DIGEST_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=True)  # json.dumps(sort_keys=True, ensure_ascii=True)
_BODY_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(ensure_ascii=False)
_ASCII_STRING = json.encoder.encode_basestring_ascii
_STRING = json.encoder.encode_basestring
_REDACTED = ("customerName", "customerEmail")


def _hash(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.strip().lower().encode()).hexdigest()


def redact(payload: dict | None) -> dict | None:
    """The payload as audited: names and emails replaced by their SHA-256."""
    if payload is None:
        return None
    out = dict(payload)
    for field in _REDACTED:
        if field in out:
            out[field] = _hash(out[field])
    return out


def payload_digest(payload: dict | None) -> str | None:
    """Fingerprint of the body as it would be sent: a change reopens a rejected event."""
    if payload is None:
        return None
    try:
        text = "{" + ", ".join([_ASCII_STRING(k) + ": " + _ASCII_STRING(payload[k]) for k in sorted(payload)]) + "}"
    except TypeError:  # a key or value that is not text
        text = _DIGEST_JSON.encode(payload)
    return hashlib.sha256(text.encode()).hexdigest()


def payload_json(payload: dict | None) -> tuple[str | None, str | None]:
    """The body to send and the body as audited (redact), each as json.dumps(..., ensure_ascii=False)."""
    if payload is None:
        return None, None
    sent, audited = [], []
    try:
        for key, value in payload.items():
            field = _STRING(key) + ": "
            sent.append(field + _STRING(value))
            audited.append(field + _STRING(_hash(value)) if key in _REDACTED else sent[-1])
    except TypeError:  # a key or value that is not text
        return _BODY_JSON.encode(payload), _BODY_JSON.encode(redact(payload))
    return "{" + ", ".join(sent) + "}", "{" + ", ".join(audited) + "}"


def _require_columns(source: SourceConfig, columns, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SourceShapeError(
            f"source {source.name!r}: its SQL must return column(s) {', '.join(missing)}"
        )


def _plain_row(record: dict) -> dict:
    return {k: (None if is_absent(v) else v) for k, v in record.items()}


def _skipped(source: SourceConfig, partition: Partition, tracking: str, row: dict, reason: str,
             customer: str | None = None, name: str | None = None, moment: datetime | None = None) -> LeadEvent:
    key = event_key(customer, name) if customer and name else row_key(source.name, row)
    return LeadEvent(key, source.name, partition.day, tracking, SKIPPED, None,
                     customer_external_id=customer, event_name=name, event_time=moment, reason=reason)


def _in_partition(moment: datetime | None, partition: Partition) -> bool:
    # A row whose time cannot be read stays with the partition whose query returned it,
    # so that it is audited rather than lost.
    return moment is None or partition.contains(moment)


def map_signup_row(source: SourceConfig, row: dict, partition: Partition) -> LeadEvent | None:
    name = source.event_name
    try:
        moment = utc_moment(row.get("event_time"), "event time")
    except InvalidValue as exc:
        return _skipped(source, partition, NON_DEFERRED, row, str(exc))
    if not _in_partition(moment, partition):
        return None
    try:
        deferred = as_flag(row.get("requires_verification"))
    except InvalidValue as exc:
        return _skipped(source, partition, NON_DEFERRED, row, str(exc), moment=moment)
    tracking = DEFERRED_START if deferred else NON_DEFERRED
    try:
        customer = id_text(row.get("customer_external_id"), "customer id")
    except InvalidValue as exc:
        return _skipped(source, partition, tracking, row, str(exc), moment=moment)
    try:
        click = id_text(row.get("click_id"), "click_id")
    except InvalidValue as exc:
        return _skipped(source, partition, tracking, row, str(exc), customer, name, moment)

    payload: dict[str, Any] = {"eventName": name, "customerExternalId": customer, "clickId": click}
    if deferred:
        payload["mode"] = "deferred"
    payload["timestamp"] = iso_utc(moment)
    notes = []
    for field, column, rule in (
        ("customerName", "customer_name", name_or_none),
        ("customerEmail", "customer_email", email_or_none),
        ("customerAvatar", "customer_avatar", avatar_or_none),
    ):
        try:
            value = rule(row.get(column))
        except InvalidValue as exc:
            notes.append(f"{field} left out: {exc}")
            continue
        if value is not None:
            payload[field] = value
    return LeadEvent(event_key(customer, name), source.name, partition.day, tracking, PENDING, payload,
                     customer_external_id=customer, event_name=name, event_time=moment, notes=notes)


def map_verification_row(source: SourceConfig, row: dict, partition: Partition) -> LeadEvent | None:
    try:
        moment = utc_moment(row.get("event_time"), "event time")
    except InvalidValue as exc:
        return _skipped(source, partition, DEFERRED_CONFIRM, row, str(exc))
    if not _in_partition(moment, partition):
        return None
    try:
        customer = id_text(row.get("customer_external_id"), "customer id")
    except InvalidValue as exc:
        return _skipped(source, partition, DEFERRED_CONFIRM, row, str(exc), moment=moment)
    try:
        if not isinstance(row.get("event_name"), (str, type(None))):
            raise InvalidValue("event_name is not text")
        name = id_text(row.get("event_name"), "event_name")
    except InvalidValue as exc:
        return _skipped(source, partition, DEFERRED_CONFIRM, row, str(exc), moment=moment)
    payload = {"eventName": name, "customerExternalId": customer, "timestamp": iso_utc(moment)}
    return LeadEvent(event_key(customer, name), source.name, partition.day, DEFERRED_CONFIRM, PENDING,
                     payload, customer_external_id=customer, event_name=name, event_time=moment)


def _rule(source: SourceConfig, columns):
    """The row rule of the source's kind, once the columns (of a frame, or names) have what it needs."""
    if source.kind == "signup":
        _require_columns(source, columns, SIGNUP_COLUMNS)
        return map_signup_row
    _require_columns(source, columns, VERIFICATION_COLUMNS)
    return map_verification_row


def map_frame(source: SourceConfig, frame: pd.DataFrame, partition: Partition) -> list[LeadEvent]:
    """Map one source's rows for one partition; rows outside the partition are dropped."""
    rule = _rule(source, frame.columns)
    columns = _frame_columns(frame)
    if columns is None:
        return [e for e in (rule(source, _plain_row(r), partition) for r in frame.to_dict("records")) if e is not None]
    rows = _Rows(source, columns, len(frame))
    return [e for e in rows.events([partition] * len(frame), rows.moments()) if e is not None]


# --- the same rules, a frame at a time ---------------------------------------------------
#
# map_frame and map_days read a frame column by column and decide each row as map_signup_row
# and map_verification_row do: the same checks in the same order, the same events and
# reasons. The common values (text, integers, datetimes, booleans, nulls) are decided here
# directly; any other value goes through the rule functions above.

# Types maybe_box_native (what DataFrame.to_dict applies to object columns) returns unchanged,
# and types whose values are never absent (is_absent).
_NATIVE = frozenset({str, int, float, bool, type(None), datetime, date, Decimal})
_PRESENT = frozenset({str, int, bool, datetime, date, Decimal})
_SMALL_INT = 10**15


def _frame_columns(frame: pd.DataFrame) -> dict[Any, list] | None:
    """Each column's values as `_plain_row(record)` has them for the records of
    `frame.to_dict("records")`; None when the columns are not unique (to_dict drops some)."""
    if not frame.columns.is_unique:
        return None
    columns: dict[Any, list] = {}
    for position, (name, dtype) in enumerate(zip(frame.columns, frame.dtypes)):
        series = frame.iloc[:, position]
        if dtype == np.dtype(object):
            values = [v if type(v) in _NATIVE else maybe_box_native(v) for v in series.tolist()]
        elif isinstance(dtype, ExtensionDtype):
            values = [v if type(v) in _NATIVE else maybe_box_native(v) for v in series]
        else:
            values = list(series)
        columns[name] = [v if v is None or type(v) in _PRESENT else (None if is_absent(v) else v) for v in values]
    return columns


def _id(value: Any, what: str) -> str:
    """id_text."""
    kind = type(value)
    if kind is str:
        text = value.strip()
        if text and len(text) <= MAX_TEXT and text.isprintable():
            return text
    elif kind is int and -_SMALL_INT < value < _SMALL_INT:
        return str(value)
    return id_text(value, what)


def _flag(value: Any) -> bool:
    """as_flag."""
    if value is None:
        return False
    if type(value) is bool:
        return value
    return as_flag(value)


def _plain(value: Any, limit: int) -> str | None:
    """A plain string that needs no further check, stripped; None when the full check decides."""
    if type(value) is str:
        text = value.strip()
        if text and len(text) <= limit and text.isprintable():
            return text
    return None


def _name(value: Any) -> str | None:
    """name_or_none."""
    if value is None:
        return None
    text = _plain(value, MAX_TEXT)
    return text if text is not None else name_or_none(value)


def _email(value: Any) -> str | None:
    """email_or_none."""
    if value is None:
        return None
    text = _plain(value, 320)
    if text is None:
        return email_or_none(value)
    if _valid_email(text):
        return text
    raise InvalidValue("customerEmail is not an email address")


def _moment(value: Any) -> datetime | str:
    """utc_moment(value, "event time"), or the reason it is not one."""
    if type(value) is datetime:
        try:
            return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            pass  # utc_moment says why
    try:
        return utc_moment(value, "event time")
    except InvalidValue as exc:
        return str(exc)


class _Rows:
    """A frame's rows (see _frame_columns) and the rules of their source's kind."""

    def __init__(self, source: SourceConfig, columns: dict[Any, list], count: int):
        self.source = source
        self.columns = columns
        absent = [None] * count
        self.times = columns.get("event_time", absent)
        self.customers = columns.get("customer_external_id", absent)
        self.clicks = columns.get("click_id", absent)
        self.flags = columns.get("requires_verification", absent)
        self.names = columns.get("customer_name", absent)
        self.emails = columns.get("customer_email", absent)
        self.avatars = columns.get("customer_avatar", absent)
        self.event_names = columns.get("event_name", absent)
        self.signup = source.kind == "signup"

    def row(self, i: int) -> dict:
        return {name: values[i] for name, values in self.columns.items()}

    def moments(self) -> list[datetime | str]:
        """Each row's event time (utc_moment), or the reason it has none."""
        return [_moment(value) for value in self.times]

    def events(self, parts: list[Partition | None], moments: list[datetime | str]) -> list[LeadEvent | None]:
        """map_signup_row or map_verification_row of each row for its partition (rows without one: None)."""
        if self.signup:
            return self._signups(parts, moments)
        return self._verifications(parts, moments)

    def _timed(self, parts: list[Partition | None], moments: list[datetime | str], tracking: str,
               out: list[LeadEvent | None]) -> Iterator[tuple[int, Partition, datetime]]:
        """The rows whose event time falls in their partition: (index, partition, time). The others
        go to `out` as they map: None (not this run's), or skipped (the time is unreadable)."""
        append = out.append
        bounds: Partition | None = None
        for i, (part, moment) in enumerate(zip(parts, moments)):
            if part is None:
                append(None)
                continue
            if moment.__class__ is str:
                append(_skipped(self.source, part, tracking, self.row(i), moment))
                continue
            if part is not bounds:
                bounds, start, end = part, part.start, part.end
            if not start <= moment < end:
                append(None)
                continue
            yield i, part, moment

    def _signups(self, parts: list[Partition | None], moments: list[datetime | str]) -> list[LeadEvent | None]:
        source, name = self.source, self.source.event_name
        out: list[LeadEvent | None] = []
        append = out.append
        flags, customers, clicks, names, emails, avatars = (
            self.flags, self.customers, self.clicks, self.names, self.emails, self.avatars)
        for i, part, moment in self._timed(parts, moments, NON_DEFERRED, out):
            flag, customer, click, person, email, avatar = (
                flags[i], customers[i], clicks[i], names[i], emails[i], avatars[i])
            try:
                deferred = _flag(flag)
            except InvalidValue as exc:
                append(_skipped(source, part, NON_DEFERRED, self.row(i), str(exc), moment=moment))
                continue
            tracking = DEFERRED_START if deferred else NON_DEFERRED
            try:
                customer = _id(customer, "customer id")
            except InvalidValue as exc:
                append(_skipped(source, part, tracking, self.row(i), str(exc), moment=moment))
                continue
            try:
                click = _id(click, "click_id")
            except InvalidValue as exc:
                append(_skipped(source, part, tracking, self.row(i), str(exc), customer, name, moment))
                continue
            payload: dict[str, Any] = {"eventName": name, "customerExternalId": customer, "clickId": click}
            if deferred:
                payload["mode"] = "deferred"
            payload["timestamp"] = moment.isoformat().replace("+00:00", "Z")  # iso_utc: moment is UTC
            notes = []
            try:
                person = _name(person)
                if person is not None:
                    payload["customerName"] = person
            except InvalidValue as exc:
                notes.append(f"customerName left out: {exc}")
            try:
                email = _email(email)
                if email is not None:
                    payload["customerEmail"] = email
            except InvalidValue as exc:
                notes.append(f"customerEmail left out: {exc}")
            if avatar is not None:
                try:
                    payload["customerAvatar"] = avatar_or_none(avatar)
                except InvalidValue as exc:
                    notes.append(f"customerAvatar left out: {exc}")
            append(LeadEvent(event_key(customer, name), source.name, part.day, tracking, PENDING, payload,
                             customer, name, moment, None, notes))
        return out

    def _verifications(self, parts: list[Partition | None], moments: list[datetime | str]) -> list[LeadEvent | None]:
        source = self.source
        out: list[LeadEvent | None] = []
        append = out.append
        customers, event_names = self.customers, self.event_names
        for i, part, moment in self._timed(parts, moments, DEFERRED_CONFIRM, out):
            customer, name = customers[i], event_names[i]
            try:
                customer = _id(customer, "customer id")
            except InvalidValue as exc:
                append(_skipped(source, part, DEFERRED_CONFIRM, self.row(i), str(exc), moment=moment))
                continue
            try:
                if not isinstance(name, (str, type(None))):
                    raise InvalidValue("event_name is not text")
                name = _id(name, "event_name")
            except InvalidValue as exc:
                append(_skipped(source, part, DEFERRED_CONFIRM, self.row(i), str(exc), moment=moment))
                continue
            payload = {"eventName": name, "customerExternalId": customer,
                       "timestamp": moment.isoformat().replace("+00:00", "Z")}  # iso_utc: moment is UTC
            append(LeadEvent(event_key(customer, name), source.name, part.day, DEFERRED_CONFIRM, PENDING, payload,
                             customer, name, moment, None, []))
        return out

    def known_key(self, i: int) -> str | None:
        """_key_of_timed_row of row i."""
        try:
            customer = _id(self.customers[i], "customer id")
            if self.signup:
                _flag(self.flags[i])
                return event_key(customer, self.source.event_name)
            name = self.event_names[i]
            if not isinstance(name, str):
                return None
            return event_key(customer, _id(name, "event_name"))
        except InvalidValue:
            return None


def known_key(source: SourceConfig, row: dict) -> str | None:
    """The key `map_*_row` would give this row, found without checking the rest of it.

    None when only the full mapping can tell (such rows are then mapped). Used to pass over
    rows already on record cheaply: a look-back must not re-validate what it has seen.
    """
    try:
        utc_moment(row.get("event_time"), "event time")
    except InvalidValue:
        return None
    return _key_of_timed_row(source, row)


def _key_of_timed_row(source: SourceConfig, row: dict) -> str | None:
    """known_key for a row whose event time is known to be readable."""
    try:
        customer = id_text(row.get("customer_external_id"), "customer id")
        if source.kind == "signup":
            as_flag(row.get("requires_verification"))
            return event_key(customer, source.event_name)
        name = row.get("event_name")
        if not isinstance(name, str):
            return None
        return event_key(customer, id_text(name, "event_name"))
    except InvalidValue:
        return None


def row_day(row: dict, zone: ZoneInfo) -> date | None:
    """The partition day of a row's event time in the partition zone; None when unreadable."""
    try:
        moment = utc_moment(row.get("event_time"), "event time")
    except InvalidValue:
        return None
    return moment.astimezone(zone).date()


@dataclasses.dataclass
class ReadTally:
    """What one read yielded for one partition and source: its rows, and their event keys."""

    rows: int = 0
    keys: set[str] = dataclasses.field(default_factory=set)


def map_days(source: SourceConfig, frame: pd.DataFrame, days: dict[date, Partition], home: Partition | None,
             known: dict[date, set[str]], tally: dict[date, ReadTally]) -> tuple[dict[date, list[LeadEvent]], int]:
    """Map rows read for several partitions at once, each to the partition of its event time.

    Rows of other days are dropped; a row whose time cannot be read goes to `home` (the run's
    own partition) when given, so that it is audited rather than lost. Rows of a day listed in
    `known` whose key is in that set are passed over unmapped; returns how many were. Every
    row kept is counted in `tally` with its key.
    """
    rule = _rule(source, frame.columns)
    columns = _frame_columns(frame)
    if columns is None:
        return _map_days_by_row(source, frame, rule, days, home, next(iter(days.values())).zone, known, tally)
    return _map_days(_Rows(source, columns, len(frame)), days, home, known, tally)


def map_rows(source: SourceConfig, names: list[str], rows: list[tuple], days: dict[date, Partition],
             home: Partition | None, known: dict[date, set[str]],
             tally: dict[date, ReadTally]) -> tuple[dict[date, list[LeadEvent]], int]:
    """map_days of rows as sources.read_source_rows gives them: the rows of a dtype=object frame
    whose columns are `names`, without building the frame."""
    if len(set(names)) != len(names):  # as a frame: to_dict decides which values count
        return map_days(source, pd.DataFrame(rows, columns=names, dtype=object), days, home, known, tally)
    _rule(source, names)
    columns = {name: [v if v is None or type(v) in _PRESENT else _plain_native(v) for v in values]
               for name, values in zip(names, zip(*rows) if rows else [()] * len(names))}
    return _map_days(_Rows(source, columns, len(rows)), days, home, known, tally)


def _plain_native(value: Any) -> Any:
    """A value of an object column as _frame_columns has it: boxed as to_dict does, absent as None."""
    if type(value) not in _NATIVE:
        value = maybe_box_native(value)
    return None if is_absent(value) else value


def _map_days(rows: _Rows, days: dict[date, Partition], home: Partition | None, known: dict[date, set[str]],
              tally: dict[date, ReadTally]) -> tuple[dict[date, list[LeadEvent]], int]:
    zone = next(iter(days.values())).zone
    moments = rows.moments()
    if getattr(zone, "key", None) in ("UTC", "Etc/UTC"):  # the moments are UTC already
        parts = [home if m.__class__ is str else days.get(m.date()) for m in moments]
    else:
        parts = [home if m.__class__ is str else days.get(m.astimezone(zone).date()) for m in moments]
    passed = 0
    for i, part in enumerate(parts):
        if part is None:
            continue
        count = tally.get(part.day)
        if count is None:
            count = tally[part.day] = ReadTally()
        seen = known.get(part.day)
        if seen is not None:
            key = rows.known_key(i)
            if key in seen:  # on record: passed over unmapped
                passed += 1
                count.rows += 1
                count.keys.add(key)
                parts[i] = None
    out: dict[date, list[LeadEvent]] = {}
    for event in rows.events(parts, moments):
        if event is None:
            continue
        day = event.partition_date
        count = tally[day]
        count.rows += 1
        count.keys.add(event.event_key)
        seen = known.get(day)
        if seen is not None and event.event_key in seen:
            passed += 1
            continue
        found = out.get(day)
        if found is None:
            found = out[day] = []
        found.append(event)
    return out, passed


def _map_days_by_row(source: SourceConfig, frame: pd.DataFrame, rule, days: dict[date, Partition],
                     home: Partition | None, zone: ZoneInfo, known: dict[date, set[str]],
                     tally: dict[date, ReadTally]) -> tuple[dict[date, list[LeadEvent]], int]:
    """map_days one record at a time (a frame whose columns are not unique)."""
    out: dict[date, list[LeadEvent]] = {}
    passed = 0
    for record in frame.to_dict("records"):
        row = _plain_row(record)
        day = row_day(row, zone)
        part = days.get(day) if day is not None else home
        if part is None:
            continue
        seen = known.get(part.day)
        count = tally.setdefault(part.day, ReadTally())
        if seen is not None:
            # Only rows of a look-back day get here, and those had a readable time (row_day).
            key = _key_of_timed_row(source, row)
            if key in seen:
                passed += 1
                count.rows += 1
                count.keys.add(key)
                continue
        event = rule(source, row, part)
        if event is None:
            continue
        count.rows += 1
        count.keys.add(event.event_key)
        if seen is not None and event.event_key in seen:
            passed += 1
            continue
        out.setdefault(part.day, []).append(event)
    return out, passed


_FAR = datetime.max.replace(tzinfo=timezone.utc)


def _rank(event: LeadEvent) -> tuple:
    # Earliest first. Rows of the same moment are told apart by content, never by the
    # order the warehouse happened to return them in: a sendable one first, then the
    # smallest body digest, so that every run keeps the same one.
    return (event.event_time or _FAR, event.status != PENDING, payload_digest(event.payload) or "",
            event.reason or "")


def first_per_key(events: list[LeadEvent]) -> tuple[list[LeadEvent], int]:
    """One event per key (the earliest); also returns how many repeats were folded in."""
    best: dict[str, LeadEvent] = {}
    for event in events:
        kept = best.get(event.event_key)
        if kept is None or _rank(event) < _rank(kept):
            best[event.event_key] = event
    return list(best.values()), len(events) - len(best)

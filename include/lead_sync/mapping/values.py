"""Source values as the API must see them: ids, moments, flags, emails, names and avatars.

Each function takes a value as the warehouse's driver returned it (None, text, numbers,
booleans, dates and datetimes) and returns it cleaned, or raises InvalidValue, whose message is
the audit reason. The common values are decided first, without the general checks that follow
(which agree with them).
"""
from __future__ import annotations

import math
import re
import unicodedata
import uuid
from datetime import date, datetime, time, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email

MAX_TEXT = 255
MAX_URL = 2048
MAX_EMAIL = 320
_SMALL_INT = 10**15  # an int within this renders well inside MAX_TEXT

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0", ""}


class InvalidValue(ValueError):
    """A source value that cannot be put on the wire; the message is the audit reason."""


def _preview(value: Any) -> str:
    """A short, escaped view of a source value for an audit reason."""
    try:
        text = str(value)
    except ValueError:  # e.g. an integer beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    return repr(text[:40])


def is_absent(value: Any) -> bool:
    """NULL: None, or a float NaN (what a float column holds for a missing number).

    A NUMERIC NaN (Decimal) is a value, and refused as one: it is not a number an id or a
    flag can be.
    """
    return value is None or (isinstance(value, float) and math.isnan(value))


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


def _plain_text(value: Any, limit: int) -> str | None:
    """A string that needs no check beyond this one, stripped; None when check_text decides."""
    if type(value) is str:
        text = value.strip()
        if text and len(text) <= limit and text.isprintable():
            return text
    return None


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
    kind = type(value)
    if kind is str:
        text = _plain_text(value, MAX_TEXT)
        return text if text is not None else check_text(value, what)
    if kind is int and -_SMALL_INT < value < _SMALL_INT:
        return str(value)
    if is_absent(value):
        raise InvalidValue(f"no {what}")
    if isinstance(value, bool):
        raise InvalidValue(f"{what} is a boolean, not an identifier")
    if isinstance(value, int):
        return _integer_text(value, what)
    if isinstance(value, float):
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
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, date):
            moment = datetime.combine(value, time(0))
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


def event_moment(value: Any) -> datetime | str:
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


def as_flag(value: Any) -> bool:
    """requires_verification: null is false; booleans, 0/1 and true/false words accepted."""
    if value is None:
        return False
    if type(value) is bool:
        return value
    if is_absent(value):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
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
    if value is None:
        return None
    text = _plain_text(value, MAX_EMAIL)
    if text is None:
        text = _optional_text(value, "customerEmail", MAX_EMAIL)
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
    if value is None:
        return None
    text = _plain_text(value, MAX_TEXT)
    if text is not None:
        return text
    if isinstance(value, str) and not value.strip():
        return None  # a blank name is no name
    return _optional_text(value, "customerName")

"""The rules of each source kind (contract section 4): a signup row is event 1, non-deferred or
deferred; a verification row is event 2. What is sent, what is skipped and why, lives here.
"""
from __future__ import annotations

import warnings
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Iterator

from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED, LeadEvent
from lead_sync.mapping.payloads import event_key, row_key
from lead_sync.mapping.values import (
    InvalidValue,
    as_flag,
    avatar_or_none,
    email_or_none,
    event_moment,
    id_text,
    is_absent,
    name_or_none,
)
from lead_sync.read.config import SourceConfig
from lead_sync.read.partition import Partition

SIGNUP_COLUMNS = ("customer_external_id", "click_id", "event_time")
VERIFICATION_COLUMNS = ("customer_external_id", "event_name", "event_time")

# Types whose values are never absent (is_absent): kept as the driver returned them.
_PRESENT = frozenset({str, int, bool, datetime, date, Decimal})


class SourceShapeError(ValueError):
    """A source query did not return the columns its kind needs."""


def _skipped(source: SourceConfig, partition: Partition, tracking: str, row: dict, reason: str,
             customer: str | None = None, name: str | None = None, moment: datetime | None = None) -> LeadEvent:
    key = event_key(customer, name) if customer and name else row_key(source.name, row)
    return LeadEvent(key, source.name, partition.day, tracking, SKIPPED, None,
                     customer_external_id=customer, event_name=name, event_time=moment, reason=reason)


class SourceRows:
    """A chunk of one source's rows, column by column, and the rules of the source's kind."""

    def __init__(self, source: SourceConfig, names: list[str], rows: list[tuple]):
        """`names`: the query's column names (lowercased); `rows`: its rows, values as the driver
        returned them. A NULL (is_absent) is None from here on, also in a skipped row's key."""
        needed = SIGNUP_COLUMNS if source.kind == "signup" else VERIFICATION_COLUMNS
        missing = [c for c in needed if c not in names]
        if missing:
            raise SourceShapeError(f"source {source.name!r}: its SQL must return column(s) {', '.join(missing)}")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            warnings.warn(f"source {source.name!r}: its SQL returns column(s) {', '.join(twice)} more than once;"
                          " the last of each is read", UserWarning, stacklevel=2)
        # A name given twice keeps its last column (the dict keeps the later one).
        self.columns: dict[str, list] = {
            name: [v if v is None or type(v) in _PRESENT else (None if is_absent(v) else v) for v in values]
            for name, values in zip(names, zip(*rows) if rows else [()] * len(names))}
        self.source = source
        absent = [None] * len(rows)
        get = self.columns.get
        self.times = get("event_time", absent)
        self.customers = get("customer_external_id", absent)
        self.clicks = get("click_id", absent)
        self.flags = get("requires_verification", absent)
        self.names = get("customer_name", absent)
        self.emails = get("customer_email", absent)
        self.avatars = get("customer_avatar", absent)
        self.event_names = get("event_name", absent)
        self.signup = source.kind == "signup"

    def row(self, i: int) -> dict:
        return {name: values[i] for name, values in self.columns.items()}

    def moments(self) -> list[datetime | str]:
        """Each row's event time (utc_moment), or the reason it has none."""
        return [event_moment(value) for value in self.times]

    def known_key(self, i: int) -> str | None:
        """The key row i's event has, found without checking the rest of the row; None when only
        its rules can tell. For a row whose event time is readable (moments): a look-back passes
        over rows already on record by their key, without validating them again."""
        try:
            customer = id_text(self.customers[i], "customer id")
            if self.signup:
                as_flag(self.flags[i])  # a row with a bad flag is skipped under its row key
                return event_key(customer, self.source.event_name)
            name = self.event_names[i]
            if not isinstance(name, str):
                return None
            return event_key(customer, id_text(name, "event_name"))
        except InvalidValue:
            return None

    def events(self, parts: list[Partition | None], moments: list[datetime | str]) -> list[LeadEvent | None]:
        """Each row's event for its partition: None for a row without one, or whose event time
        falls outside it; skipped, with the reason, when the row cannot be sent."""
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
                # The query returned it for this partition: audited here rather than lost.
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
            try:
                deferred = as_flag(flags[i])
            except InvalidValue as exc:
                append(_skipped(source, part, NON_DEFERRED, self.row(i), str(exc), moment=moment))
                continue
            tracking = DEFERRED_START if deferred else NON_DEFERRED
            try:
                customer = id_text(customers[i], "customer id")
            except InvalidValue as exc:
                append(_skipped(source, part, tracking, self.row(i), str(exc), moment=moment))
                continue
            try:
                click = id_text(clicks[i], "click_id")
            except InvalidValue as exc:
                # Named: it holds its customer's event key, so that a later repeat counts against it.
                append(_skipped(source, part, tracking, self.row(i), str(exc), customer, name, moment))
                continue
            payload: dict[str, Any] = {"eventName": name, "customerExternalId": customer, "clickId": click}
            if deferred:
                payload["mode"] = "deferred"
            payload["timestamp"] = moment.isoformat().replace("+00:00", "Z")  # moments are UTC
            # An optional field that cannot be sent is left out, with a note; the event still goes.
            notes = []
            try:
                person = name_or_none(names[i])
                if person is not None:
                    payload["customerName"] = person
            except InvalidValue as exc:
                notes.append(f"customerName left out: {exc}")
            try:
                email = email_or_none(emails[i])
                if email is not None:
                    payload["customerEmail"] = email
            except InvalidValue as exc:
                notes.append(f"customerEmail left out: {exc}")
            avatar = avatars[i]
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
            try:
                customer = id_text(customers[i], "customer id")
            except InvalidValue as exc:
                append(_skipped(source, part, DEFERRED_CONFIRM, self.row(i), str(exc), moment=moment))
                continue
            name = event_names[i]
            try:
                if not isinstance(name, (str, type(None))):
                    raise InvalidValue("event_name is not text")
                name = id_text(name, "event_name")
            except InvalidValue as exc:
                append(_skipped(source, part, DEFERRED_CONFIRM, self.row(i), str(exc), moment=moment))
                continue
            payload = {"eventName": name, "customerExternalId": customer,
                       "timestamp": moment.isoformat().replace("+00:00", "Z")}  # moments are UTC
            append(LeadEvent(event_key(customer, name), source.name, part.day, DEFERRED_CONFIRM, PENDING, payload,
                             customer, name, moment, None, []))
        return out

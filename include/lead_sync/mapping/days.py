"""Rows read for several days at once, sorted into the partition of each row's event time;
the look-back's passing over what is on record, and one event per key."""
from __future__ import annotations

import dataclasses
from datetime import date, datetime, timezone

from lead_sync.events import PENDING, LeadEvent
from lead_sync.mapping.payloads import payload_digest
from lead_sync.mapping.rules import SourceRows
from lead_sync.read.config import SourceConfig
from lead_sync.read.partition import Partition


@dataclasses.dataclass
class ReadTally:
    """What one read yielded for one partition and source: its rows, and their event keys."""

    rows: int = 0
    keys: set[str] = dataclasses.field(default_factory=set)


def _local_day(moment: datetime, zone) -> date | None:
    """The moment's day in `zone`; None past the calendar's ends (year 1 or 9999 shifted out of range),
    which is no partition's day."""
    try:
        return moment.astimezone(zone).date()
    except OverflowError:
        return None


def map_rows(source: SourceConfig, names: list[str], rows: list[tuple], days: dict[date, Partition],
             home: Partition | None, known: dict[date, set[str]],
             tally: dict[date, ReadTally]) -> tuple[dict[date, list[LeadEvent]], int]:
    """Map rows read for several partitions at once (as sources.read_source_rows gives them: the
    column names and the rows), each to the partition of its event time.

    Rows of other days are dropped; a row whose time cannot be read goes to `home` (the run's
    own partition) when given, so that it is audited rather than lost. Rows of a day listed in
    `known` whose key is in that set are passed over unmapped; returns the events per day, and
    how many rows were passed over. Every row kept is counted in `tally` with its key.
    """
    chunk = SourceRows(source, names, rows)
    zone = next(iter(days.values())).zone
    moments = chunk.moments()
    if getattr(zone, "key", None) in ("UTC", "Etc/UTC"):  # the moments are UTC already
        parts = [home if m.__class__ is str else days.get(m.date()) for m in moments]
    else:
        parts = [home if m.__class__ is str else days.get(_local_day(m, zone)) for m in moments]
    passed = 0
    for i, part in enumerate(parts):
        if part is None:
            continue
        count = tally.get(part.day)
        if count is None:
            count = tally[part.day] = ReadTally()
        seen = known.get(part.day)
        if seen is not None:
            # Only look-back days are in `known`, never `home`: this row's time is readable.
            key = chunk.known_key(i)
            if key in seen:  # on record: passed over unmapped
                passed += 1
                count.rows += 1
                count.keys.add(key)
                parts[i] = None
    out: dict[date, list[LeadEvent]] = {}
    for event in chunk.events(parts, moments):
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

"""Source rows as the warehouse's driver returns them, and what map_rows makes of them.

Rows are dicts here; they reach map_rows as read_source_rows gives them: the column names and
one tuple per row. Payloads are compared as whole dicts, so an extra, missing or null field
fails a test.
"""
from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

from lead_sync.events import LeadEvent
from lead_sync.mapping.days import map_rows
from lead_sync.read.config import SourceConfig
from lead_sync.read.partition import Partition

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


def as_read(rows: list[dict], columns: list[str]) -> list[tuple]:
    """The rows as read_source_rows yields them for a query returning `columns`."""
    return [tuple(r.get(c) for c in columns) for r in rows]


def map_chunk(source: SourceConfig, rows: list[dict], columns: list[str],
              partition: Partition = PART) -> list[LeadEvent]:
    """One partition's read (no look-back): its events in row order. A row whose time cannot be
    read stays with the partition, as the run's own partition keeps it."""
    events, passed = map_rows(source, list(columns), as_read(rows, columns), {partition.day: partition}, partition,
                              {}, {})
    assert passed == 0 and set(events) <= {partition.day}
    return events.get(partition.day, [])


def map_signups(*rows: dict, partition: Partition = PART) -> list[LeadEvent]:
    return map_chunk(SIGNUPS, list(rows), SIGNUP_COLS, partition)


def map_verifications(*rows: dict, partition: Partition = PART) -> list[LeadEvent]:
    return map_chunk(VERIFICATIONS, list(rows), VERIFICATION_COLS, partition)


def one(events: list[LeadEvent]) -> LeadEvent:
    assert len(events) == 1, events
    return events[0]


def plain(customer: str = "42", **extra) -> dict:
    """The non-deferred event 1 body for the default signup row."""
    return {"eventName": "signup_started", "customerExternalId": customer, "clickId": "clk_1",
            "timestamp": "2026-11-27T08:00:00Z", **extra}

"""The event-2 rule: a deferred event 2 (the confirmation) is sent only after its event 1.

An event 2 waits while its customer's event 1 is not delivered, up to `wait_days` from when the
event 2 was first recorded; it is skipped when the wait is over, or when the customer's only
signup on record is non-deferred (there is no event 1 to confirm).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.engine import Connection

from lead_sync.db.keys import among, key_chunks
from lead_sync.db.schema import deliveries
from lead_sync.events import DEFERRED_START, DELIVERED, EVENT_ONE, NON_DEFERRED, SKIPPED, LeadEvent


@dataclass
class Judge:
    """How a deferred event 2 stands against its event 1."""

    wait_days: float
    now: datetime

    def __call__(self, event: LeadEvent, firsts: list[dict], created_at: datetime | None) -> None:
        """Set a pending event 2's status and reason, given its customer's event 1s on record
        (`firsts`, see first_events_by_customer) and when it was recorded (None: not yet)."""
        starts = [r for r in firsts if r["tracking"] == DEFERRED_START]
        if any(r["status"] == DELIVERED for r in starts):
            event.reason = None
            return
        if not starts and any(r["tracking"] == NON_DEFERRED for r in firsts):
            event.status, event.reason = SKIPPED, "the customer's signup was non-deferred: no event 1 to confirm"
            return
        waited = self.now - (created_at or self.now)
        if waited > timedelta(days=self.wait_days):
            state = ", ".join(sorted({r["status"] for r in starts})) or "not on record"
            event.status = SKIPPED
            event.reason = f"event 1 not delivered after {self.wait_days:g} days of waiting (event 1: {state})"
            return
        event.reason = "waiting for event 1 to be delivered" if starts else "waiting for event 1 (not on record yet)"


def first_events_by_customer(conn: Connection, customers: Sequence[str]) -> dict[str, list[dict]]:
    """The event 1s on record of these customers (tracking and status of each), by customer."""
    found: dict[str, list[dict]] = {}
    for chunk in key_chunks(conn, list(customers)):
        query = select(deliveries.c.customer_external_id, deliveries.c.tracking, deliveries.c.status).where(
            among(conn, deliveries.c.customer_external_id, chunk), deliveries.c.tracking.in_(EVENT_ONE)
        )
        for row in conn.execute(query).mappings():
            found.setdefault(row["customer_external_id"], []).append(dict(row))
    return found

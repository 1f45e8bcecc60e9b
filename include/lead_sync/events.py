"""The lead event as the pipeline carries it between stages, and its vocabularies."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

# tracking
NON_DEFERRED = "non_deferred"
DEFERRED_START = "deferred_start"
DEFERRED_CONFIRM = "deferred_confirm"
EVENT_ONE = (NON_DEFERRED, DEFERRED_START)

# status
PENDING = "pending"
DELIVERED = "delivered"
REJECTED = "rejected"
FAILED = "failed"
SKIPPED = "skipped"
STATUSES = (PENDING, DELIVERED, REJECTED, FAILED, SKIPPED)
# `pending` is open: every sender works on it. `failed` (gave up) is final for automatic
# runs; a run of the event's own partition re-opens it.


@dataclass(slots=True)
class LeadEvent:
    event_key: str
    source: str
    partition_date: date
    tracking: str
    status: str  # PENDING (to send) or SKIPPED, as mapped
    payload: dict | None  # the JSON body to send; None when skipped before a body exists
    customer_external_id: str | None = None
    event_name: str | None = None
    event_time: datetime | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

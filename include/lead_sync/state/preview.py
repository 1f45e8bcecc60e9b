"""A dry run's findings: what recording each event would do, and which of them a real run would send now."""
from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import delete, insert
from sqlalchemy.engine import Engine

from lead_sync.db.keys import chunks
from lead_sync.db.schema import dry_run_events
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, PENDING, LeadEvent
from lead_sync.mapping.payloads import redact

_BODY_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False), built once


@dataclass
class Preview:
    """What recording an event would do (a dry run): its status after, and whether a sender would take it now."""

    event: LeadEvent
    status: str
    reason: str | None
    due: bool


def record_preview(engine: Engine, run_id: str, preview: list[Preview]) -> int:
    """Store what a dry run found; returns how many events a real run would send now.

    A real run sends a pending, due event 1; and an event 2 whose event 1 is delivered, or
    is among those it would send first (the sender sends event 1s, then event 2s).
    """
    firsts = {(p.event.customer_external_id) for p in preview
              if p.event.tracking == DEFERRED_START and p.status == PENDING and p.due}
    rows = []
    for p in preview:
        event = p.event
        send = p.status == PENDING and p.due
        if send and event.tracking == DEFERRED_CONFIRM:
            send = p.reason is None or event.customer_external_id in firsts  # no reason: event 1 is delivered
        payload = redact(event.payload)
        rows.append(dict(run_id=run_id, event_key=event.event_key, partition_date=event.partition_date,
                         source=event.source, customer_external_id=event.customer_external_id,
                         event_name=event.event_name, tracking=event.tracking, status=p.status, would_send=send,
                         reason=p.reason, payload=None if payload is None else _BODY_JSON.encode(payload)))
    with engine.begin() as conn:
        conn.execute(delete(dry_run_events).where(dry_run_events.c.run_id == run_id))
        for chunk in chunks(rows):
            conn.execute(insert(dry_run_events), list(chunk))
    return sum(r["would_send"] for r in rows)

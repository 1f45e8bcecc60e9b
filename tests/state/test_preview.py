"""A dry run's findings on real warehouses: one row per event, its body redacted, and which events
a real run would send now (an event 2 only with its event 1 delivered or sent first)."""
from __future__ import annotations

import json
from datetime import date

from sqlalchemy import select

from lead_sync.db.schema import dry_run_events, ensure_schema
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED, LeadEvent
from lead_sync.mapping.payloads import redact
from lead_sync.state.preview import Preview, record_preview

DAY = date(2026, 11, 27)


def planned(key: str, tracking: str, customer: str, status: str = PENDING, *, due: bool = True,
            reason: str | None = None) -> Preview:
    payload = {"customerExternalId": customer, "customerName": "Zoë Ward", "customerEmail": "zoe@example.com"}
    event = LeadEvent(key, "signups", DAY, tracking, status, payload, customer, "e")
    return Preview(event, status, reason, due)


def stored(engine, run_id: str) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["event_key"]: dict(r) for r in conn.execute(
            select(dry_run_events).where(dry_run_events.c.run_id == run_id)).mappings()}


def test_a_preview_says_what_a_real_run_would_send_now(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    preview = [
        planned("one", NON_DEFERRED, "1"),  # sent
        planned("later", NON_DEFERRED, "2", due=False),  # retried later
        planned("skip", NON_DEFERRED, "3", SKIPPED, due=False, reason="no click id"),
        planned("start", DEFERRED_START, "4"), planned("confirm", DEFERRED_CONFIRM, "4", reason="waiting"),  # both
        planned("confirmed", DEFERRED_CONFIRM, "5"),  # no reason: its event 1 is delivered
        planned("start later", DEFERRED_START, "6", due=False),
        planned("waits", DEFERRED_CONFIRM, "6", reason="waiting for event 1 to be delivered"),
    ]
    assert record_preview(engine, "dry-1", preview) == 4
    rows = stored(engine, "dry-1")
    assert {k for k, r in rows.items() if r["would_send"]} == {"one", "start", "confirm", "confirmed"}
    assert rows["skip"]["status"] == SKIPPED and rows["skip"]["reason"] == "no click id"
    assert json.loads(rows["one"]["payload"]) == redact(preview[0].event.payload)  # names and emails hashed


def test_a_run_recording_its_preview_again_replaces_it_and_leaves_other_runs(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    record_preview(engine, "dry-1", [planned("a", NON_DEFERRED, "1"), planned("b", NON_DEFERRED, "2")])
    record_preview(engine, "dry-2", [planned("a", NON_DEFERRED, "1")])
    assert record_preview(engine, "dry-1", [planned("c", NON_DEFERRED, "3", due=False)]) == 0
    assert set(stored(engine, "dry-1")) == {"c"} and set(stored(engine, "dry-2")) == {"a"}

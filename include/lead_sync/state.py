"""Recording what a run mapped: new events, re-evaluated open ones, re-opened failed ones.

The audit row of an event is its state (sending it is `claims`). Every write here is a
short transaction, so a run that dies at any point leaves a state the next run can resume from.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Iterable, Iterator, Sequence

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from .audit import deliveries, dry_run_events, outbox, source_reads
from .clock import as_utc, utcnow
from .events import (
    DEFERRED_CONFIRM,
    DEFERRED_START,
    DELIVERED,
    EVENT_ONE,
    FAILED,
    NON_DEFERRED,
    PENDING,
    REJECTED,
    SKIPPED,
    LeadEvent,
)
from .mapping import payload_digest, redact

CHUNK = 500


def _chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _dump(payload: dict | None) -> str | None:
    return None if payload is None else json.dumps(payload, ensure_ascii=False, sort_keys=False)


def open_partition_days(engine: Engine, sources: Iterable[str]) -> set[date]:
    """Partitions holding events that earlier runs left pending (`failed` is final: not these)."""
    query = (
        select(deliveries.c.partition_date)
        .where(deliveries.c.status == PENDING, deliveries.c.source.in_(list(sources)))
        .distinct()
    )
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(query)}


def recorded_keys(engine: Engine, day: date, among: Sequence[str] | None = None) -> dict[str, str]:
    """Events on record for a partition, whatever their status (only those `among` these keys,
    when given): key -> source."""
    query = select(deliveries.c.event_key, deliveries.c.source).where(deliveries.c.partition_date == day)
    with engine.connect() as conn:
        if among is None:
            return dict(conn.execute(query).all())
        found: dict[str, str] = {}
        for chunk in _chunks(list(among)):
            found.update(conn.execute(query.where(deliveries.c.event_key.in_(chunk))).all())
        return found


def _load(conn: Connection, keys: Sequence[str]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for chunk in _chunks(list(keys)):
        for row in conn.execute(select(deliveries).where(deliveries.c.event_key.in_(chunk))).mappings():
            rows[row["event_key"]] = dict(row)
    return rows


@dataclass
class Judge:
    """How a deferred event 2 stands against its event 1."""

    wait_days: float
    now: datetime

    def __call__(self, event: LeadEvent, firsts: list[dict], created_at: datetime | None) -> None:
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


def _first_events_by_customer(conn: Connection, customers: Sequence[str]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for chunk in _chunks(list(customers)):
        query = select(deliveries.c.customer_external_id, deliveries.c.tracking, deliveries.c.status).where(
            deliveries.c.customer_external_id.in_(chunk), deliveries.c.tracking.in_(EVENT_ONE)
        )
        for row in conn.execute(query).mappings():
            found.setdefault(row["customer_external_id"], []).append(dict(row))
    return found


def _put_outbox(conn: Connection, bodies: dict[str, str]) -> None:
    keys = list(bodies)
    for chunk in _chunks(keys):
        conn.execute(delete(outbox).where(outbox.c.event_key.in_(chunk)))
    if keys:
        conn.execute(insert(outbox), [{"event_key": k, "body": b} for k, b in bodies.items()])


def _drop_outbox(conn: Connection, keys: Sequence[str]) -> None:
    for chunk in _chunks(list(keys)):
        conn.execute(delete(outbox).where(outbox.c.event_key.in_(chunk)))


@dataclass
class Preview:
    """What recording an event would do (a dry run): its status after, and whether a sender would take it now."""

    event: LeadEvent
    status: str
    reason: str | None
    due: bool


def _apply(conn: Connection, events: list[LeadEvent], existing: dict[str, dict], run_id: str,
           now: datetime, counts: Counter, reopen: bool, preview: list[Preview] | None = None) -> None:
    """Record events against their rows on record; with `preview`, only say what it would do."""
    inserts, updates, bodies, dropped = [], [], {}, []
    for event in events:
        row = existing.get(event.event_key)
        if row is not None and preview is not None:
            kept = Preview(event, row["status"], row["reason"], False)
        digest = payload_digest(event.payload)
        fields = {
            "source": event.source,
            "tracking": event.tracking,
            "customer_external_id": event.customer_external_id,
            "event_name": event.event_name,
            "reason": event.reason,
            "notes": "; ".join(event.notes) or None,
            "payload": _dump(redact(event.payload)),
            "payload_sha256": digest,
            "event_time": event.event_time,
            "updated_at": now,
            "last_run_id": run_id,
        }
        if row is None:
            inserts.append({**fields, "event_key": event.event_key, "partition_date": event.partition_date,
                            "status": event.status, "attempts": 0, "created_at": now})
            counts["new"] += 1
            if preview is not None:
                preview.append(Preview(event, event.status, event.reason, event.status == PENDING))
        elif row["status"] == DELIVERED:
            counts["already_delivered"] += 1
            if preview is not None:
                preview.append(kept)
            continue
        elif row["partition_date"] != event.partition_date:
            counts["repeats"] += 1  # the same customer and event name, recorded under another day
            if preview is not None:
                preview.append(Preview(event, "repeat", "recorded under another day", False))
            continue
        elif as_utc(row["inflight_until"]) is not None:
            counts["in_flight"] += 1  # a sender holds it; its outcome decides
            if preview is not None:
                preview.append(kept)
            continue
        elif row["status"] == REJECTED and row["payload_sha256"] == digest:
            counts["still_rejected"] += 1
            if preview is not None:
                preview.append(kept)
            continue
        elif row["status"] == FAILED and not reopen:
            counts["failed_final"] += 1  # gave up: only a run of its own partition re-opens it
            if preview is not None:
                preview.append(kept)
            continue
        else:
            retry = {"retry_since": row["retry_since"], "next_attempt_at": row["next_attempt_at"]}
            if event.status == PENDING and row["status"] == FAILED:
                fields["reason"] = f"re-opened by run {run_id} of partition {event.partition_date}: to be sent again"
                retry["retry_since"] = None  # a fresh give_up_after_hours
                counts["reopened"] += 1
            elif event.status == PENDING and row["status"] == REJECTED:
                fields["reason"] = "source row changed since the rejection: to be sent again"
            if reopen:
                retry["next_attempt_at"] = None  # a run of its own partition sends it now
            fields.update(retry)
            updates.append({**fields, "b_key": event.event_key, "status": event.status})
            counts["reevaluated"] += 1
            if preview is not None:
                later = as_utc(retry["next_attempt_at"])
                preview.append(Preview(event, event.status, fields["reason"],
                                       event.status == PENDING and (later is None or later <= now)))
        if event.status == PENDING:
            bodies[event.event_key] = json.dumps(event.payload, ensure_ascii=False)
        else:
            dropped.append(event.event_key)
    if preview is not None:
        return
    if inserts:
        conn.execute(insert(deliveries), inserts)
    if updates:
        conn.execute(deliveries.update().where(deliveries.c.event_key == bindparam("b_key")), updates)
    _put_outbox(conn, bodies)
    _drop_outbox(conn, dropped)


def reconcile(engine: Engine, events: list[LeadEvent], day: date, sources: Iterable[str], run_id: str,
              wait_days: float, now: datetime | None = None, *, reopen: bool = False,
              close_missing: bool = True, preview: list[Preview] | None = None) -> Counter:
    """Record one partition's mapped events against what is already on record.

    Delivered events are never touched again; a rejected one is reopened only when its
    body changed; a failed one only when `reopen` (a run of its own partition); everything
    else is re-evaluated from the rows just read. With `close_missing`, pending events of
    this partition that the warehouse no longer yields are closed as skipped (only when
    the events given are all of the partition's rows, not a look-back's new ones).
    With `preview` (a dry run) nothing is written: what each event would become is appended.
    """
    now = now or utcnow()
    counts: Counter = Counter()
    firsts = [e for e in events if e.tracking != DEFERRED_CONFIRM]
    confirms = [e for e in events if e.tracking == DEFERRED_CONFIRM]
    with engine.begin() as conn:
        existing = _load(conn, [e.event_key for e in events])
        _apply(conn, firsts, existing, run_id, now, counts, reopen, preview)
        judge = Judge(wait_days, now)
        waiting = [e for e in confirms if e.status == PENDING]
        by_customer = _first_events_by_customer(conn, sorted({e.customer_external_id for e in waiting}))
        if preview is not None:  # event 1s a real run would have recorded by now
            for planned in preview:
                if planned.event.tracking in EVENT_ONE and planned.event.event_key not in existing:
                    by_customer.setdefault(planned.event.customer_external_id, []).append(
                        {"tracking": planned.event.tracking, "status": planned.status})
        for event in waiting:
            row = existing.get(event.event_key)
            judge(event, by_customer.get(event.customer_external_id, []), as_utc(row["created_at"]) if row else None)
        _apply(conn, confirms, existing, run_id, now, counts, reopen, preview)
        if close_missing and preview is None:
            counts["closed_missing"] += _close_missing(conn, day, list(sources), {e.event_key for e in events},
                                                       run_id, now)
    return counts


def _close_missing(conn: Connection, day: date, sources: list[str], seen: set[str], run_id: str,
                   now: datetime) -> int:
    query = select(deliveries.c.event_key).where(
        deliveries.c.partition_date == day,
        deliveries.c.source.in_(sources),
        deliveries.c.status == PENDING,
        deliveries.c.inflight_until.is_(None),
    )
    gone = [k for (k,) in conn.execute(query) if k not in seen]
    for chunk in _chunks(gone):
        conn.execute(
            update(deliveries)
            .where(deliveries.c.event_key.in_(chunk))
            .values(status=SKIPPED, reason="its source row is no longer in the warehouse for this day",
                    updated_at=now, last_run_id=run_id)
        )
    _drop_outbox(conn, gone)
    return len(gone)


def record_reads(engine: Engine, reads: list[dict]) -> None:
    """What a run read, per partition and source (the reconciliation view's source rows)."""
    if reads:
        with engine.begin() as conn:
            conn.execute(insert(source_reads), reads)


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
        rows.append(dict(run_id=run_id, event_key=event.event_key, partition_date=event.partition_date,
                         source=event.source, customer_external_id=event.customer_external_id,
                         event_name=event.event_name, tracking=event.tracking, status=p.status, would_send=send,
                         reason=p.reason, payload=_dump(redact(event.payload))))
    with engine.begin() as conn:
        conn.execute(delete(dry_run_events).where(dry_run_events.c.run_id == run_id))
        for chunk in _chunks(rows):
            conn.execute(insert(dry_run_events), list(chunk))
    return sum(r["would_send"] for r in rows)

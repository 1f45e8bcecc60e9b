"""Event state in the warehouse: recording what a run mapped, and each send's outcome.

The audit row of an event is its state. Every write here is a short transaction, so a
run that dies at any point leaves a state the next run can resume from.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Iterator, Sequence

from sqlalchemy import bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from .audit import attempts, deliveries, outbox
from .events import (
    DEFERRED_CONFIRM,
    DEFERRED_START,
    DELIVERED,
    EVENT_ONE,
    FAILED,
    NON_DEFERRED,
    OPEN_STATUSES,
    PENDING,
    REJECTED,
    SKIPPED,
    LeadEvent,
)
from .mapping import payload_digest, redact
from .retry import UNKNOWN

CHUNK = 500
RESPONSE_CHARS = 1000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; everything stored is UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _dump(payload: dict | None) -> str | None:
    return None if payload is None else json.dumps(payload, ensure_ascii=False, sort_keys=False)


def open_partition_days(engine: Engine, sources: Iterable[str]) -> set[date]:
    """Partitions holding events that earlier runs left pending or failed."""
    query = (
        select(deliveries.c.partition_date)
        .where(deliveries.c.status.in_(OPEN_STATUSES), deliveries.c.source.in_(list(sources)))
        .distinct()
    )
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(query)}


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


def _apply(conn: Connection, events: list[LeadEvent], existing: dict[str, dict], run_id: str,
           now: datetime, counts: Counter) -> None:
    inserts, updates, bodies, dropped = [], [], {}, []
    for event in events:
        row = existing.get(event.event_key)
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
        elif row["status"] == DELIVERED:
            counts["already_delivered"] += 1
            continue
        elif row["partition_date"] != event.partition_date:
            counts["repeats"] += 1  # the same customer and event name, recorded under another day
            continue
        elif as_utc(row["inflight_until"]) is not None:
            counts["in_flight"] += 1  # a sender holds it; its outcome decides
            continue
        elif row["status"] == REJECTED and row["payload_sha256"] == digest:
            counts["still_rejected"] += 1
            continue
        else:
            status = event.status
            if status == PENDING and row["status"] == FAILED:
                status = FAILED  # stays failed until a send succeeds
                fields["reason"] = event.reason or row["reason"]
            elif status == PENDING and row["status"] == REJECTED:
                fields["reason"] = "source row changed since the rejection: to be sent again"
            updates.append({**fields, "b_key": event.event_key, "status": status})
            counts["reevaluated"] += 1
        if event.status == PENDING:
            bodies[event.event_key] = json.dumps(event.payload, ensure_ascii=False)
        else:
            dropped.append(event.event_key)
    if inserts:
        conn.execute(insert(deliveries), inserts)
    if updates:
        conn.execute(deliveries.update().where(deliveries.c.event_key == bindparam("b_key")), updates)
    _put_outbox(conn, bodies)
    _drop_outbox(conn, dropped)


def reconcile(engine: Engine, events: list[LeadEvent], day: date, sources: Iterable[str], run_id: str,
              wait_days: float, now: datetime | None = None) -> Counter:
    """Record one partition's mapped events against what is already on record.

    Delivered events are never touched again; a rejected one is reopened only when its
    body changed; everything else is re-evaluated from the rows just read. Open events
    of this partition that the warehouse no longer yields are closed as skipped.
    """
    now = now or utcnow()
    counts: Counter = Counter()
    firsts = [e for e in events if e.tracking != DEFERRED_CONFIRM]
    confirms = [e for e in events if e.tracking == DEFERRED_CONFIRM]
    with engine.begin() as conn:
        existing = _load(conn, [e.event_key for e in events])
        _apply(conn, firsts, existing, run_id, now, counts)
        judge = Judge(wait_days, now)
        waiting = [e for e in confirms if e.status == PENDING]
        by_customer = _first_events_by_customer(conn, sorted({e.customer_external_id for e in waiting}))
        for event in waiting:
            row = existing.get(event.event_key)
            judge(event, by_customer.get(event.customer_external_id, []), as_utc(row["created_at"]) if row else None)
        _apply(conn, confirms, existing, run_id, now, counts)
        counts["closed_missing"] += _close_missing(conn, day, list(sources), {e.event_key for e in events}, run_id, now)
    return counts


def _close_missing(conn: Connection, day: date, sources: list[str], seen: set[str], run_id: str,
                   now: datetime) -> int:
    query = select(deliveries.c.event_key).where(
        deliveries.c.partition_date == day,
        deliveries.c.source.in_(sources),
        deliveries.c.status.in_(OPEN_STATUSES),
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


# --- sending -------------------------------------------------------------------------

def sendable_keys(engine: Engine, confirms: bool, not_tried_since: datetime, limit: int = CHUNK) -> list[str]:
    """Open events with a body to send, no sender on them and no attempt since the given time.

    Oldest first. Event 2 of a deferred flow qualifies only once its event 1 is delivered.
    """
    first = deliveries.alias("first")
    query = (
        select(deliveries.c.event_key)
        .join(outbox, outbox.c.event_key == deliveries.c.event_key)
        .where(
            deliveries.c.status.in_(OPEN_STATUSES),
            deliveries.c.inflight_until.is_(None),
            or_(deliveries.c.last_attempt_at.is_(None), deliveries.c.last_attempt_at < not_tried_since),
        )
        .order_by(deliveries.c.event_time, deliveries.c.event_key)
        .limit(limit)
    )
    if confirms:
        query = query.where(
            deliveries.c.tracking == DEFERRED_CONFIRM,
            exists().where(
                first.c.customer_external_id == deliveries.c.customer_external_id,
                first.c.tracking == DEFERRED_START,
                first.c.status == DELIVERED,
            ),
        )
    else:
        query = query.where(deliveries.c.tracking.in_(EVENT_ONE))
    with engine.connect() as conn:
        return [k for (k,) in conn.execute(query)]


def outbox_body(engine: Engine, key: str) -> dict | None:
    with engine.connect() as conn:
        body = conn.execute(select(outbox.c.body).where(outbox.c.event_key == key)).scalar()
    return None if body is None else json.loads(body)


def claim(engine: Engine, key: str, run_id: str, lease_seconds: float) -> int | None:
    """Take an open event for one request; returns the attempt number, or None if taken or closed."""
    now = utcnow()
    with engine.begin() as conn:
        taken = conn.execute(
            update(deliveries)
            .where(
                deliveries.c.event_key == key,
                deliveries.c.status.in_(OPEN_STATUSES),
                deliveries.c.inflight_until.is_(None),
            )
            .values(
                attempts=deliveries.c.attempts + 1,
                inflight_run_id=run_id,
                inflight_until=now + timedelta(seconds=lease_seconds),
                first_attempt_at=func.coalesce(deliveries.c.first_attempt_at, now),
                last_attempt_at=now,
                last_run_id=run_id,
                updated_at=now,
            )
        ).rowcount
        if taken != 1:
            return None
        return conn.execute(select(deliveries.c.attempts).where(deliveries.c.event_key == key)).scalar_one()


@dataclass
class Outcome:
    """One attempt's result, as the sender decided it."""

    outcome: str  # delivered | rejected | retry | failed | credentials | unknown
    http_status: int | None
    latency_ms: int | None
    error: str | None
    response: str | None
    status: str | None  # new event status, None to keep it open as it is
    reason: str | None
    retry_after: float | None = None  # seconds the API asked us to wait


def record(engine: Engine, key: str, attempt: int, run_id: str, sent_at: datetime, result: Outcome) -> None:
    """Commit one attempt: the append-only attempt row and the event's new state, together."""
    now = utcnow()
    values: dict = {
        "inflight_run_id": None,
        "inflight_until": None,
        "http_status": result.http_status,
        "updated_at": now,
    }
    if result.response is not None:
        values["response"] = result.response[:RESPONSE_CHARS]
    if result.status is not None:
        values["status"] = result.status
        values["reason"] = result.reason
        if result.status == DELIVERED:
            values["delivered_at"] = now
    elif result.reason is not None:
        values["reason"] = result.reason
    with engine.begin() as conn:
        conn.execute(
            insert(attempts).values(
                event_key=key, attempt=attempt, run_id=run_id, sent_at=sent_at, http_status=result.http_status,
                latency_ms=result.latency_ms, outcome=result.outcome, error=result.error,
            )
        )
        conn.execute(update(deliveries).where(deliveries.c.event_key == key).values(**values))
        if result.status in (DELIVERED, REJECTED):
            conn.execute(delete(outbox).where(outbox.c.event_key == key))


def release(engine: Engine, key: str) -> None:
    """Give back a claim whose request was never sent."""
    with engine.begin() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.event_key == key)
            .values(attempts=deliveries.c.attempts - 1, inflight_run_id=None, inflight_until=None)
        )


def recover_abandoned(engine: Engine, run_id: str) -> int:
    """Events whose sender died with a request on the wire: audit the unknown outcome, reopen them."""
    now = utcnow()
    with engine.begin() as conn:
        rows = conn.execute(
            select(deliveries.c.event_key, deliveries.c.attempts, deliveries.c.inflight_run_id,
                   deliveries.c.last_attempt_at)
            .where(deliveries.c.inflight_until.is_not(None), deliveries.c.inflight_until < now)
        ).mappings().all()
        for row in rows:
            conn.execute(
                insert(attempts).values(
                    event_key=row["event_key"], attempt=row["attempts"], run_id=row["inflight_run_id"],
                    sent_at=as_utc(row["last_attempt_at"]) or now, http_status=None, latency_ms=None,
                    outcome=UNKNOWN,
                    error=f"outcome unknown: the sender stopped with this request in flight; "
                          f"found by run {run_id}, the event is sent again",
                )
            )
            conn.execute(
                update(deliveries)
                .where(deliveries.c.event_key == row["event_key"])
                .values(inflight_run_id=None, inflight_until=None, updated_at=now,
                        reason="an earlier request's outcome is unknown (sender stopped); sent again")
            )
    return len(rows)


def next_lease_expiry(engine: Engine) -> datetime | None:
    with engine.connect() as conn:
        return as_utc(conn.execute(
            select(func.min(deliveries.c.inflight_until)).where(deliveries.c.status.in_(OPEN_STATUSES))
        ).scalar())

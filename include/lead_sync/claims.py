"""Sending state: which open events a sender may take, the lease on each request, its outcome.

A claim is a lease (`inflight_until`) on one event for one request, so two senders never
send one event at once and a sender that died with a request on the wire is detected.
Each outcome is committed with its attempt row in one transaction as soon as it is known.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, insert, or_, select, true, update
from sqlalchemy.engine import Engine

from .audit import attempts, deliveries, outbox
from .clock import as_utc, utcnow
from .events import DEFERRED_CONFIRM, DEFERRED_START, DELIVERED, EVENT_ONE, PENDING, REJECTED
from .retry import UNKNOWN

CHUNK = 500
RESPONSE_CHARS = 1000


def _due(now: datetime):
    return or_(deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= now)


def _sendable(confirms: bool, now: datetime, free: object, first_status: tuple[str, ...] = (DELIVERED,)):
    """Pending events with a body to send, due, `free` of senders. Event 2 of a deferred flow
    qualifies only once its event 1 is delivered (`first_status`). `failed` events are final
    here: only a run of their partition re-opens them."""
    first = deliveries.alias("first")
    query = (
        select(deliveries.c.event_key)
        .join(outbox, outbox.c.event_key == deliveries.c.event_key)
        .where(deliveries.c.status == PENDING, free, _due(now))
    )
    if confirms:
        return query.where(
            deliveries.c.tracking == DEFERRED_CONFIRM,
            exists().where(
                first.c.customer_external_id == deliveries.c.customer_external_id,
                first.c.tracking == DEFERRED_START,
                first.c.status.in_(first_status),
            ),
        )
    return query.where(deliveries.c.tracking.in_(EVENT_ONE))


def sendable_keys(engine: Engine, confirms: bool, not_tried_since: datetime, limit: int = CHUNK,
                  now: datetime | None = None) -> list[str]:
    """Event 1s (or event 2s) a sender may take now, oldest first: no sender on them, and no
    attempt since `not_tried_since` (this sender's start)."""
    query = (
        _sendable(confirms, now or utcnow(), deliveries.c.inflight_until.is_(None))
        .where(or_(deliveries.c.last_attempt_at.is_(None), deliveries.c.last_attempt_at < not_tried_since))
        .order_by(deliveries.c.event_time, deliveries.c.event_key)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [k for (k,) in conn.execute(query)]


def count_sendable(engine: Engine, now: datetime | None = None) -> int:
    """Pending events a sender could take now (event 2s only once their event 1 is delivered)."""
    now = now or utcnow()
    free = deliveries.c.inflight_until.is_(None)
    with engine.connect() as conn:
        return sum(conn.execute(select(func.count()).select_from(_sendable(confirms, now, free).subquery())).scalar_one()
                   for confirms in (False, True))


def count_to_send(engine: Engine, now: datetime | None = None) -> int:
    """Events a send starting now would send: what it may take at once or once a lease runs
    out (a sender stopped with it in flight), and the event 2s whose event 1 it is about to send."""
    now = now or utcnow()
    with engine.connect() as conn:
        return sum(conn.execute(select(func.count()).select_from(
            _sendable(confirms, now, true(), (DELIVERED, PENDING)).subquery())).scalar_one() for confirms in (False, True))


def has_sendable(engine: Engine, now: datetime | None = None) -> bool:
    """Whether a sender starting now would send anything: an event it may take, or one whose
    lease ran out (its sender died; it is audited `unknown` and sent again)."""
    now = now or utcnow()
    free = or_(deliveries.c.inflight_until.is_(None), deliveries.c.inflight_until < now)
    with engine.connect() as conn:
        return any(conn.execute(_sendable(confirms, now, free).limit(1)).first() is not None
                   for confirms in (False, True))


def outbox_body(engine: Engine, key: str) -> dict | None:
    with engine.connect() as conn:
        body = conn.execute(select(outbox.c.body).where(outbox.c.event_key == key)).scalar()
    return None if body is None else json.loads(body)


@dataclass(frozen=True)
class Claim:
    attempt: int  # the event's attempt number, over all runs
    retry_since: datetime  # when its retrying began: give_up_after_hours counts from here


def claim(engine: Engine, key: str, run_id: str, lease_seconds: float, sender: str | None = None) -> Claim | None:
    """Take a pending event for one request; None if another sender has it, it closed, or it is
    not due (another run left it open for later since this sender listed it).
    `sender` may take again an event it holds between its retries."""
    now = utcnow()
    free = deliveries.c.inflight_until.is_(None)
    if sender is not None:
        free = or_(free, deliveries.c.inflight_sender == sender)
    with engine.begin() as conn:
        row = conn.execute(
            update(deliveries)
            .where(
                deliveries.c.event_key == key,
                deliveries.c.status == PENDING,
                free,
                _due(now),
            )
            .values(
                attempts=deliveries.c.attempts + 1,
                inflight_run_id=run_id,
                inflight_sender=sender,
                inflight_until=now + timedelta(seconds=lease_seconds),
                first_attempt_at=func.coalesce(deliveries.c.first_attempt_at, now),
                retry_since=func.coalesce(deliveries.c.retry_since, now),
                last_attempt_at=now,
                last_run_id=run_id,
                updated_at=now,
            )
            .returning(deliveries.c.attempts, deliveries.c.retry_since)
        ).first()
    return None if row is None else Claim(row.attempts, as_utc(row.retry_since))


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
    next_attempt_at: datetime | None = None  # left open by this run: no run tries it before then


def settle(engine: Engine, key: str, attempt: int, run_id: str, sent_at: datetime, result: Outcome,
           hold_seconds: float | None = None) -> None:
    """Commit one attempt: the append-only attempt row and the event's new state, together.
    With `hold_seconds`, an event this sender retries in the same run stays held by it meanwhile."""
    now = utcnow()
    values: dict = {
        "inflight_run_id": None,
        "inflight_until": None,
        "inflight_sender": None,
        "http_status": result.http_status,
        "updated_at": now,
    }
    if hold_seconds and result.status is None and result.next_attempt_at is None:
        values.pop("inflight_run_id"), values.pop("inflight_sender")
        values["inflight_until"] = now + timedelta(seconds=hold_seconds)
    if result.response is not None:
        values["response"] = result.response[:RESPONSE_CHARS]
    if result.status is not None:
        values["status"] = result.status
        values["reason"] = result.reason
        values["next_attempt_at"] = None
        if result.status == DELIVERED:
            values["delivered_at"] = now
    else:
        if result.reason is not None:
            values["reason"] = result.reason
        if result.next_attempt_at is not None:
            values["next_attempt_at"] = result.next_attempt_at
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
        # A failed event keeps its body: a rerun of its partition may re-open and send it.


def release(engine: Engine, key: str) -> None:
    """Give back a claim whose request was never sent."""
    with engine.begin() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.event_key == key)
            .values(attempts=deliveries.c.attempts - 1, inflight_run_id=None, inflight_until=None,
                    inflight_sender=None)
        )


def unhold(engine: Engine, key: str, sender: str) -> None:
    """A sender done with an event it held between retries lets it go (its last attempt is settled)."""
    with engine.begin() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.event_key == key, deliveries.c.inflight_sender == sender)
            .values(inflight_run_id=None, inflight_until=None, inflight_sender=None)
        )


def recover_abandoned(engine: Engine, run_id: str) -> int:
    """Events whose sender died with a request on the wire: audit the unknown outcome, reopen them.
    A sender that died between retries held an event whose last attempt is on record: that one is
    only let go."""
    now = utcnow()
    settled = exists().where(attempts.c.event_key == deliveries.c.event_key,
                             attempts.c.attempt == deliveries.c.attempts)
    expired = (deliveries.c.inflight_until.is_not(None), deliveries.c.inflight_until < now)
    with engine.begin() as conn:
        conn.execute(update(deliveries).where(*expired, settled)
                     .values(inflight_run_id=None, inflight_until=None, inflight_sender=None))
        rows = conn.execute(
            select(deliveries.c.event_key, deliveries.c.attempts, deliveries.c.inflight_run_id,
                   deliveries.c.last_attempt_at)
            .where(*expired)
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
                .values(inflight_run_id=None, inflight_until=None, inflight_sender=None, updated_at=now,
                        reason="an earlier request's outcome is unknown (sender stopped); sent again")
            )
    return len(rows)


def next_lease_expiry(engine: Engine) -> datetime | None:
    with engine.connect() as conn:
        return as_utc(conn.execute(
            select(func.min(deliveries.c.inflight_until)).where(deliveries.c.status == PENDING)
        ).scalar())

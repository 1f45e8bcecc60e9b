"""Sending state: which open events a sender may take, the lease on each request, its outcome.

A claim is a lease (`inflight_until`) on one event for one request, so two senders never
send one event at once and a sender that died with a request on the wire is detected.
A sender claims a batch of events in one statement (`claim_many`) and writes the outcomes
of many requests, each with its attempt row, in one transaction (`settle_many`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, Sequence

from sqlalchemy import and_, bindparam, case, delete, exists, func, insert, or_, select, true, update
from sqlalchemy.engine import Connection, Engine

from lead_sync.db.bulk import Ref, insert_rows, unnested, update_each
from lead_sync.db.keys import among, key_chunks
from lead_sync.db.schema import attempts, deliveries, outbox
from lead_sync.clock import as_utc, utcnow
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, DELIVERED, EVENT_ONE, PENDING, REJECTED
from lead_sync.delivery.retry import UNKNOWN

LISTED = 500  # keys sendable_keys lists unless told how many
CLAIM_ROUNDS = 5  # reads of open events per kind and claim, when other senders take them meanwhile
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


def _takeable(confirms: bool, not_tried_since: datetime, limit: int, now: datetime):
    """Event 1s (or event 2s) a sender may take now, oldest first: no sender on them, and no
    attempt since `not_tried_since` (this sender's start)."""
    return (
        _sendable(confirms, now, deliveries.c.inflight_until.is_(None))
        .where(or_(deliveries.c.last_attempt_at.is_(None), deliveries.c.last_attempt_at < not_tried_since))
        .order_by(deliveries.c.event_time, deliveries.c.event_key)
        .limit(limit)
    )


def sendable_keys(engine: Engine, confirms: bool, not_tried_since: datetime, limit: int = LISTED,
                  now: datetime | None = None) -> list[str]:
    """Keys of `_takeable` events (read only: claiming them is `claim_many`)."""
    with engine.connect() as conn:
        return [k for (k,) in conn.execute(_takeable(confirms, not_tried_since, limit, now or utcnow()))]


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


def _bodies(conn: Connection, keys: Sequence[str]) -> dict[str, dict]:
    """The bodies to send of these events, in one query per list of keys (db.keys)."""
    found: dict[str, dict] = {}
    for chunk in key_chunks(conn, list(keys)):
        rows = conn.execute(select(outbox.c.event_key, outbox.c.body).where(among(conn, outbox.c.event_key, chunk)))
        found.update((key, json.loads(body)) for key, body in rows)
    return found


@dataclass(frozen=True)
class Claim:
    attempt: int  # the event's attempt number, over all runs
    retry_since: datetime  # when its retrying began: give_up_after_hours counts from here
    event_key: str = ""
    tracking: str | None = None
    event_time: datetime | None = None


def _claiming(run_id: str, lease_seconds: float, now: datetime, sender: str | None = None) -> dict:
    return dict(
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


def _free(now: datetime, sender: str | None = None):
    """Pending, due and free of senders; `sender` may take again an event it holds between its
    retries. Due is checked again at the claim: another run may have tried an event since this
    sender listed it, and left it open for later."""
    free = deliveries.c.inflight_until.is_(None)
    if sender is not None:
        free = or_(free, deliveries.c.inflight_sender == sender)
    return and_(deliveries.c.status == PENDING, free, _due(now))


_RETURNED = (deliveries.c.event_key, deliveries.c.attempts, deliveries.c.retry_since, deliveries.c.tracking,
             deliveries.c.event_time)


def _claims(rows) -> list[Claim]:
    return [Claim(r.attempts, as_utc(r.retry_since), r.event_key, r.tracking, as_utc(r.event_time)) for r in rows]


@dataclass
class Claimed:
    """What one `claim_many` took: the claims (oldest first), and which kinds ran short."""

    claims: list[Claim]
    firsts_short: bool = False  # fewer event 1s than asked for were free: none is left for this sender
    confirms_short: bool = False  # likewise event 2s (more may qualify once event 1s are delivered)
    bodies: dict[str, dict] = field(default_factory=dict)  # of the events taken new (not `keys`)


def claim_many(engine: Engine, run_id: str, lease_seconds: float, not_tried_since: datetime, *,
               keys: Sequence[str] = (), new: int = 0, firsts: bool = True, confirms: bool = True,
               firsts_limit: int | None = None, sender: str | None = None,
               now: datetime | None = None) -> Claimed:
    """Take events for one request each, in one transaction: `keys` (events this sender tries
    again), then up to `new` events not tried since `not_tried_since`, event 1s first (at most
    `firsts_limit` of them), then the event 2s whose event 1 is delivered. Each kind is one
    `SELECT ... LIMIT n` of keys, which PostgreSQL runs `FOR UPDATE SKIP LOCKED` (senders claiming
    at the same moment take different events, without waiting for each other), then one
    `UPDATE ... WHERE event_key IN (...) RETURNING` (an array of keys on PostgreSQL, see db.keys)
    that checks again that each row is free.
    By key, so that the update is an index lookup whatever the planner knows of the table."""
    now = now or utcnow()
    values = _claiming(run_id, lease_seconds, now, sender)
    taken: list = []
    result = Claimed([])

    def take(conn: Connection, chosen: Sequence[str], free) -> list:
        rows: list = []
        for chunk in key_chunks(conn, chosen):
            rows += conn.execute(
                update(deliveries).where(among(conn, deliveries.c.event_key, chunk), free)
                .values(**values).returning(*_RETURNED)
            ).all()
        return rows

    with engine.begin() as conn:
        taken += take(conn, list(keys), _free(now, sender))
        again = len(taken)
        for kind, wanted in ((False, firsts), (True, confirms)):
            asked = new if kind or firsts_limit is None else min(new, firsts_limit)
            if not wanted or asked <= 0:
                continue
            rows = []
            for _ in range(CLAIM_ROUNDS):
                wanted_now = asked - len(rows)
                chosen = [k for (k,) in conn.execute(_takeable(kind, not_tried_since, wanted_now, now)
                                                     .with_for_update(skip_locked=True, of=deliveries))]
                rows += take(conn, chosen, _free(now)) if chosen else []
                if len(chosen) < wanted_now:  # no more of this kind for this sender now
                    if kind:
                        result.confirms_short = True
                    else:
                        result.firsts_short = True
                    break
                if len(rows) >= asked:
                    break
                # Another sender took some of those between the read and the update (a database
                # without SKIP LOCKED): read again.
            new -= len(rows)
            taken += rows
        # Read in the claim's transaction: no connection and round trip of their own.
        result.bodies = _bodies(conn, [row.event_key for row in taken[again:]])
    result.claims = sorted(_claims(taken), key=lambda c: (c.event_time is None, c.event_time or now, c.event_key))
    return result


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


@dataclass(frozen=True)
class Settled:
    """One answered request, for `settle_many`."""

    event_key: str
    attempt: int
    sent_at: datetime
    outcome: Outcome
    at: datetime  # when its answer came (updated_at, delivered_at)
    # Retried by the same sender in this run: the event stays held by it this long meanwhile, so
    # that no other sender (another batch of the run) tries it in between.
    hold_seconds: float | None = None


def settle_many(conn: Connection, run_id: str, items: Sequence[Settled]) -> None:
    """Many answers inside the caller's transaction: the events' new states in one statement per
    kind (closed, still open, held for a retry), then the attempt rows in one statement. An event that
    another sender took meanwhile (its lease ran out and its attempt count moved on) keeps the
    newer state, and its body; the attempt row is written all the same, since the request was made.

    An answer committed late (the warehouse refused it for a while) may find its attempt audited
    `unknown` by another sender's recovery of the lease: the answer replaces that row. So does a
    commit tried again after a lost acknowledgement, whose rows may be in already. The events' rows
    are updated first: a recovery that holds one commits before the attempt rows are read here,
    and one that comes later skips the rows locked here."""
    if not items:
        return
    d = deliveries.c
    closed = [i for i in items if i.outcome.status is not None]
    held = [i for i in items if i.outcome.status is None and i.outcome.next_attempt_at is None and i.hold_seconds]
    still_open = [i for i in items if i.outcome.status is None and i not in held]

    def mine(p: Ref) -> list:
        return [d.event_key == p("key"), d.attempts == p("attempt")]

    def answer(p: Ref) -> dict:
        return dict(http_status=p("http"), updated_at=p("at"), response=func.coalesce(p("response"), d.response))

    def released(p: Ref) -> dict:
        return dict(inflight_run_id=None, inflight_until=None, inflight_sender=None, **answer(p))

    def rows(group: list[Settled], **more) -> list[dict]:
        return sorted(({"key": i.event_key, "attempt": i.attempt, "http": i.outcome.http_status, "at": i.at,
                        "response": i.outcome.response[:RESPONSE_CHARS] if i.outcome.response is not None else None,
                        "reason": i.outcome.reason, **{name: value(i) for name, value in more.items()}}
                       for i in group), key=lambda row: row["key"])

    types = dict(key=d.event_key.type, attempt=d.attempts.type, http=d.http_status.type, at=d.updated_at.type,
                 response=d.response.type, reason=d.reason.type)
    update_each(conn, deliveries, {**types, "status": d.status.type, "delivered": d.delivered_at.type},
                rows(closed, status=lambda i: i.outcome.status,
                     delivered=lambda i: i.at if i.outcome.status == DELIVERED else None),
                mine, lambda p: dict(**released(p), status=p("status"), reason=p("reason"), next_attempt_at=None,
                                     delivered_at=func.coalesce(p("delivered"), d.delivered_at)))
    update_each(conn, deliveries, {**types, "next": d.next_attempt_at.type},
                rows(still_open, next=lambda i: i.outcome.next_attempt_at),
                mine, lambda p: dict(**released(p), reason=func.coalesce(p("reason"), d.reason),
                                     next_attempt_at=func.coalesce(p("next"), d.next_attempt_at)))
    update_each(conn, deliveries, {**types, "until": d.inflight_until.type},
                rows(held, until=lambda i: i.at + timedelta(seconds=i.hold_seconds)),
                mine, lambda p: dict(**answer(p), inflight_until=p("until"),
                                     reason=func.coalesce(p("reason"), d.reason)))
    a = attempts.c
    pairs = sorted({(i.event_key, i.attempt) for i in items})
    if conn.dialect.name == "postgresql":
        v = unnested({"key": a.event_key.type, "attempt": a.attempt.type},
                      [{"key": key, "attempt": attempt} for key, attempt in pairs])
        conn.execute(delete(attempts).where(a.event_key == v.c.key, a.attempt == v.c.attempt))
    else:
        conn.execute(delete(attempts).where(a.event_key == bindparam("b_key"), a.attempt == bindparam("b_attempt")),
                     [{"b_key": key, "b_attempt": attempt} for key, attempt in pairs])
    insert_rows(conn, attempts, ("event_key", "attempt", "run_id", "sent_at", "http_status", "latency_ms",
                                 "outcome", "error"), [
        (i.event_key, i.attempt, run_id, i.sent_at, i.outcome.http_status, i.outcome.latency_ms, i.outcome.outcome,
         i.outcome.error) for i in items])
    # Only the bodies of events closed now or before: one another sender has taken again stays sendable.
    done = sorted({i.event_key for i in closed if i.outcome.status in (DELIVERED, REJECTED)})
    for chunk in key_chunks(conn, done):
        conn.execute(delete(outbox).where(
            among(conn, outbox.c.event_key, chunk),
            exists().where(d.event_key == outbox.c.event_key, d.status.in_((DELIVERED, REJECTED)))))
    # A failed event keeps its body: a rerun of its partition may re-open and send it.


def _settled():
    """The event's current attempt is on record: no request of it is on the wire."""
    return exists().where(attempts.c.event_key == deliveries.c.event_key,
                          attempts.c.attempt == deliveries.c.attempts)


def let_go(engine: Engine, sender: str) -> None:
    """A sender that stops lets go of the events it held between retries (their last attempt is
    settled); an event whose answer is not on record stays leased, for recovery to audit."""
    with engine.begin() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.inflight_sender == sender, _settled())
            .values(inflight_run_id=None, inflight_until=None, inflight_sender=None)
        )


def release_many(conn: Connection, run_id: str, claims: Iterable[tuple[str, int]]) -> None:
    """Give back claims (event key, attempt) whose requests were never sent, inside the caller's
    transaction; what the claim set for a first attempt is unset again."""
    d = deliveries.c
    update_each(
        conn, deliveries, {"key": d.event_key.type, "attempt": d.attempts.type},
        [{"key": key, "attempt": attempt} for key, attempt in sorted(set(claims))],
        lambda p: [d.event_key == p("key"), d.attempts == p("attempt"), d.inflight_run_id == run_id],
        lambda p: dict(attempts=d.attempts - 1, inflight_run_id=None, inflight_until=None, inflight_sender=None,
                       # the claim set these to its own moment only when they were empty
                       first_attempt_at=case((d.first_attempt_at == d.last_attempt_at, None),
                                             else_=d.first_attempt_at),
                       retry_since=case((d.retry_since == d.last_attempt_at, None), else_=d.retry_since),
                       last_attempt_at=case((d.attempts == 1, None), else_=d.last_attempt_at)),
    )


def recover_abandoned(engine: Engine, run_id: str, now: datetime | None = None) -> int:
    """Events whose sender died with a request on the wire: audit the unknown outcome, reopen them.
    A sender that died between retries held an event whose last attempt is on record: that one is
    only let go. Nothing is written when there is none (a read tells)."""
    now = now or utcnow()
    expired = and_(deliveries.c.inflight_until.is_not(None), deliveries.c.inflight_until < now)
    with engine.connect() as conn:
        if conn.execute(select(deliveries.c.event_key).where(expired).limit(1)).first() is None:
            return 0
    with engine.begin() as conn:
        conn.execute(update(deliveries).where(expired, _settled())
                     .values(inflight_run_id=None, inflight_until=None, inflight_sender=None))
        rows = conn.execute(
            select(deliveries.c.event_key, deliveries.c.attempts, deliveries.c.inflight_run_id,
                   deliveries.c.inflight_until, deliveries.c.last_attempt_at)
            .where(expired).order_by(deliveries.c.event_key)
            .with_for_update(skip_locked=True)  # two senders recovering at once audit each request once
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


def lease_expiries(engine: Engine, taken_before: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    """When the first and the last lease on pending events run out; only leases taken before
    `taken_before`, when given (a sender waits for what an earlier sender left, not for the
    requests of one working beside it)."""
    query = select(func.min(deliveries.c.inflight_until), func.max(deliveries.c.inflight_until)).where(
        deliveries.c.status == PENDING)
    if taken_before is not None:
        query = query.where(deliveries.c.last_attempt_at < taken_before)
    with engine.connect() as conn:
        first, last = conn.execute(query).one()
    return as_utc(first), as_utc(last)

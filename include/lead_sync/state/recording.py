"""Recording what a run mapped: new events, re-evaluated open ones, re-opened failed ones.

The audit row of an event is its state (sending it is `claims`). Every write here is a
short transaction, so a run that dies at any point leaves a state the next run can resume from.
A sender may claim, send and settle an event between the read of its row and the write that
follows: every write that depends on what was read is a compare-and-set (see writes.as_read),
and an event changed meanwhile is left as the sender has it.
"""
from __future__ import annotations

import functools
import gc
import logging
from collections import Counter
from datetime import date, datetime
from typing import Callable, Container, Iterable, Iterator, TypeVar

from sqlalchemy import and_, insert, select, text
from sqlalchemy.engine import Connection, Engine

from lead_sync.clock import as_utc, utcnow
from lead_sync.db.bulk import update_each
from lead_sync.db.keys import key_chunks
from lead_sync.db.pg_copy import copies
from lead_sync.db.schema import deliveries, outbox, source_reads
from lead_sync.db.stream import stream
from lead_sync.events import DEFERRED_CONFIRM, EVENT_ONE, PENDING, SKIPPED, LeadEvent
from lead_sync.mapping.days import first_per_key
from lead_sync.state.decide import decide
from lead_sync.state.judge import Judge, first_events_by_customer
from lead_sync.state.on_record import rows_on_record
from lead_sync.state.outbox import drop_bodies
from lead_sync.state.preview import Preview
from lead_sync.state.spool import BATCH_EVENTS, MappedEvents
from lead_sync.state.writer import Writer, read_ahead
from lead_sync.state.writes import AS_READ_TYPES, as_read

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def gc_paused(function: F) -> F:
    """Run `function` without the cyclic garbage collector: it maps and records millions of
    short-lived objects (none in reference cycles to speak of), and collections triggered by
    their allocation would otherwise take a large share of the time. Reference counting still
    frees them; the collector is back on (if it was) as soon as `function` returns."""
    @functools.wraps(function)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return paused  # type: ignore[return-value]


def refresh_statistics(engine: Engine) -> None:
    """PostgreSQL: refresh the planner's statistics of the delivery state after a run recorded
    events, as after any bulk load. Autovacuum would, within a minute or so; until then the
    planner takes a table just filled for nearly empty, and a send claiming open events in order
    reads all of them each time instead of the first few (the index of the send order)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:  # a user that may not analyze gets a warning from PostgreSQL, not an error
        conn.execute(text(f"ANALYZE {deliveries.name}, {outbox.name}"))


class _AnyOf:
    """Membership in any of some sets, without a union of them."""

    def __init__(self, sets: Iterable[Container[str]]):
        self.sets = list(sets)

    def __contains__(self, key: object) -> bool:
        return any(key in keys for keys in self.sets)


def reconcile_batches(engine: Engine, batches: Iterable[list[LeadEvent]], day: date, sources: Iterable[str],
                      run_id: str, wait_days: float, *, reopen: bool = False, close_missing: bool = True,
                      preview: list[Preview] | None = None, read: dict[str, Container[str]] | None = None,
                      accounts: dict[str, Counter] | None = None, keep_unchanged: bool = False) -> Counter:
    """Record one partition's mapped events against what is already on record, a batch (one
    transaction) at a time: one event per key in each batch, no key in two batches. Every event 1
    is on record before any event 2 is judged against it (judge.Judge).

    What each event becomes is decide.decide's. With `close_missing`, pending events of this
    partition that the warehouse no longer yields are closed as skipped (only when the events
    given are all of the partition's rows, not a look-back's new ones): `read` holds the keys of
    all of them, per source (see _close_missing for `accounts`). With `preview`
    (a dry run) nothing is written: what each event would become is appended; it takes one batch.
    With `keep_unchanged`, a re-evaluated event whose row would not change is left as it is (else
    its updated_at and last_run_id say this run re-evaluated it).
    """
    read = read or {}
    now = utcnow()
    counts: Counter = Counter()
    meanwhile: Counter = Counter()  # written by the writer (its thread): read once it is flushed
    loaded: dict[str, dict] = {}  # a dry run's rows on record
    writer = Writer(engine)
    copying = copies(engine)
    ahead = writer.threaded and preview is None  # what a batch reads is read while the one before is decided

    def rows_of(events: list[LeadEvent]) -> dict[str, dict]:
        with engine.connect() as conn:
            return rows_on_record(conn, [e.event_key for e in events])

    def judged_against(events: list[LeadEvent]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        waiting = {e.customer_external_id for e in events if e.status == PENDING}
        with engine.connect() as conn:
            return rows_on_record(conn, [e.event_key for e in events]), first_events_by_customer(conn, sorted(waiting))

    try:
        with MappedEvents() as confirms:  # the event 2s, until every event 1 is on record
            def firsts_of() -> Iterator[list[LeadEvent]]:
                for events in batches:
                    confirms.add(day, (e for e in events if e.tracking == DEFERRED_CONFIRM))
                    yield [e for e in events if e.tracking != DEFERRED_CONFIRM]

            for firsts, existing in read_ahead(firsts_of(), rows_of, ahead):
                writes = decide(firsts, existing, run_id, now, counts, reopen, preview, keep_unchanged, copying,
                                meanwhile)
                if writes is not None:
                    writer.submit(writes)
                else:
                    loaded.update(existing)
            writer.flush()
            judge = Judge(wait_days, now)
            for events, (existing, by_customer) in read_ahead(
                    confirms.batches(day, BATCH_EVENTS if preview is None else None), judged_against, ahead):
                if preview is not None:  # event 1s a real run would have recorded by now
                    loaded.update(existing)
                    for planned in preview:
                        if planned.event.tracking in EVENT_ONE and planned.event.event_key not in loaded:
                            by_customer.setdefault(planned.event.customer_external_id, []).append(
                                {"tracking": planned.event.tracking, "status": planned.status})
                for event in events:
                    if event.status == PENDING:
                        row = existing.get(event.event_key)
                        judge(event, by_customer.get(event.customer_external_id, []),
                              as_utc(row["created_at"]) if row else None)
                writes = decide(events, existing, run_id, now, counts, reopen, preview, keep_unchanged, copying,
                                meanwhile)
                if writes is not None:
                    writer.submit(writes)
            writer.flush()
    finally:
        writer.close()
    if close_missing and preview is None:
        with engine.begin() as conn:
            closed, left = _close_missing(conn, day, list(sources), run_id, now, read, accounts)
        counts["closed_missing"] += closed
        if left:
            meanwhile["changed_meanwhile"] += left
    if meanwhile:
        log.info("partition %s: %d event(s) claimed, sent or settled by a sender after this run read them: "
                 "left as the sender has them", day, meanwhile["changed_meanwhile"])
        counts.update(meanwhile)
    return counts


def record_mapped(engine: Engine, mapped: MappedEvents, day: date, sources: Iterable[str], run_id: str,
                  wait_days: float, *, reopen: bool = False, close_missing: bool = True,
                  preview: list[Preview] | None = None, read: dict[str, Container[str]] | None = None,
                  accounts: dict[str, Counter] | None = None, keep_unchanged: bool = False,
                  keys: list[str] | None = None) -> tuple[Counter, int, int]:
    """reconcile_batches of a partition's mapped events, each batch folded to one event per key
    (first_per_key). `read`: the keys read for the partition, per source. Returns the counts, the
    events recorded and the repeats folded in; with `keys`, adds the events' keys to it; with
    `accounts`, how the partition's events on record stand against `read` (see _close_missing)."""
    folded = Counter()

    def batches() -> Iterator[list[LeadEvent]]:
        for events in mapped.batches(day, BATCH_EVENTS if preview is None else None):
            kept, repeats = first_per_key(events)
            folded["events"] += len(kept)
            folded["repeats"] += repeats
            if keys is not None:
                keys.extend(e.event_key for e in kept)
            yield kept

    counts = reconcile_batches(engine, batches(), day, sources, run_id, wait_days, reopen=reopen,
                               close_missing=close_missing, preview=preview, read=read, accounts=accounts,
                               keep_unchanged=keep_unchanged)
    return counts, folded["events"], folded["repeats"]


def _close_missing(conn: Connection, day: date, sources: list[str], run_id: str, now: datetime,
                   read: dict[str, Container[str]], accounts: dict[str, Counter] | None = None) -> tuple[int, int]:
    """Close the partition's pending events whose key was not `read` (from any source), each only
    where it is still as read (pending, free, its attempts). With `accounts`, also count per
    source the partition's events on record that this read yielded (`found`) and those it did
    not (`missing`): one pass over the partition for both. Returns the events closed, and those
    left because a sender took or settled them meanwhile."""
    is_open = and_(deliveries.c.status == PENDING, deliveries.c.inflight_until.is_(None))
    query = select(deliveries.c.event_key, deliveries.c.source, is_open, deliveries.c.attempts).where(
        deliveries.c.partition_date == day,
        deliveries.c.source.in_(sources),
    )
    found, missing = Counter(), Counter()
    if accounts is not None:
        found, missing = accounts.setdefault("found", Counter()), accounts.setdefault("missing", Counter())
    seen = _AnyOf(read.values())
    gone = []
    for key, source, pending, attempts in stream(conn, query):
        keys = read.get(source)
        if keys is not None:
            if key in keys:  # the common case: read, from this source
                found[source] += 1
                continue
            missing[source] += 1
        if pending and key not in seen:
            gone.append({"b_key": key, "was_status": PENDING, "was_attempts": attempts})
    closed: list[str] = []
    gone.sort(key=lambda row: row["b_key"])
    for chunk in key_chunks(conn, gone):
        closed += update_each(
            conn, deliveries, AS_READ_TYPES, chunk,
            lambda p: [deliveries.c.event_key == p("b_key"), *as_read(p)],
            lambda p: dict(status=SKIPPED, reason="its source row is no longer in the warehouse for this day",
                           updated_at=now, last_run_id=run_id),
            matched="b_key")
    drop_bodies(conn, closed)
    return len(closed), len(gone) - len(closed)


def record_reads(engine: Engine, reads: list[dict]) -> None:
    """What a run read, per partition and source (the reconciliation view's source rows)."""
    if reads:
        with engine.begin() as conn:
            conn.execute(insert(source_reads), reads)

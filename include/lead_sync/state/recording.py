"""Recording what a run mapped: new events, re-evaluated open ones, re-opened failed ones.

The audit row of an event is its state (sending it is `claims`). Every write here is a
short transaction, so a run that dies at any point leaves a state the next run can resume from.
A sender may claim, send and settle an event between the read of its row and the write that
follows: every write that depends on what was read is a compare-and-set (see _as_read), and an
event changed meanwhile is left as the sender has it.
"""
from __future__ import annotations

import functools
import gc
import io
import json
import logging
import marshal
import queue
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Container, Iterable, Iterator, Sequence

from sqlalchemy import String, Table, and_, any_, bindparam, delete, insert, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine

from lead_sync.db.schema import deliveries, dry_run_events, outbox, source_reads
from lead_sync.db.bulk import update_each
from lead_sync.clock import as_utc, utcnow
from lead_sync.events import (
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
from lead_sync.mapping.rows import first_per_key, payload_digest, payload_json, redact

log = logging.getLogger(__name__)

CHUNK = 500  # keys per IN (...) list
PG_CHUNK = 50_000  # keys per PostgreSQL array (one bound value)
BATCH_EVENTS = 10_000  # events recorded per transaction, about (see MappedEvents.batches)
BUCKETS = 64  # of each partition's mapped events, by key (ranges of them: see _bucket)
SPILL_BYTES = 8 * 2**20  # mapped events kept in memory before they go to a temporary file
RANGE_ROWS = 1_000  # from this many rows on record in a batch, their outbox bodies are looked up by key range


def gc_paused(function):
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
    return paused


def _chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _copies(bind: Connection | Engine) -> bool:
    """Whether rows can go to the database with COPY (PostgreSQL through psycopg2)."""
    return bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg2"


def _key_chunks(conn: Connection, keys: Sequence) -> Iterator[Sequence]:
    return _chunks(keys, PG_CHUNK if conn.dialect.name == "postgresql" else CHUNK)


def _among(conn: Connection, column, chunk: Sequence):
    """`column IN chunk`: one array value on PostgreSQL, a list of bound values elsewhere."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(chunk), type_=ARRAY(String)))
    return column.in_(chunk)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value) -> str:
    """A value in COPY's text format."""
    if value is None:
        return "\\N"
    if type(value) is str:
        return value.translate(_COPY_ESCAPES)
    if value is True or value is False:
        return "t" if value else "f"
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return str(value)


def _copy_lines(rows: Iterable[Sequence], width: int) -> str:
    """Rows in COPY's text format. Rows of text and NULLs are joined as they are, and checked as
    a whole for what would need escaping (a tab, newline, carriage return or backslash within a
    value); only a row that has any, or other values, is written value by value."""
    null = "\\N"
    lines = []
    for row in rows:
        try:
            line = "\t".join([null if value is None else value for value in row])
        except TypeError:  # a value that is not text
            line = None
        if (line is None or line.count("\t") != width - 1 or "\n" in line or "\r" in line
                or line.count("\\") != row.count(None)):
            line = "\t".join([_copy_text(value) for value in row])
        lines.append(line)
    lines.append("")
    return "\n".join(lines)


def _copy_in(conn: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    cursor = conn.connection.cursor()
    try:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN",
                           io.StringIO(_copy_lines(rows, len(columns))), size=2**20)
    finally:
        cursor.close()


def _insert_rows(conn: Connection, table: Table, columns: Sequence[str], rows: list[tuple]) -> None:
    """Insert rows (tuples of these columns): COPY on PostgreSQL, executemany elsewhere."""
    if not rows:
        return
    if _copies(conn):
        _copy_in(conn, table.name, columns, rows)
    else:
        conn.execute(insert(table), [dict(zip(columns, row)) for row in rows])


_BODY_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False), built once


def _dump(payload: dict | None) -> str | None:
    return None if payload is None else _BODY_JSON.encode(payload)


def refresh_statistics(engine: Engine) -> None:
    """PostgreSQL: refresh the planner's statistics of the delivery state after a run recorded
    events, as after any bulk load. Autovacuum would, within a minute or so; until then the
    planner takes a table just filled for nearly empty, and a send claiming open events in order
    reads all of them each time instead of the first few (the index of the send order)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:  # a user that may not analyze gets a warning from PostgreSQL, not an error
        conn.execute(text(f"ANALYZE {deliveries.name}, {outbox.name}"))


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
        for chunk in _key_chunks(conn, list(among)):
            found.update(conn.execute(query.where(_among(conn, deliveries.c.event_key, chunk))).all())
        return found


def _stream(conn: Connection, query) -> Iterator[tuple]:
    """The rows of a query as plain tuples, a bounded number at a time (psycopg2: a named cursor)."""
    if _copies(conn):
        compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        cursor = conn.connection.cursor(name=f"lead_sync_{threading.get_ident()}_{id(query)}")
        try:
            cursor.itersize = PG_CHUNK
            cursor.execute(str(compiled), compiled.params)
            yield from cursor
        finally:
            cursor.close()
    else:
        yield from conn.execute(query)


def recorded_sources(engine: Engine, day: date) -> Iterator[tuple[str, str]]:
    """(key, source) of every event on record for a partition, streamed."""
    query = (select(deliveries.c.event_key, deliveries.c.source).where(deliveries.c.partition_date == day)
             .execution_options(stream_results=True, yield_per=PG_CHUNK))
    with engine.connect() as conn:
        yield from conn.execute(query)


# What recording an event needs of its row on record: what decides, and what it would write.
_LOADED = ("event_key", "source", "partition_date", "customer_external_id", "event_name", "tracking", "status",
           "attempts", "reason", "notes", "payload_sha256", "event_time", "created_at", "inflight_until",
           "retry_since", "next_attempt_at")


def _load(conn: Connection, keys: Sequence[str]) -> dict[str, dict]:
    """The rows on record of these keys, and whether each has a body in the outbox (`has_body`)."""
    rows: dict[str, dict] = {}
    if _copies(conn):  # psycopg2 itself: these are the bulk of a rerun's reading
        cursor = conn.connection.cursor()
        try:
            # Key lookups: whatever the table's statistics say (it may have just grown by a
            # whole partition), one index probe per key beats reading the table per batch.
            cursor.execute("SET LOCAL enable_seqscan = off")
            for chunk in _chunks(list(keys), PG_CHUNK):
                cursor.execute(f"SELECT {', '.join(_LOADED)} FROM {deliveries.name} WHERE event_key = ANY(%s)",
                               (list(chunk),))
                for values in cursor:
                    rows[values[0]] = dict(zip(_LOADED, values), has_body=False)
            if len(rows) >= RANGE_ROWS:
                # The keys of a batch are a range of them (see _bucket): the outbox's keys in that
                # range are one short index scan, much less than a probe per key.
                cursor.execute(f"SELECT event_key FROM {outbox.name} WHERE event_key BETWEEN %s AND %s",
                               (min(rows), max(rows)))
                for (key,) in cursor:
                    if key in rows:
                        rows[key]["has_body"] = True
            else:
                cursor.execute(f"SELECT event_key FROM {outbox.name} WHERE event_key = ANY(%s)", (list(rows),))
                for (key,) in cursor:
                    rows[key]["has_body"] = True
        finally:
            cursor.close()
        return rows
    query = select(*(deliveries.c[name] for name in _LOADED),
                   outbox.c.event_key.is_not(None).label("has_body")).select_from(
        deliveries.outerjoin(outbox, outbox.c.event_key == deliveries.c.event_key))
    for chunk in _key_chunks(conn, list(keys)):
        for row in conn.execute(query.where(_among(conn, deliveries.c.event_key, chunk))).mappings():
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
    for chunk in _key_chunks(conn, list(customers)):
        query = select(deliveries.c.customer_external_id, deliveries.c.tracking, deliveries.c.status).where(
            _among(conn, deliveries.c.customer_external_id, chunk), deliveries.c.tracking.in_(EVENT_ONE)
        )
        for row in conn.execute(query).mappings():
            found.setdefault(row["customer_external_id"], []).append(dict(row))
    return found


_BODY_COLUMNS = ("event_key", "body")


def _put_outbox(conn: Connection, bodies: dict[str, str], replaced: Sequence[str] = ()) -> None:
    """The outbox's body of each key: `replaced` keys have one already, the others are expected
    to have none. With COPY, a key that has one after all is found when its insert fails, and
    the whole put is done again replacing every body."""
    if not bodies:
        return
    rows = sorted(bodies.items())
    if _copies(conn):
        _drop_outbox(conn, list(replaced))
        savepoint = conn.begin_nested()
        try:
            _insert_rows(conn, outbox, _BODY_COLUMNS, rows)
        except conn.dialect.dbapi.IntegrityError:
            savepoint.rollback()
        else:
            savepoint.commit()
            return
    _drop_outbox(conn, list(bodies))
    _insert_rows(conn, outbox, _BODY_COLUMNS, rows)


def _drop_outbox(conn: Connection, keys: Sequence[str]) -> None:
    for chunk in _key_chunks(conn, list(keys)):
        conn.execute(delete(outbox).where(_among(conn, outbox.c.event_key, chunk)))


def _as_read(p) -> list:
    """Where an audit row is still as the run read it (`was_status`, `was_attempts`) and no sender
    holds it. Every claim adds an attempt (only a claim given back unsent takes it off again), so
    a row that passes was not claimed, sent or settled since it was read."""
    d = deliveries.c
    return [d.status == p("was_status"), d.attempts == p("was_attempts"), d.inflight_until.is_(None)]


_AS_READ_TYPES = {"b_key": deliveries.c.event_key.type, "was_status": deliveries.c.status.type,
                  "was_attempts": deliveries.c.attempts.type}


def _update_rows(conn: Connection, rows: list[dict]) -> list[str]:
    """Update audit rows by key (`b_key`), all with the same columns, where each is still as read
    (`was_status`, `was_attempts`): one statement on PostgreSQL (bulk.update_each). Returns the keys
    updated."""
    if not rows:
        return []
    columns = [c for c in rows[0] if c not in _AS_READ_TYPES]
    return update_each(conn, deliveries, {**_AS_READ_TYPES, **{c: deliveries.c[c].type for c in columns}}, rows,
                       lambda p: [deliveries.c.event_key == p("b_key"), *_as_read(p)],
                       lambda p: {c: p(c) for c in columns}, matched="b_key")


def _touch_rows(conn: Connection, rows: list[tuple[str, str, int]], run_id: str, now: datetime) -> list[str]:
    """Mark rows (key, status and attempts as read) as re-evaluated by this run, nothing else of
    them changed, where each is still as read. Returns the keys touched."""
    return update_each(conn, deliveries, _AS_READ_TYPES,
                       [{"b_key": key, "was_status": status, "was_attempts": attempts}
                        for key, status, attempts in sorted(rows)],
                       lambda p: [deliveries.c.event_key == p("b_key"), *_as_read(p)],
                       lambda p: dict(updated_at=now, last_run_id=run_id), matched="b_key")


# What a sender writes as the reason of an event it leaves open: a retry (delivery's outcomes),
# and claims.recover_abandoned's unknown outcome.
_RETRYING = "retrying:"
_UNKNOWN_OUTCOME = "an earlier request's outcome is unknown (sender stopped); sent again"


def _senders_reason(reason: str | None) -> bool:
    return reason is not None and (reason.startswith(_RETRYING) or reason == _UNKNOWN_OUTCOME)


@dataclass
class Preview:
    """What recording an event would do (a dry run): its status after, and whether a sender would take it now."""

    event: LeadEvent
    status: str
    reason: str | None
    due: bool


def _same_moment(stored: datetime | None, moment: datetime | None) -> bool:
    """A timestamp on record (naive from SQLite: UTC) is the same instant as `moment`."""
    if stored is None or moment is None:
        return stored is moment
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return stored == moment


_INSERTED = ("event_key", "source", "partition_date", "customer_external_id", "event_name", "tracking", "status",
             "reason", "notes", "payload", "payload_sha256", "event_time", "attempts", "created_at", "updated_at",
             "last_run_id")


@dataclass
class _Writes:
    """What recording a batch of events writes, in one transaction (see _apply). New events go
    in with their bodies. Every other write depends on the row as read and is made only where it
    is still so (_as_read); an event a sender changed meanwhile keeps its row and its body, and is
    counted in `meanwhile` ("changed_meanwhile")."""

    run_id: str
    now: datetime
    inserts: list[tuple]  # of _INSERTED (see _apply's `copying`)
    new_bodies: dict[str, str]  # the outbox's body of each new event to send
    new_dropped: list[str]  # new events not to send: no body in the outbox
    updates: list[dict]  # each with the row's status and attempts as read (was_status, was_attempts)
    touched: list[tuple[str, str, int]]  # (key, status, attempts as read) of rows re-evaluated and unchanged
    bodies: dict[str, str]  # the outbox's body of updated or touched rows
    replaced: list[str]  # those of them that have a body on record
    dropped: list[str]  # updated or touched rows without a body in the outbox
    meanwhile: Counter

    def __call__(self, conn: Connection) -> None:
        self.inserts.sort()  # by key, as the key index has them
        _insert_rows(conn, deliveries, _INSERTED, self.inserts)
        self.updates.sort(key=lambda row: row["b_key"])
        written = set(_update_rows(conn, self.updates))
        written.update(_touch_rows(conn, self.touched, self.run_id, self.now))
        left = len(self.updates) + len(self.touched) - len(written)
        if left:
            self.meanwhile["changed_meanwhile"] += left
        bodies, dropped = self.new_bodies, self.new_dropped
        if self.bodies:
            bodies = {**bodies, **{key: body for key, body in self.bodies.items() if key in written}}
        if self.dropped:
            dropped = dropped + [key for key in self.dropped if key in written]
        _put_outbox(conn, bodies, [key for key in self.replaced if key in written])
        _drop_outbox(conn, dropped)


def _apply(events: list[LeadEvent], existing: dict[str, dict], run_id: str, now: datetime, counts: Counter,
           reopen: bool, preview: list[Preview] | None = None, keep_unchanged: bool = False,
           copying: bool = False, meanwhile: Counter | None = None) -> _Writes | None:
    """Decide each event against its row on record (see _load): what to write, or with `preview`,
    only what it would do (then nothing is returned).

    A re-evaluated row that would not change is not rewritten: with `keep_unchanged` it is left
    as it is (unless its body in the outbox needs mending), otherwise only its updated_at and
    last_run_id are set. An open event whose payload did not change keeps the reason a sender
    gave it (retrying, outcome unknown); a run of its own partition still makes it due now. With `copying` (COPY will write them),
    new rows have their dates and numbers as text already. `meanwhile` counts, as the writes are
    made, the rows a sender changed since they were read.
    """
    inserts, updates, touched, bodies, replaced, dropped = [], [], [], {}, [], []
    new_bodies, new_dropped = {}, []
    now_value, days = (now.isoformat(), {}) if copying else (now, None)
    for event in events:
        key = event.event_key
        row = existing.get(key)
        if row is not None and preview is not None:
            kept = Preview(event, row["status"], row["reason"], False)
        digest = payload_digest(event.payload)
        if row is None:
            counts["new"] += 1
            if preview is not None:
                preview.append(Preview(event, event.status, event.reason, event.status == PENDING))
                continue
            body, audited = payload_json(event.payload)
            day, moment, attempts = event.partition_date, event.event_time, 0
            if copying:
                day = days.get(day) or days.setdefault(day, day.isoformat())
                moment, attempts = moment if moment is None else moment.isoformat(), "0"
            inserts.append((key, event.source, day, event.customer_external_id, event.event_name, event.tracking,
                            event.status, event.reason, "; ".join(event.notes) or None, audited, digest, moment,
                            attempts, now_value, now_value, run_id))
            if event.status == PENDING:
                new_bodies[key] = body
            else:
                new_dropped.append(key)
            continue
        status = row["status"]
        if status == DELIVERED:
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
        elif status == REJECTED and row["payload_sha256"] == digest:
            counts["still_rejected"] += 1
            if preview is not None:
                preview.append(kept)
            continue
        elif status == FAILED and not reopen:
            counts["failed_final"] += 1  # gave up: only a run of its own partition re-opens it
            if preview is not None:
                preview.append(kept)
            continue
        reason, retry_since, next_attempt_at = event.reason, row["retry_since"], row["next_attempt_at"]
        if event.status == PENDING and status == FAILED:
            reason = f"re-opened by run {run_id} of partition {event.partition_date}: to be sent again"
            retry_since = None  # a fresh give_up_after_hours
            counts["reopened"] += 1
        elif event.status == PENDING and status == REJECTED:
            reason = "source row changed since the rejection: to be sent again"
        if (event.status == PENDING and status == PENDING and row["payload_sha256"] == digest
                and _senders_reason(row["reason"])):
            reason = row["reason"]  # the same payload: the sender's word on it stands
        if reopen:
            next_attempt_at = None  # a run of its own partition sends it now
        counts["reevaluated"] += 1
        if preview is not None:
            later = as_utc(next_attempt_at)
            preview.append(Preview(event, event.status, reason,
                                   event.status == PENDING and (later is None or later <= now)))
            continue
        notes = "; ".join(event.notes) or None
        has_body = row["has_body"]
        if (status == event.status and row["payload_sha256"] == digest and row["reason"] == reason
                and row["notes"] == notes and row["source"] == event.source and row["tracking"] == event.tracking
                and row["customer_external_id"] == event.customer_external_id
                and row["event_name"] == event.event_name and _same_moment(row["event_time"], event.event_time)
                and _same_moment(row["retry_since"], retry_since)
                and _same_moment(row["next_attempt_at"], next_attempt_at)):
            # Nothing but updated_at and last_run_id would change (the payload: by its digest).
            # Its body (the payload did not change) is in the outbox exactly when it is pending:
            # mending that is a write, made only where the row is still as read (a touch).
            mend = (event.status == PENDING) != has_body
            if mend or not keep_unchanged:
                touched.append((key, status, row["attempts"]))
            if event.status == PENDING and not has_body:
                bodies[key] = payload_json(event.payload)[0]
            elif event.status != PENDING and has_body:
                dropped.append(key)
            continue
        body, audited = payload_json(event.payload)
        updates.append({
            "source": event.source,
            "tracking": event.tracking,
            "customer_external_id": event.customer_external_id,
            "event_name": event.event_name,
            "reason": reason,
            "notes": notes,
            "payload": audited,
            "payload_sha256": digest,
            "event_time": event.event_time,
            "updated_at": now,
            "last_run_id": run_id,
            "retry_since": retry_since,
            "next_attempt_at": next_attempt_at,
            "b_key": key,
            "status": event.status,
            "was_status": status,
            "was_attempts": row["attempts"],
        })
        if has_body:
            replaced.append(key)
        if event.status == PENDING:
            bodies[key] = body
        else:
            dropped.append(key)
    if preview is not None:
        return None
    return _Writes(run_id, now, inserts, new_bodies, new_dropped, updates, touched, bodies, replaced, dropped,
                   Counter() if meanwhile is None else meanwhile)


def _read_ahead(items: Iterable, read, threaded: bool) -> Iterator[tuple]:
    """Each item with read(item); `threaded`, a thread of its own reads the next item's while the
    caller works on this one (read must open its own connection)."""
    if not threaded:
        for item in items:
            yield item, read(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lead-sync-read") as pool:
        pending = None
        for item in items:
            future = pool.submit(read, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


class _Writer:
    """Writes batches (each a function of a connection) in order, one transaction each. On
    PostgreSQL a thread of its own does it, so that the database writes one batch while the next
    is prepared; elsewhere each is written at once. A failed write is raised by the next call."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.threaded = engine.dialect.name == "postgresql"
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write) -> None:
        if not self.threaded:
            with self.engine.begin() as conn:
                write(conn)
            return
        self._check()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lead-sync-writer", daemon=True)
            self._thread.start()
        self._queue.put(write)

    def flush(self) -> None:
        """Wait until everything submitted is committed."""
        if self._thread is not None:
            self._queue.join()
        self._check()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            write = self._queue.get()
            try:
                if write is None:
                    return
                if self._error is None:  # after a failure, the rest is not written
                    with self.engine.begin() as conn:
                        write(conn)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICRO = timedelta(microseconds=1)


def _bucket(key: str) -> int:
    """A key's bucket: the first six bits of its digest (event_key, row_key), so that a batch of
    buckets is a range of keys and records (and reads back) neighbouring rows of the key index."""
    try:
        return int(key[-40:-38], 16) >> 2
    except ValueError:  # not a digest key
        return hash(key) % BUCKETS


def _to_micros(moment: datetime | None) -> int | tuple | None:
    """A moment as marshal keeps it: microseconds since the epoch (a naive one in a tuple)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return ((moment - _EPOCH.replace(tzinfo=None)) // _MICRO,)
    return (moment - _EPOCH) // _MICRO


def _from_micros(micros: int | tuple | None) -> datetime | None:
    if micros is None:
        return None
    if type(micros) is tuple:
        return _EPOCH.replace(tzinfo=None) + _MICRO * micros[0]
    return _EPOCH + _MICRO * micros


class MappedEvents:
    """The events a run mapped, per partition, until they are recorded.

    Beyond SPILL_BYTES they wait in a temporary file, so that memory does not grow with the
    partitions read. Each partition's events are kept in BUCKETS buckets by key, each in the
    order the events came: a batch of whole buckets holds every event of its keys, so that it
    can be folded to one event per key (first_per_key) on its own.
    """

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=SPILL_BYTES)
        self._segments: dict[tuple[date, int], list[tuple[int, int]]] = {}
        self._counts: dict[date, list[int]] = {}
        self._added = 0

    def __enter__(self) -> "MappedEvents":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def add(self, day: date, events: Iterable[LeadEvent]) -> None:
        buckets: list[list[tuple]] = [[] for _ in range(BUCKETS)]
        added = self._added
        for event in events:
            added += 1
            key, moment = event.event_key, event.event_time
            try:
                bucket = buckets[int(key[-40:-38], 16) >> 2]  # _bucket, inline
            except ValueError:
                bucket = buckets[_bucket(key)]
            bucket.append((added, key, event.source, event.tracking, event.status, event.payload,
                           event.customer_external_id, event.event_name,
                           (moment - _EPOCH) // _MICRO if moment is not None and moment.tzinfo is not None
                           else _to_micros(moment), event.reason, event.notes))
        self._added = added
        counts = self._counts.setdefault(day, [0] * BUCKETS)
        for bucket, records in enumerate(buckets):
            if not records:
                continue
            blob = marshal.dumps(records)
            self._file.seek(0, io.SEEK_END)
            self._segments.setdefault((day, bucket), []).append((self._file.tell(), len(blob)))
            self._file.write(blob)
            counts[bucket] += len(records)

    def add_days(self, events: dict[date, list[LeadEvent]]) -> None:
        """Add what map_rows (map_days) returned, and empty it (nothing of it stays in memory)."""
        for day in list(events):
            self.add(day, events.pop(day))

    def count(self, day: date) -> int:
        return sum(self._counts.get(day, ()))

    def batches(self, day: date, size: int | None = BATCH_EVENTS) -> Iterator[list[LeadEvent]]:
        """The day's events in batches of whole buckets, of `size` events or more each but the
        last (None: all in one), each batch in the order the events were added."""
        counts = self._counts.get(day, [0] * BUCKETS)
        group: list[int] = []
        held = 0
        for bucket, count in enumerate(counts):
            if count:
                group.append(bucket)
                held += count
            if group and size is not None and held >= size:
                yield self._read(day, group)
                group, held = [], 0
        if group:
            yield self._read(day, group)

    def _read(self, day: date, buckets: list[int]) -> list[LeadEvent]:
        records: list[tuple] = []
        for bucket in buckets:
            for offset, length in self._segments[(day, bucket)]:
                self._file.seek(offset)
                records.extend(marshal.loads(self._file.read(length)))
        if len(buckets) > 1:
            records.sort(key=lambda record: record[0])
        return [LeadEvent(key, source, day, tracking, status, payload, customer, name,
                          None if moment is None else _EPOCH + _MICRO * moment if moment.__class__ is int
                          else _from_micros(moment), reason, notes)
                for _, key, source, tracking, status, payload, customer, name, moment, reason, notes in records]


class _AnyOf:
    """Membership in any of some sets, without a union of them."""

    def __init__(self, sets: Iterable[Container[str]]):
        self.sets = list(sets)

    def __contains__(self, key: object) -> bool:
        return any(key in keys for keys in self.sets)


def reconcile(engine: Engine, events: list[LeadEvent], day: date, sources: Iterable[str], run_id: str,
              wait_days: float, now: datetime | None = None, *, reopen: bool = False,
              close_missing: bool = True, preview: list[Preview] | None = None,
              keep_unchanged: bool = False) -> Counter:
    """Record one partition's mapped events against what is already on record.

    Delivered events are never touched again; a rejected one is reopened only when its
    body changed; a failed one only when `reopen` (a run of its own partition); everything
    else is re-evaluated from the rows just read. With `close_missing`, pending events of
    this partition that the warehouse no longer yields are closed as skipped (only when
    the events given are all of the partition's rows, not a look-back's new ones).
    With `preview` (a dry run) nothing is written: what each event would become is appended.
    With `keep_unchanged`, a re-evaluated event whose row would not change is left as it is
    (else its updated_at and last_run_id say this run re-evaluated it).
    """
    return reconcile_batches(engine, [events], day, sources, run_id, wait_days, now, reopen=reopen,
                             close_missing=close_missing, preview=preview, seen={e.event_key for e in events},
                             keep_unchanged=keep_unchanged)


def reconcile_batches(engine: Engine, batches: Iterable[list[LeadEvent]], day: date, sources: Iterable[str],
                      run_id: str, wait_days: float, now: datetime | None = None, *, reopen: bool = False,
                      close_missing: bool = True, preview: list[Preview] | None = None,
                      seen: Container[str] = (), read: dict[str, Container[str]] | None = None,
                      accounts: dict[str, Counter] | None = None, keep_unchanged: bool = False) -> Counter:
    """reconcile, a batch (one transaction) at a time: one event per key in each batch, no key
    in two batches; `seen` holds the keys of all of them (for `close_missing`), or `read` does,
    per source (see _close_missing for `accounts`). Every event 1 is on record before any event 2
    is judged against it. A dry run (`preview`) takes one batch.
    """
    if read is not None:
        seen = _AnyOf(read.values())
    now = now or utcnow()
    counts: Counter = Counter()
    meanwhile: Counter = Counter()  # written by the writer (its thread): read once it is flushed
    loaded: dict[str, dict] = {}  # a dry run's rows on record
    writer = _Writer(engine)
    copying = _copies(engine)
    ahead = writer.threaded and preview is None  # what a batch reads is read while the one before is decided

    def rows_of(events: list[LeadEvent]) -> dict[str, dict]:
        with engine.connect() as conn:
            return _load(conn, [e.event_key for e in events])

    def judged_against(events: list[LeadEvent]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        waiting = {e.customer_external_id for e in events if e.status == PENDING}
        with engine.connect() as conn:
            return _load(conn, [e.event_key for e in events]), _first_events_by_customer(conn, sorted(waiting))

    try:
        with MappedEvents() as confirms:  # the event 2s, until every event 1 is on record
            def firsts_of() -> Iterator[list[LeadEvent]]:
                for events in batches:
                    confirms.add(day, (e for e in events if e.tracking == DEFERRED_CONFIRM))
                    yield [e for e in events if e.tracking != DEFERRED_CONFIRM]

            for firsts, existing in _read_ahead(firsts_of(), rows_of, ahead):
                writes = _apply(firsts, existing, run_id, now, counts, reopen, preview, keep_unchanged, copying,
                                meanwhile)
                if writes is not None:
                    writer.submit(writes)
                else:
                    loaded.update(existing)
            writer.flush()
            judge = Judge(wait_days, now)
            for events, (existing, by_customer) in _read_ahead(
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
                writes = _apply(events, existing, run_id, now, counts, reopen, preview, keep_unchanged, copying,
                                meanwhile)
                if writes is not None:
                    writer.submit(writes)
            writer.flush()
    finally:
        writer.close()
    if close_missing and preview is None:
        with engine.begin() as conn:
            closed, left = _close_missing(conn, day, list(sources), seen, run_id, now, read, accounts)
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
                               close_missing=close_missing, preview=preview, read=read or {}, accounts=accounts,
                               keep_unchanged=keep_unchanged)
    return counts, folded["events"], folded["repeats"]


def _close_missing(conn: Connection, day: date, sources: list[str], seen: Container[str], run_id: str,
                   now: datetime, read: dict[str, Container[str]] | None = None,
                   accounts: dict[str, Counter] | None = None) -> tuple[int, int]:
    """Close the partition's pending events whose key is not `seen`, each only where it is still
    as read (pending, free, its attempts). With `accounts`, also count per source the partition's
    events on record that this read yielded (`found`, by `read`) and those it did not (`missing`):
    one pass over the partition for both. Returns the events closed, and those left because a
    sender took or settled them meanwhile."""
    is_open = and_(deliveries.c.status == PENDING, deliveries.c.inflight_until.is_(None))
    query = select(deliveries.c.event_key, deliveries.c.source, is_open, deliveries.c.attempts).where(
        deliveries.c.partition_date == day,
        deliveries.c.source.in_(sources),
    ).execution_options(stream_results=True, yield_per=PG_CHUNK)
    found, missing = Counter(), Counter()
    if accounts is not None:
        found, missing = accounts.setdefault("found", Counter()), accounts.setdefault("missing", Counter())
    read = read or {}
    gone = []
    for key, source, pending, attempts in _stream(conn, query):
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
    for chunk in _key_chunks(conn, gone):
        closed += update_each(
            conn, deliveries, _AS_READ_TYPES, chunk,
            lambda p: [deliveries.c.event_key == p("b_key"), *_as_read(p)],
            lambda p: dict(status=SKIPPED, reason="its source row is no longer in the warehouse for this day",
                           updated_at=now, last_run_id=run_id),
            matched="b_key")
    _drop_outbox(conn, closed)
    return len(closed), len(gone) - len(closed)


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

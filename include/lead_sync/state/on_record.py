"""What the delivery state holds already: the partitions left open, the keys of a partition, and
the rows a run decides its events against."""
from __future__ import annotations

from datetime import date
from typing import Iterable, Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from lead_sync.db.key_reads import key_reads, keys_between, rows_by_key
from lead_sync.db.keys import among, key_chunks
from lead_sync.db.schema import deliveries, outbox
from lead_sync.db.stream import stream
from lead_sync.events import PENDING

RANGE_ROWS = 1_000  # from this many rows on record in a batch, their outbox bodies are looked up by key range

# What recording an event needs of its row on record: what decides, and what it would write.
LOADED = ("event_key", "source", "partition_date", "customer_external_id", "event_name", "tracking", "status",
          "attempts", "reason", "notes", "payload_sha256", "event_time", "created_at", "inflight_until",
          "retry_since", "next_attempt_at")


def open_partition_days(engine: Engine, sources: Iterable[str]) -> set[date]:
    """Partitions holding events that earlier runs left pending (`failed` is final: not these)."""
    query = (
        select(deliveries.c.partition_date)
        .where(deliveries.c.status == PENDING, deliveries.c.source.in_(list(sources)))
        .distinct()
    )
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(query)}


def recorded_keys(engine: Engine, day: date, only: Sequence[str] | None = None) -> dict[str, str]:
    """Events on record for a partition, whatever their status (`only` those of these keys,
    when given): key -> source."""
    query = select(deliveries.c.event_key, deliveries.c.source).where(deliveries.c.partition_date == day)
    with engine.connect() as conn:
        if only is None:
            return dict(conn.execute(query).all())
        found: dict[str, str] = {}
        for chunk in key_chunks(conn, list(only)):
            found.update(conn.execute(query.where(among(conn, deliveries.c.event_key, chunk))).all())
        return found


def recorded_sources(engine: Engine, day: date) -> Iterator[tuple[str, str]]:
    """(key, source) of every event on record for a partition, streamed."""
    query = select(deliveries.c.event_key, deliveries.c.source).where(deliveries.c.partition_date == day)
    with engine.connect() as conn:
        yield from stream(conn, query)


def rows_on_record(conn: Connection, keys: Sequence[str]) -> dict[str, dict]:
    """The rows on record of these keys (their LOADED columns), and whether each has a body in
    the outbox (`has_body`)."""
    rows: dict[str, dict] = {}
    if key_reads(conn):  # the bulk of a rerun's reading: psycopg2's own cursor is 20-25 % cheaper here
        for values in rows_by_key(conn, deliveries, LOADED, keys):
            rows[values[0]] = dict(zip(LOADED, values), has_body=False)
        if len(rows) >= RANGE_ROWS:
            # The keys of a batch are a range of them (see spool._bucket): the outbox's keys in
            # that range are one short index scan, much less than a probe per key.
            with_body: Iterable[str] = keys_between(conn, outbox, min(rows), max(rows))
        else:
            with_body = (key for (key,) in rows_by_key(conn, outbox, ("event_key",), list(rows)))
        for key in with_body:
            if key in rows:
                rows[key]["has_body"] = True
        return rows
    query = select(*(deliveries.c[name] for name in LOADED),
                   outbox.c.event_key.is_not(None).label("has_body")).select_from(
        deliveries.outerjoin(outbox, outbox.c.event_key == deliveries.c.event_key))
    for chunk in key_chunks(conn, list(keys)):
        for row in conn.execute(query.where(among(conn, deliveries.c.event_key, chunk))).mappings():
            rows[row["event_key"]] = dict(row)
    return rows

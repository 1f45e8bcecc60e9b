"""Rows by key through psycopg2's own cursor, each key an index probe.

A rerun reads back the row on record of every event it maps: a million rows for a large
partition. psycopg2's cursor hands over its tuples as they are, without a SQLAlchemy Row per
row (measured 20-25 % cheaper on a rerun). Sequential scans are off for the rest of the
transaction: whatever the table's statistics say (it may have just grown by a whole partition),
one index probe per key beats reading the table.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine

from lead_sync.db.keys import PG_CHUNK, chunks


def key_reads(bind: Connection | Engine) -> bool:
    """Whether these reads can be made: PostgreSQL through psycopg2."""
    return bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg2"


def _probing(conn: Connection):
    cursor = conn.connection.cursor()
    cursor.execute("SET LOCAL enable_seqscan = off")
    return cursor


def rows_by_key(conn: Connection, table: Table, columns: Sequence[str], keys: Sequence[str],
                key: str = "event_key") -> Iterator[tuple]:
    """The `columns` (a tuple each) of `table`'s rows whose `key` is one of `keys`, in `conn`'s
    transaction (which has sequential scans off from then on)."""
    cursor = _probing(conn)
    try:
        for chunk in chunks(list(keys), PG_CHUNK):
            cursor.execute(f"SELECT {', '.join(columns)} FROM {table.name} WHERE {key} = ANY(%s)", (list(chunk),))
            yield from cursor
    finally:
        cursor.close()


def keys_between(conn: Connection, table: Table, low: str, high: str, key: str = "event_key") -> Iterator[str]:
    """`table`'s keys from `low` to `high`, both included: a range of its key's index, in `conn`'s
    transaction (which has sequential scans off from then on)."""
    cursor = _probing(conn)
    try:
        cursor.execute(f"SELECT {key} FROM {table.name} WHERE {key} BETWEEN %s AND %s", (low, high))
        for (found,) in cursor:
            yield found
    finally:
        cursor.close()

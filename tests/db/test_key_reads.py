"""Rows by key through psycopg2's own cursor (key_reads): the rows of the keys asked, every key of a
range, and index probes whatever the table's statistics say."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from lead_sync.db import key_reads
from lead_sync.db.bulk import insert_rows
from lead_sync.db.key_reads import keys_between, rows_by_key
from lead_sync.db.schema import ensure_schema, outbox

pytestmark = pytest.mark.postgres

KEYS = [f"k{n:04}" for n in range(50)]


@pytest.fixture
def bodies(pg_warehouse):
    ensure_schema(pg_warehouse.engine)
    with pg_warehouse.engine.begin() as conn:
        insert_rows(conn, outbox, ("event_key", "body"), [(key, f"body of {key}") for key in KEYS])
    return pg_warehouse.engine


def test_only_psycopg2_on_postgresql_reads_this_way(pg_warehouse, sqlite_warehouse):
    assert key_reads.key_reads(pg_warehouse.engine) and not key_reads.key_reads(sqlite_warehouse.engine)
    other = create_engine(pg_warehouse.url.set(drivername="postgresql+psycopg"))
    try:
        assert not key_reads.key_reads(other)
    finally:
        other.dispose()


def test_rows_by_key_are_the_rows_of_the_keys_asked_in_as_many_lists_as_it_takes(bodies, monkeypatch):
    monkeypatch.setattr(key_reads, "PG_CHUNK", 7)  # several lists of keys
    asked = KEYS[::3] + ["absent"]
    with bodies.begin() as conn:
        found = list(rows_by_key(conn, outbox, ("body", "event_key"), asked))
        # The rest of the transaction probes indexes too.
        assert conn.execute(text("SHOW enable_seqscan")).scalar() == "off"
    assert sorted(found) == sorted((f"body of {key}", key) for key in KEYS[::3])
    with bodies.connect() as conn:
        assert conn.execute(text("SHOW enable_seqscan")).scalar() == "on"  # only in that transaction


def test_keys_between_are_every_key_of_the_range_both_ends_included(bodies):
    with bodies.begin() as conn:
        assert sorted(keys_between(conn, outbox, KEYS[10], KEYS[20])) == KEYS[10:21]
        assert list(keys_between(conn, outbox, "k9999", "kzzzz")) == []


def test_keys_are_index_probes_even_where_the_planner_would_read_the_table(bodies):
    every = "SELECT body FROM lead_event_outbox WHERE event_key = ANY(CAST(:keys AS text[]))"
    with bodies.begin() as conn:
        conn.execute(text("ANALYZE lead_event_outbox"))  # one page of rows: cheaper to read whole
        planned = " ".join(conn.execute(text("EXPLAIN " + every), {"keys": KEYS}).scalars())
        list(rows_by_key(conn, outbox, ("body",), KEYS))
        probed = " ".join(conn.execute(text("EXPLAIN " + every), {"keys": KEYS}).scalars())
    assert "Seq Scan" in planned
    assert "Seq Scan" not in probed and "Index" in probed

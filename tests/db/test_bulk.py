"""Bulk writes and reads on real databases (SQLite; PostgreSQL through psycopg2, which takes COPY,
and through psycopg, which takes the unnest insert): what goes in is what comes back, whatever
the text holds."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from sqlalchemy import (
    Boolean, Column, Date, DateTime, Integer, MetaData, String, Table, Text, func, select, text,
)

from lead_sync.clock import as_utc
from lead_sync.db.bulk import insert_rows, update_each
from lead_sync.db.keys import CHUNK, PG_CHUNK, among, chunks, key_chunks
from lead_sync.db.pg_copy import copies, copy_lines, copy_text
from lead_sync.db.stream import stream

metadata = MetaData()
things = Table(
    "things", metadata,
    Column("key", String(40), primary_key=True),
    Column("label", Text),
    Column("n", Integer),
    Column("flag", Boolean),
    Column("day", Date),
    Column("at", DateTime(timezone=True)),
)
COLUMNS = ("key", "label", "n", "flag", "day", "at")
AT = datetime(2026, 11, 27, 10, 11, 12, 123456, tzinfo=timezone.utc)
AWKWARD = ["tab\there", "new\nline", "carriage\rreturn", "back\\slash", "\\N", "\\", "", "Zoë 🙂 ünïcode",
           "  spaced  ", "end\\", "\t\n\\N\r"]


def rows_of(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [(key, label, n, flag, day, as_utc(at)) for key, label, n, flag, day, at
                in conn.execute(select(things).order_by(things.c.key))]


def test_inserted_rows_come_back_as_given(engine):
    metadata.create_all(engine)
    given = [(f"k{i:02}", label, i, i % 2 == 0, date(2026, 11, i % 28 + 1), AT) for i, label in enumerate(AWKWARD)]
    given.append(("k-nulls", None, None, None, None, None))
    with engine.begin() as conn:
        insert_rows(conn, things, COLUMNS, given)
        insert_rows(conn, things, COLUMNS, [])
    assert rows_of(engine) == sorted(given)


def test_rows_given_as_copy_text_already_are_stored_typed(pg_warehouse):
    engine = pg_warehouse.engine
    assert copies(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        insert_rows(conn, things, COLUMNS, [("k", "plain", "12", "t", "2026-11-27", AT.isoformat())])
    assert rows_of(engine) == [("k", "plain", 12, True, date(2026, 11, 27), AT)]


@pytest.mark.parametrize("row", [
    *[(value, "x") for value in AWKWARD], ("a", None), (None, None), ("a", 1), (True, False),
    (date(2026, 1, 2), AT), ("a\tb", "c"), ("a", "b\\"), ("\\N", None),
])
def test_copy_lines_are_what_encoding_each_value_gives(row):
    assert copy_lines([row], 2) == "\t".join(copy_text(value) for value in row) + "\n"


def test_copy_text_escapes_what_would_end_a_value_or_a_row():
    assert copy_text("a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    assert (copy_text(None), copy_text(True), copy_text(False), copy_text(7)) == ("\\N", "t", "f", "7")
    assert copy_text(AT) == "2026-11-27T10:11:12.123456+00:00" and copy_text(date(2026, 1, 2)) == "2026-01-02"


def test_update_each_changes_only_the_rows_its_where_takes_and_says_which(engine):
    metadata.create_all(engine)
    with engine.begin() as conn:
        insert_rows(conn, things, COLUMNS, [(f"k{i}", "old", i, False, None, None) for i in range(5)])
    types = {"key": things.c.key.type, "was": things.c.n.type, "label": things.c.label.type}
    with engine.begin() as conn:
        changed = update_each(conn, things, types,
                              [{"key": f"k{i}", "was": 1 if i == 3 else i, "label": f"new {i}"} for i in range(4)],
                              lambda p: [things.c.key == p("key"), things.c.n == p("was")],
                              lambda p: {"label": p("label"), "flag": True}, matched="key")
        assert update_each(conn, things, types, [{"key": "k4", "was": 4, "label": "x"}],
                           lambda p: [things.c.key == p("key")], lambda p: {"n": p("was") + 10}) is None
    assert sorted(changed) == ["k0", "k1", "k2"]  # k3 was not as the caller said
    assert [(r[0], r[1], r[2], r[3]) for r in rows_of(engine)] == [
        ("k0", "new 0", 0, True), ("k1", "new 1", 1, True), ("k2", "new 2", 2, True), ("k3", "old", 3, False),
        ("k4", "old", 14, False)]


def test_key_chunks_cover_every_key_in_order_in_lists_the_dialect_takes(engine):
    metadata.create_all(engine)
    keys = [f"k{i:05}" for i in range(2 * CHUNK + 1)]
    assert [list(c) for c in chunks(keys, CHUNK)] == [keys[:CHUNK], keys[CHUNK:2 * CHUNK], keys[2 * CHUNK:]]
    with engine.begin() as conn:
        insert_rows(conn, things, COLUMNS, [(key, None, None, None, None, None) for key in keys])
        parts = list(key_chunks(conn, keys))
        limit = PG_CHUNK if engine.dialect.name == "postgresql" else CHUNK
        assert [k for part in parts for k in part] == keys and all(len(part) <= limit for part in parts)
        found = [k for part in parts for k in conn.execute(
            select(things.c.key).where(among(conn, things.c.key, part[1:])).order_by(things.c.key)).scalars()]
    assert found == [k for part in parts for k in part[1:]]


def test_a_stream_yields_every_row_and_keeps_the_result_on_the_server_meanwhile(engine):
    metadata.create_all(engine)
    with engine.begin() as conn:
        insert_rows(conn, things, COLUMNS, [(f"k{i:04}", None, i, None, None, None) for i in range(1_000)])
    with engine.connect() as conn:
        seen = []
        for key, n in stream(conn, select(things.c.key, things.c.n).order_by(things.c.key), size=100):
            if not seen and engine.dialect.name == "postgresql":  # an open cursor of this session
                assert conn.execute(text("SELECT count(*) FROM pg_cursors")).scalar() == 1
            seen.append((key, n))
        assert seen == [(f"k{i:04}", i) for i in range(1_000)]
        assert conn.execute(select(func.count()).select_from(things)).scalar() == 1_000

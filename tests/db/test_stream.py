"""A textual query's rows a bounded chunk at a time (stream.stream_chunks), on SQLite and on PostgreSQL
through psycopg2 (its own named cursor) and psycopg (SQLAlchemy's stream)."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from lead_sync.db.stream import stream_chunks


def test_a_textual_query_comes_in_chunks_of_the_size_asked_with_its_column_names(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n integer, label text)"))
        conn.execute(text("INSERT INTO t VALUES (:n, :label)"), [{"n": n, "label": f"l{n}"} for n in range(7)])
    query = text("SELECT n, label AS \"Label\" FROM t WHERE n >= :low ORDER BY n")
    with engine.connect() as conn:
        # `params` may name more than the query uses.
        chunks = list(stream_chunks(conn, query, {"low": 1, "unused": "x"}, size=2, cursor_name="the_reader"))
    assert [names for names, _ in chunks] == [["n", "Label"]] * 3
    assert [rows for _, rows in chunks] == [[(1, "l1"), (2, "l2")], [(3, "l3"), (4, "l4")], [(5, "l5"), (6, "l6")]]
    assert all(type(row) is tuple for _, rows in chunks for row in rows)


def test_an_empty_result_yields_nothing(engine):
    with engine.connect() as conn:
        assert list(stream_chunks(conn, text("SELECT 1 AS n WHERE 1 = :never"), {"never": 0})) == []


def test_the_rows_stay_on_the_server_until_fetched(engine):
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite reads in process")
    query = text("SELECT n FROM generate_series(1, 10) AS n")
    with engine.connect() as conn:
        chunks = stream_chunks(conn, query, {}, size=3, cursor_name="lead_sync_source_signups")
        names, first = next(chunks)
        open_cursors = conn.execute(text("SELECT count(*) FROM pg_cursors")).scalar()
        if engine.dialect.driver == "psycopg2":  # under the name given, as operators see it
            assert conn.execute(text("SELECT name FROM pg_cursors")).scalars().all() == ["lead_sync_source_signups"]
        assert open_cursors == 1 and first == [(1,), (2,), (3,)]
        assert [row for _, rows in chunks for row in rows] == [(n,) for n in range(4, 11)]
        assert conn.execute(text("SELECT count(*) FROM pg_cursors")).scalar() == 0

"""Reading a large result a bounded number of rows at a time.

A partition's audit rows can be millions: SQLAlchemy's `stream_results` keeps them on the
server (a named cursor on PostgreSQL through psycopg2) and `yield_per` fetches that many per
round trip, so that memory holds one slice of the result, never all of it.
"""
from __future__ import annotations

from typing import Iterator

from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql import Executable

STREAM_ROWS = 50_000  # rows per round trip: twenty for a million rows, one slice of them held at a time


def stream(conn: Connection, query: Executable, size: int = STREAM_ROWS) -> Iterator[Row]:
    """The rows of `query`, `size` at a time from the database, in `conn`'s transaction."""
    result = conn.execute(query.execution_options(stream_results=True, yield_per=size))
    try:
        yield from result
    finally:
        result.close()

"""Many keys in one query, as bounded lists of them.

PostgreSQL takes a whole list as one array value (`column = ANY(:keys)`), so its lists can be
long; elsewhere each key is a bound value of its own (`column IN (...)`), and SQLite refuses
statements with more than 999 of those before version 3.32.
"""
from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

from sqlalchemy import String, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

CHUNK = 500  # keys per IN (...) list
PG_CHUNK = 50_000  # keys per PostgreSQL array (one bound value)

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of `size` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def key_chunks(conn: Connection, keys: Sequence[T]) -> Iterator[Sequence[T]]:
    """`keys` in slices as long as one `among` of this connection's dialect takes."""
    return chunks(keys, PG_CHUNK if conn.dialect.name == "postgresql" else CHUNK)


def among(conn: Connection, column: ColumnElement, chunk: Sequence[str]) -> ColumnElement:
    """`column IN chunk` (text keys): one array value on PostgreSQL, a list of bound values elsewhere."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(chunk), type_=ARRAY(String)))
    return column.in_(chunk)

"""Writing many rows, each with values of its own, in one statement.

SQLAlchemy runs an UPDATE with a list of parameter sets as the driver's executemany, which
psycopg2 sends to PostgreSQL one row at a time: a round trip per row. On PostgreSQL the rows
go instead as one array per parameter, joined to the table with `unnest` (`UPDATE ... FROM
unnest(...) AS v(...)`): one statement, one round trip. New rows go with COPY through psycopg2
(see pg_copy), with `INSERT ... SELECT FROM unnest(...)` through other PostgreSQL drivers:
SQLAlchemy's own multi-row VALUES costs Python work per row and per value, the arrays are
adapted by the driver in C. Elsewhere (SQLite, in process) the executemany is kept, but for an
update that must say which rows it changed: a statement per row.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from sqlalchemy import Table, bindparam, cast, column, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

from lead_sync.db.pg_copy import copies, copy_in

# A row's parameter by name: a bound parameter (executemany) or a column of the unnested arrays.
Ref = Callable[[str], ColumnElement]


def unnested(types: Mapping[str, TypeEngine], rows: Sequence[Mapping]):
    """The rows as one table-valued `unnest` of an array per parameter (PostgreSQL)."""
    arrays = [cast(bindparam(f"{name}_array", [row[name] for row in rows], type_=ARRAY(kind)), ARRAY(kind))
              for name, kind in types.items()]
    return (func.unnest(*arrays).table_valued(*(column(name, kind) for name, kind in types.items()))
            .render_derived(name="v"))


def insert_rows(conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Insert `rows`, each a tuple of the values of `columns`: COPY on PostgreSQL through psycopg2,
    one INSERT ... SELECT FROM unnest on PostgreSQL otherwise, executemany elsewhere. Where COPY
    is used (pg_copy.copies), values may be given as their COPY text already."""
    if not rows:
        return
    if copies(conn):
        copy_in(conn, table.name, columns, rows)
        return
    named = [dict(zip(columns, row)) for row in rows]
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table), named)
        return
    source = unnested({name: table.c[name].type for name in columns}, named)
    conn.execute(insert(table).from_select(list(columns), select(*(source.c[name] for name in columns))))


def update_each(conn: Connection, table: Table, types: Mapping[str, TypeEngine], rows: Sequence[Mapping],
                where: Callable[[Ref], Sequence[ColumnElement]], values: Callable[[Ref], dict], *,
                matched: str | None = None) -> list | None:
    """`UPDATE table SET values(ref) WHERE where(ref)` for each of `rows` (dicts of the parameters
    named in `types`), in one statement on PostgreSQL. With `matched` (one of the parameters), returns
    its value of each row that updated a row of the table (a compare-and-set): PostgreSQL says so
    with RETURNING; elsewhere each row is a statement of its own, and its rowcount says."""
    if not rows:
        return None if matched is None else []
    names = list(types)
    if conn.dialect.name == "postgresql":
        source = unnested(types, rows)

        def ref(name: str) -> ColumnElement:
            return source.c[name]

        statement = update(table).where(*where(ref)).values(**values(ref))
        if matched is None:
            conn.execute(statement)
            return None
        return conn.execute(statement.returning(source.c[matched])).scalars().all()

    def param(name: str) -> ColumnElement:
        # Not a column's own name: SQLAlchemy keeps those for the SET clause.
        return bindparam(f"b_{name}", type_=types[name])

    statement = update(table).where(*where(param)).values(**values(param))
    params = [{f"b_{name}": row[name] for name in names} for row in rows]
    if matched is None:
        conn.execute(statement, params)
        return None
    return [row[matched] for row, one in zip(rows, params) if conn.execute(statement, one).rowcount]

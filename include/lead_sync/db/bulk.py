"""Writing many rows, each with values of its own, in one statement.

SQLAlchemy runs an UPDATE with a list of parameter sets as the driver's executemany, which
psycopg2 sends to PostgreSQL one row at a time: a round trip per row. On PostgreSQL the rows
go instead as one array per parameter, joined to the table with `unnest` (`UPDATE ... FROM
unnest(...) AS v(...)`): one statement, one round trip. Inserts go the same way (`INSERT ...
SELECT FROM unnest(...)`): SQLAlchemy's own multi-row VALUES costs Python work per row and per
value, the arrays are adapted by the driver in C. Elsewhere (SQLite, in process) the
executemany is kept, but for an update that must say which rows it changed: a statement per row.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from sqlalchemy import Table, bindparam, cast, column, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

# A row's parameter by name: a bound parameter (executemany) or a column of the unnested arrays.
Ref = Callable[[str], ColumnElement]


def unnested(types: Mapping[str, TypeEngine], rows: Sequence[Mapping]):
    """The rows as one table-valued `unnest` of an array per parameter (PostgreSQL)."""
    arrays = [cast(bindparam(f"{name}_array", [row[name] for row in rows], type_=ARRAY(kind)), ARRAY(kind))
              for name, kind in types.items()]
    return (func.unnest(*arrays).table_valued(*(column(name, kind) for name, kind in types.items()))
            .render_derived(name="v"))


def insert_each(conn: Connection, table: Table, rows: Sequence[Mapping]) -> None:
    """Insert `rows` (dicts with the same keys, named for the table's columns), in one statement on PostgreSQL."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table), list(rows))
        return
    names = list(rows[0])
    source = unnested({name: table.c[name].type for name in names}, rows)
    conn.execute(insert(table).from_select(names, select(*(source.c[name] for name in names))))


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

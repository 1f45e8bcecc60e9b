"""Insert-or-update in one statement, on every dialect we write to.

PostgreSQL and SQLite say it as `INSERT ... ON CONFLICT (key) DO UPDATE`, MySQL and MariaDB as
`INSERT ... ON DUPLICATE KEY UPDATE` (their conflict is on any unique key, so the tables we upsert
into have their primary key as their only unique one). Each is SQLAlchemy's own construct; this
module only picks the dialect's and names the columns to overwrite. A dialect without either is
refused here, by name, rather than written to with a read-then-write pair that two senders can race.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from lead_sync.db.bulk import unnested


class UnsupportedDialect(RuntimeError):
    """The connection's dialect has no single-statement upsert we know how to write."""


def _insert(conn: Connection, table: Table):
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert
    else:
        raise UnsupportedDialect(f"no upsert for the {name} dialect (tested: postgresql, sqlite, mysql/mariadb)")
    return insert(table)


def upsert(conn: Connection, table: Table, rows: Sequence[Mapping] | Mapping, *,
           update: Sequence[str] | None = None,
           set_: Mapping[str, ColumnElement] | None = None) -> None:
    """Insert `rows` (dicts with the same keys, named for `table`'s columns, one per primary key);
    a row whose primary key is there already has its `update` columns overwritten with the new
    values (default: every column given but the key), then the expressions in `set_` (say
    `{"tries": table.c.tries + 1}`, over the stored row). On conflict nothing else of the stored
    row changes; with nothing to overwrite, a stored row is left as it is."""
    rows = [rows] if isinstance(rows, Mapping) else list(rows)
    if not rows:
        return
    key = [c.name for c in table.primary_key.columns]
    names = list(rows[0])
    if update is None:
        update = [name for name in names if name not in key and name not in (set_ or {})]
    statement = _insert(conn, table)
    params: list[Mapping] | None = rows
    if conn.dialect.name == "postgresql":
        # All rows in one statement, one array per column: an executemany would build and send
        # a VALUES list per thousand rows in Python, several times slower for a batch of bodies.
        source = unnested({name: table.c[name].type for name in names}, rows)
        statement = statement.from_select(names, select(*(source.c[name] for name in names)))
        params = None
    if conn.dialect.name in ("mysql", "mariadb"):
        # MySQL's VALUES(col) / MariaDB's alias: SQLAlchemy spells it `inserted`. With nothing
        # to overwrite, the key is set to itself: INSERT IGNORE would also pass over other errors.
        changes = {name: statement.inserted[name] for name in update} | dict(set_ or {})
        statement = statement.on_duplicate_key_update(changes or {key[0]: table.c[key[0]]})
    else:
        changes = {name: statement.excluded[name] for name in update} | dict(set_ or {})
        statement = (statement.on_conflict_do_update(index_elements=key, set_=changes) if changes
                     else statement.on_conflict_do_nothing(index_elements=key))
    if params is None:
        conn.execute(statement)
    else:
        conn.execute(statement, params)

"""The single-statement upsert on real SQLite and PostgreSQL (both drivers), and the MySQL and
MariaDB statements as their dialects compile them (no MySQL server or driver here)."""
from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, select
from sqlalchemy.dialects import mssql, mysql
from sqlalchemy.dialects.mysql.mariadb import MariaDBDialect

from lead_sync.db.upsert import UnsupportedDialect, upsert


metadata = MetaData()
tally = Table(
    "tally", metadata,
    Column("scope", String(20), primary_key=True),
    Column("name", String(20), primary_key=True),
    Column("a", Text),
    Column("b", Text),
    Column("tries", Integer, nullable=False, default=0),
)


def stored(engine) -> dict[tuple[str, str], tuple]:
    with engine.connect() as conn:
        return {(r.scope, r.name): (r.a, r.b, r.tries) for r in conn.execute(select(tally))}


def put(engine, rows, **options) -> None:
    with engine.begin() as conn:
        upsert(conn, tally, rows, **options)


def test_a_first_upsert_inserts_and_a_second_overwrites_every_column_given(engine):
    metadata.create_all(engine)
    put(engine, [{"scope": "s", "name": "x", "a": "a1", "b": "b1"}, {"scope": "t", "name": "x", "a": "a1", "b": "b1"}])
    put(engine, {"scope": "s", "name": "x", "a": "a2", "b": None})  # one row, as a mapping
    assert stored(engine) == {("s", "x"): ("a2", None, 0), ("t", "x"): ("a1", "b1", 0)}


def test_an_upsert_overwrites_only_the_columns_it_names(engine):
    metadata.create_all(engine)
    put(engine, [{"scope": "s", "name": "x", "a": "a1", "b": "b1"}])
    put(engine, [{"scope": "s", "name": "x", "a": "a2", "b": "b2"}, {"scope": "s", "name": "y", "a": "a", "b": "b"}],
        update=["a"])
    assert stored(engine) == {("s", "x"): ("a2", "b1", 0), ("s", "y"): ("a", "b", 0)}  # a new row: all of it


def test_set_expressions_apply_to_the_stored_row(engine):
    metadata.create_all(engine)
    for n in range(3):
        put(engine, [{"scope": "s", "name": "x", "a": f"a{n}", "b": f"b{n}"}], update=["b"],
            set_={"tries": tally.c.tries + 1})
    assert stored(engine) == {("s", "x"): ("a0", "b2", 2)}  # inserted once, then counted twice


def test_with_nothing_to_overwrite_a_stored_row_is_left_as_it_is(engine):
    metadata.create_all(engine)
    put(engine, [{"scope": "s", "name": "x", "a": "a1", "b": "b1"}])
    put(engine, [{"scope": "s", "name": "x", "a": "a2"}, {"scope": "s", "name": "y", "a": "new"}], update=[])
    put(engine, [{"scope": "s", "name": "x"}])
    put(engine, [])
    assert stored(engine) == {("s", "x"): ("a1", "b1", 0), ("s", "y"): ("new", None, 0)}


class Recorder:
    """A connection of a dialect without a driver here: keeps what it was given to execute."""

    def __init__(self, dialect) -> None:
        self.dialect = dialect
        self.executed: list[tuple] = []

    def execute(self, statement, params=None) -> None:
        self.executed.append((statement, params))


def compiled(dialect, rows, **options) -> tuple[str, list]:
    conn = Recorder(dialect)
    upsert(conn, tally, rows, **options)
    [(statement, params)] = conn.executed
    return str(statement.compile(dialect=dialect, column_keys=list(params[0]))), params


@pytest.mark.parametrize("dialect", [mysql.dialect(), MariaDBDialect()], ids=["mysql", "mariadb"])
def test_mysql_overwrites_the_named_columns_on_a_duplicate_key(dialect):
    rows = [{"scope": "s", "name": "x", "a": "a1", "b": "b1"}]
    sql, params = compiled(dialect, rows, update=["a"], set_={"tries": tally.c.tries + 1})
    assert params == rows
    assert sql.startswith("INSERT INTO tally (scope, name, a, b, tries) VALUES")  # tries: its default, when new
    assert sql.endswith("ON DUPLICATE KEY UPDATE a = VALUES(a), tries = (tally.tries + %s)")
    sql, _ = compiled(dialect, rows)  # default: every column given but the key
    assert sql.endswith("ON DUPLICATE KEY UPDATE a = VALUES(a), b = VALUES(b)")


@pytest.mark.parametrize("dialect", [mysql.dialect(), MariaDBDialect()], ids=["mysql", "mariadb"])
def test_mysql_with_nothing_to_overwrite_keeps_the_row_without_ignoring_errors(dialect):
    sql, _ = compiled(dialect, [{"scope": "s", "name": "x"}])
    assert "IGNORE" not in sql and sql.endswith("ON DUPLICATE KEY UPDATE scope = tally.scope")


def test_a_dialect_without_a_single_statement_upsert_is_refused():
    with pytest.raises(UnsupportedDialect, match="mssql"):
        upsert(Recorder(mssql.dialect()), tally, [{"scope": "s", "name": "x"}])

"""PostgreSQL's COPY ... FROM STDIN, in its text format, through psycopg2.

The fastest way to load many new rows: one stream of tab-separated lines, no statement to
parse or plan per row or per batch, and nothing built in Python per value but the text itself.
"""
from __future__ import annotations

import io
from datetime import date, datetime
from typing import Iterable, Sequence

from sqlalchemy.engine import Connection, Engine

NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copies(bind: Connection | Engine) -> bool:
    """Whether rows can go to the database with COPY (PostgreSQL through psycopg2)."""
    return bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg2"


def copy_text(value: object) -> str:
    """A value in COPY's text format."""
    if value is None:
        return NULL
    if type(value) is str:
        return value.translate(_ESCAPES)
    if value is True or value is False:
        return "t" if value else "f"
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return str(value)


def copy_lines(rows: Iterable[Sequence], width: int) -> str:
    """Rows of `width` values in COPY's text format, each line ended by a newline.

    Most rows are text and NULLs only, with nothing to escape: such a row is joined as it is,
    and checked as a whole (for a tab, newline, carriage return or backslash within a value);
    only a row that has any, or values of other types, is written value by value. Callers that
    load many rows give dates and numbers as their text already, so that their rows take the
    first way.
    """
    lines = []
    for row in rows:
        try:
            line = "\t".join([NULL if value is None else value for value in row])
        except TypeError:  # a value that is not text
            line = None
        if (line is None or line.count("\t") != width - 1 or "\n" in line or "\r" in line
                or line.count("\\") != row.count(None)):
            line = "\t".join([copy_text(value) for value in row])
        lines.append(line)
    lines.append("")
    return "\n".join(lines)


def copy_in(conn: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """COPY rows (sequences of `columns`' values) into `table`, in the connection's transaction."""
    cursor = conn.connection.cursor()
    try:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN",
                           io.StringIO(copy_lines(rows, len(columns))), size=2**20)
    finally:
        cursor.close()

"""Reading lead sources from the warehouse, a bounded chunk of rows at a time."""
from __future__ import annotations

from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Engine

from lead_sync.read.config import SourceConfig, SyncConfig

CHUNK_ROWS = 50_000


def read_source_rows(engine: Engine, config: SyncConfig, source: SourceConfig, window: dict[str, str],
                     chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[list[str], list[tuple]]]:
    """The source's rows in a window (see partition.days_window), a bounded chunk at a time: (the
    lowercased column names, their rows as tuples). Values are kept as the driver returned them
    (integer ids stay exact); the mapping normalises every type it may meet."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg2":
            # psycopg2's own server-side cursor: its rows are the tuples (a text() query's values
            # are the driver's, untouched either way).
            clause = text(config.sql_text(source))
            clause = clause.bindparams(**{k: v for k, v in window.items() if k in clause._bindparams})
            statement = clause.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
            cursor = conn.connection.cursor(name=f"lead_sync_source_{source.name}")
            try:
                cursor.itersize = chunk_rows
                cursor.execute(str(statement), statement.params)
                rows = cursor.fetchmany(chunk_rows)
                columns = [c.name.lower() for c in cursor.description]
                while rows:
                    yield columns, rows
                    rows = cursor.fetchmany(chunk_rows)
            finally:
                cursor.close()
            return
        result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(
            text(config.sql_text(source)), window)
        columns = [c.lower() for c in result.keys()]
        # The size is given here: a text() statement's result does not take yield_per from the
        # execution options, and without a size each partition would be everything left.
        for rows in result.partitions(chunk_rows):
            yield columns, [tuple(row) for row in rows]

"""Reading lead sources from the warehouse, a bounded chunk of rows at a time."""
from __future__ import annotations

import pandas as pd
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from typing import Iterator

from lead_sync.read.config import SourceConfig, SyncConfig
from lead_sync.read.partition import Partition

CHUNK_ROWS = 50_000


def prepare_engine(engine: Engine) -> Engine:
    """SQLite: wait for a competing writer instead of failing at once, and read any TEXT.

    SQLite stores whatever bytes it is given as TEXT; undecodable bytes come back as lone
    surrogates, which the mapping refuses per value instead of the whole read failing.
    """
    if engine.dialect.name == "sqlite" and not getattr(engine, "_lead_sync_prepared", False):
        @event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_connection, _record):  # pragma: no cover - driver callback
            dbapi_connection.execute("PRAGMA busy_timeout = 30000")
            dbapi_connection.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")

        engine._lead_sync_prepared = True  # type: ignore[attr-defined]
        engine.dispose()  # connections opened before the listener would lack it
    return engine


def read_source(engine: Engine, config: SyncConfig, source: SourceConfig, partition: Partition) -> pd.DataFrame:
    """The source's rows around the partition, values kept as the driver returned them.

    dtype=object keeps integer ids exact (a nullable integer column would otherwise
    become float); the mapping normalises every type it may meet.
    """
    with engine.connect() as conn:
        result = conn.execute(text(config.sql_text(source)), partition.sql_window())
        columns = [c.lower() for c in result.keys()]
        return pd.DataFrame(result.fetchall(), columns=columns, dtype=object)


def read_source_rows(engine: Engine, config: SyncConfig, source: SourceConfig, window: dict[str, str],
                     chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[list[str], list[tuple]]]:
    """The source's rows in a window (see partition.days_window), a bounded chunk at a time: (the
    lowercased column names, their rows as tuples). Values are the driver's, as read_source keeps them."""
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

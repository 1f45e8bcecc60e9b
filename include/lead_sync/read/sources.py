"""Reading lead sources from the warehouse, a bounded chunk of rows at a time."""
from __future__ import annotations

from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Engine

from lead_sync.db.stream import stream_chunks
from lead_sync.read.config import SourceConfig, SyncConfig

CHUNK_ROWS = 50_000


def read_source_rows(engine: Engine, config: SyncConfig, source: SourceConfig, window: dict[str, str],
                     chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[list[str], list[tuple]]]:
    """The source's rows in a window (see partition.days_window), a bounded chunk at a time: (the
    lowercased column names, their rows as tuples). Values are kept as the driver returned them
    (integer ids stay exact); the mapping normalises every type it may meet."""
    columns: list[str] | None = None
    with engine.connect() as conn:
        for names, rows in stream_chunks(conn, text(config.sql_text(source)), window, chunk_rows,
                                         cursor_name=f"lead_sync_source_{source.name}"):
            if columns is None:
                columns = [name.lower() for name in names]
            yield columns, rows

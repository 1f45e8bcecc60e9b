"""Engines as the pipeline uses them: the settings a dialect needs before its first connection."""
from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import Engine


def prepare_engine(engine: Engine) -> Engine:
    """SQLite: wait for a competing writer instead of failing at once, and read any TEXT.

    SQLite stores whatever bytes it is given as TEXT; undecodable bytes come back as lone
    surrogates, which the mapping refuses per value instead of the whole read failing.
    Other dialects are returned as they are. Preparing an engine twice changes nothing.
    """
    if engine.dialect.name == "sqlite" and not getattr(engine, "_lead_sync_prepared", False):
        @event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_connection, _record):  # pragma: no cover - driver callback
            dbapi_connection.execute("PRAGMA busy_timeout = 30000")
            dbapi_connection.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")

        engine._lead_sync_prepared = True  # type: ignore[attr-defined]
        engine.dispose()  # connections opened before the listener would lack it
    return engine

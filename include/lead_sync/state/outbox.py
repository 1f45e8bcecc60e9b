"""The outbox: the exact body to send of each open event (the audit's copy of a payload is redacted).

Recording puts the body of every event it leaves pending and drops that of every event it
closes; a sender reads the bodies of the events it claims, and drops those it delivered or
that were rejected.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from sqlalchemy import delete
from sqlalchemy.engine import Connection

from lead_sync.db.bulk import insert_rows
from lead_sync.db.keys import among, key_chunks
from lead_sync.db.pg_copy import copies
from lead_sync.db.schema import outbox
from lead_sync.db.upsert import upsert

_COLUMNS = ("event_key", "body")


def put_bodies(conn: Connection, bodies: Mapping[str, str]) -> None:
    """The body of each key, in place of any it has."""
    if bodies:
        upsert(conn, outbox, [{"event_key": key, "body": body} for key, body in sorted(bodies.items())])


def add_bodies(conn: Connection, bodies: Mapping[str, str]) -> None:
    """The body of each key, where the keys were read without one (the bulk of them: the events
    just recorded). With COPY, two to three times faster than the upsert for a batch of new
    bodies; a key that has one after all fails the COPY, and then every body is put in place of any."""
    if not bodies:
        return
    if not copies(conn):
        put_bodies(conn, bodies)
        return
    savepoint = conn.begin_nested()  # a failed COPY aborts the transaction: only back to here
    try:
        insert_rows(conn, outbox, _COLUMNS, sorted(bodies.items()))
    except conn.dialect.dbapi.IntegrityError:
        savepoint.rollback()
        put_bodies(conn, bodies)
    else:
        savepoint.commit()


def drop_bodies(conn: Connection, keys: Sequence[str]) -> None:
    """No body for these keys (any they have is deleted)."""
    for chunk in key_chunks(conn, list(keys)):
        conn.execute(delete(outbox).where(among(conn, outbox.c.event_key, chunk)))

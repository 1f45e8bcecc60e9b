"""One holder at a time across sessions, processes and machines: PostgreSQL's advisory locks."""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection


def lock_for_transaction(conn: Connection, name: str) -> None:
    """Wait for the lock called `name` and hold it until `conn`'s transaction ends (PostgreSQL)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": name})

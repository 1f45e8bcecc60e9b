"""What recording a batch writes, in one transaction, and the compare-and-set that guards it.

A sender may claim, send and settle an event between the read of its row and the write that
follows: every write that depends on what was read is made only where the row is still as read
(see as_read), and an event changed meanwhile is left as the sender has it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Connection

from lead_sync.db.bulk import Ref, insert_rows, update_each
from lead_sync.db.schema import deliveries
from lead_sync.state.outbox import add_bodies, drop_bodies, put_bodies

# The columns of a new audit row, in the order of Writes.inserts.
INSERTED = ("event_key", "source", "partition_date", "customer_external_id", "event_name", "tracking", "status",
            "reason", "notes", "payload", "payload_sha256", "event_time", "attempts", "created_at", "updated_at",
            "last_run_id")

AS_READ_TYPES = {"b_key": deliveries.c.event_key.type, "was_status": deliveries.c.status.type,
                 "was_attempts": deliveries.c.attempts.type}


def as_read(p: Ref) -> list:
    """Where an audit row is still as the run read it (`was_status`, `was_attempts`) and no sender
    holds it. Every claim adds an attempt (only a claim given back unsent takes it off again), so
    a row that passes was not claimed, sent or settled since it was read."""
    d = deliveries.c
    return [d.status == p("was_status"), d.attempts == p("was_attempts"), d.inflight_until.is_(None)]


def _update_rows(conn: Connection, rows: list[dict]) -> list[str]:
    """Update audit rows by key (`b_key`), all with the same columns, where each is still as read
    (`was_status`, `was_attempts`): one statement on PostgreSQL (bulk.update_each). Returns the keys
    updated."""
    if not rows:
        return []
    columns = [c for c in rows[0] if c not in AS_READ_TYPES]
    return update_each(conn, deliveries, {**AS_READ_TYPES, **{c: deliveries.c[c].type for c in columns}}, rows,
                       lambda p: [deliveries.c.event_key == p("b_key"), *as_read(p)],
                       lambda p: {c: p(c) for c in columns}, matched="b_key")


def _touch_rows(conn: Connection, rows: list[tuple[str, str, int]], run_id: str, now: datetime) -> list[str]:
    """Mark rows (key, status and attempts as read) as re-evaluated by this run, nothing else of
    them changed, where each is still as read. Returns the keys touched."""
    return update_each(conn, deliveries, AS_READ_TYPES,
                       [{"b_key": key, "was_status": status, "was_attempts": attempts}
                        for key, status, attempts in sorted(rows)],
                       lambda p: [deliveries.c.event_key == p("b_key"), *as_read(p)],
                       lambda p: dict(updated_at=now, last_run_id=run_id), matched="b_key")


@dataclass
class Writes:
    """What recording a batch of events writes, in one transaction (see decide.decide). New events
    go in with their bodies. Every other write depends on the row as read and is made only where
    it is still so (as_read); an event a sender changed meanwhile keeps its row and its body, and
    is counted in `meanwhile` ("changed_meanwhile")."""

    run_id: str
    now: datetime
    inserts: list[tuple]  # of INSERTED (see decide.decide's `copying`)
    new_bodies: dict[str, str]  # the outbox's body of each new event to send
    new_dropped: list[str]  # new events not to send: no body in the outbox
    updates: list[dict]  # each with the row's status and attempts as read (was_status, was_attempts)
    touched: list[tuple[str, str, int]]  # (key, status, attempts as read) of rows re-evaluated and unchanged
    bodies: dict[str, str]  # the outbox's body of updated or touched rows
    replaced: list[str]  # those of them that have a body on record
    dropped: list[str]  # updated or touched rows without a body in the outbox
    meanwhile: Counter

    def __call__(self, conn: Connection) -> None:
        self.inserts.sort()  # by key, as the key index has them
        insert_rows(conn, deliveries, INSERTED, self.inserts)
        self.updates.sort(key=lambda row: row["b_key"])
        written = set(_update_rows(conn, self.updates))
        written.update(_touch_rows(conn, self.touched, self.run_id, self.now))
        left = len(self.updates) + len(self.touched) - len(written)
        if left:
            self.meanwhile["changed_meanwhile"] += left
        added, replacing = dict(self.new_bodies), {}
        if self.bodies:
            replaced = set(self.replaced)
            for key, body in self.bodies.items():
                if key in written:
                    (replacing if key in replaced else added)[key] = body
        add_bodies(conn, added)
        put_bodies(conn, replacing)
        drop_bodies(conn, self.new_dropped + [key for key in self.dropped if key in written])

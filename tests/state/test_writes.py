"""A batch's writes on real warehouses: new rows go in with their bodies; every other write is made
only where the row is still as the run read it, and a row a sender changed meanwhile keeps its
row and its body and is counted."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, update

from lead_sync.clock import as_utc
from lead_sync.db.bulk import insert_rows
from lead_sync.db.schema import deliveries, ensure_schema, outbox
from lead_sync.events import NON_DEFERRED, PENDING, SKIPPED
from lead_sync.state.outbox import put_bodies
from lead_sync.state.writes import INSERTED, Writes

READ_AT = datetime(2026, 11, 27, 10, tzinfo=timezone.utc)
NOW = READ_AT + timedelta(minutes=5)
DAY = READ_AT.date()


def new_row(key: str, status: str = PENDING) -> tuple:
    values = dict(event_key=key, source="signups", partition_date=DAY, customer_external_id=key, event_name="e",
                  tracking=NON_DEFERRED, status=status, reason=None, notes=None, payload="{}", payload_sha256="0",
                  event_time=READ_AT, attempts=0, created_at=READ_AT, updated_at=READ_AT, last_run_id="run-1")
    return tuple(values[name] for name in INSERTED)


def rewrite(key: str, status: str = PENDING) -> dict:
    return dict(source="signups", tracking=NON_DEFERRED, customer_external_id=key, event_name="e", reason="changed",
                notes=None, payload="{}", payload_sha256="1", event_time=READ_AT, updated_at=NOW, last_run_id="run-2",
                retry_since=None, next_attempt_at=None, b_key=key, status=status, was_status=PENDING, was_attempts=0)


def state(engine) -> tuple[dict[str, dict], dict[str, str]]:
    with engine.connect() as conn:
        rows = {r["event_key"]: dict(r) for r in conn.execute(select(deliveries)).mappings()}
        return rows, dict(conn.execute(select(outbox.c.event_key, outbox.c.body)).all())


def test_writes_change_only_rows_still_as_read_and_count_the_others(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    with engine.begin() as conn:  # what the run read: seven open events, four with a body
        insert_rows(conn, deliveries, INSERTED, [new_row(k) for k in "abcfghj"])
        put_bodies(conn, {k: f"{k} as read" for k in "abfg"})
    with engine.begin() as conn:  # meanwhile a sender claims b, g and h
        conn.execute(update(deliveries).where(deliveries.c.event_key.in_(["b", "g", "h"]))
                     .values(attempts=1, inflight_until=NOW + timedelta(minutes=1), last_run_id="sender"))
    meanwhile = Counter()
    writes = Writes("run-2", NOW, inserts=[new_row("e", SKIPPED), new_row("d")], new_bodies={"d": "d new"},
                    new_dropped=["e"],
                    updates=[rewrite("a"), rewrite("b"), rewrite("f", SKIPPED), rewrite("g", SKIPPED),
                             rewrite("j")],
                    touched=[("c", PENDING, 0), ("h", PENDING, 0)],
                    bodies={"a": "a new", "b": "b new", "c": "c mended", "h": "h mended", "j": "j new"},
                    replaced=["a", "b"], dropped=["f", "g"], meanwhile=meanwhile)
    with engine.begin() as conn:
        writes(conn)
    rows, bodies = state(engine)
    assert meanwhile == {"changed_meanwhile": 3}  # b, g, h
    assert {k: (r["status"], r["reason"], r["last_run_id"]) for k, r in rows.items()} == {
        "a": (PENDING, "changed", "run-2"), "f": (SKIPPED, "changed", "run-2"), "j": (PENDING, "changed", "run-2"),
        "c": (PENDING, None, "run-2"),  # touched: re-evaluated, nothing else changed
        "b": (PENDING, None, "sender"), "g": (PENDING, None, "sender"), "h": (PENDING, None, "sender"),
        "d": (PENDING, None, "run-1"), "e": (SKIPPED, None, "run-1")}
    assert as_utc(rows["c"]["updated_at"]) == NOW and as_utc(rows["h"]["updated_at"]) == READ_AT
    assert bodies == {"a": "a new", "c": "c mended", "j": "j new", "d": "d new",  # written
                      "b": "b as read", "g": "g as read"}  # as the sender took them

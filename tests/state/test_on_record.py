"""What the delivery state holds, read on real warehouses (and through both PostgreSQL drivers: the
rerun's row reads take psycopg2's own cursor, any other driver SQLAlchemy's)."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from lead_sync.clock import as_utc
from lead_sync.db.bulk import insert_rows
from lead_sync.db.schema import deliveries, ensure_schema
from lead_sync.events import DELIVERED, FAILED, PENDING
from lead_sync.state import on_record
from lead_sync.state.on_record import (
    LOADED, open_partition_days, recorded_keys, recorded_sources, rows_on_record,
)
from lead_sync.state.outbox import put_bodies
from lead_sync.state.writes import INSERTED


DAY = date(2026, 11, 27)
AT = datetime(2026, 11, 27, 9, 30, tzinfo=timezone.utc)


def seed(engine, rows: list[tuple[str, str, date, str]], bodies: list[str]) -> None:
    """Audit rows (key, source, day, status), and a body for each of `bodies`."""
    ensure_schema(engine)
    values = []
    for n, (key, source, day, status) in enumerate(rows):
        row = dict(event_key=key, source=source, partition_date=day, customer_external_id=str(n), event_name="e",
                   tracking="non_deferred", status=status, reason=f"r{n}" if n % 2 else None, notes=None,
                   payload="{}", payload_sha256=f"{n:064x}", event_time=AT + timedelta(seconds=n), attempts=n % 3,
                   created_at=AT, updated_at=AT, last_run_id="run")
        values.append(tuple(row[name] for name in INSERTED))
    with engine.begin() as conn:
        insert_rows(conn, deliveries, INSERTED, values)
        put_bodies(conn, {key: "{}" for key in bodies})


@pytest.mark.parametrize("rows", [10, 2 * on_record.RANGE_ROWS], ids=["few", "a_key_range"])
def test_rows_on_record_are_the_rows_of_the_keys_asked_with_whether_each_has_a_body(engine, rows):
    keys = [f"{n:04}" for n in range(rows)]
    seed(engine, [(key, "signups", DAY, PENDING) for key in keys], bodies=[k for k in keys if int(k) % 3])
    with engine.begin() as conn:  # the body of a key in the batch's range but not asked about, and one not on record
        put_bodies(conn, {"0001x": "{}", "zzzz": "{}"})
    asked = [k for k in keys if int(k) % 4] + ["0001x", "absent"]
    with engine.begin() as conn:
        found = rows_on_record(conn, asked)
    assert set(found) == {k for k in keys if int(k) % 4}
    for key, row in found.items():
        n = int(key)
        assert set(row) == {*LOADED, "has_body"} and row["has_body"] == bool(n % 3)
        assert (row["source"], row["partition_date"], row["status"], row["attempts"], row["reason"]) == (
            "signups", DAY, PENDING, n % 3, f"r{n}" if n % 2 else None)
        assert as_utc(row["event_time"]) == AT + timedelta(seconds=n) and row["inflight_until"] is None


def test_recorded_keys_sources_and_open_partitions(engine):
    later = DAY + timedelta(days=1)
    seed(engine, [("a", "signups", DAY, DELIVERED), ("b", "verifications", DAY, PENDING),
                  ("c", "signups", later, FAILED), ("d", "demo", later, PENDING)], bodies=[])
    assert recorded_keys(engine, DAY) == {"a": "signups", "b": "verifications"}
    assert recorded_keys(engine, DAY, ["b", "c", "absent"]) == {"b": "verifications"}
    assert sorted(recorded_sources(engine, later)) == [("c", "signups"), ("d", "demo")]
    # Open: a pending event of one of these sources (failed is final).
    assert open_partition_days(engine, ["signups", "verifications"]) == {DAY}
    assert open_partition_days(engine, ["signups", "demo"]) == {later}

"""Copying the audit from a separate state store (PostgreSQL) to the warehouse (SQLite and PostgreSQL):
each row reaches the warehouse once however often it is copied, and a row changed in the state store
replaces the warehouse's copy of it."""
from __future__ import annotations

from datetime import date, datetime

import pytest
from sqlalchemy import func, insert, select, text, update

from lead_sync.audit import publish, runs
from lead_sync.clock import as_utc, utcnow
from lead_sync.db.schema import (AUDIT_TABLES, attempts, deliveries, dry_run_events, send_batches, source_reads,
                                 sync_runs)
from lead_sync.db.stores import Stores, ensure_stores, open_stores
from lead_sync.delivery.policy import SendReport
from tests.support import pg_database

DAY = date(2026, 11, 27)
RUN = "manual__publish"
KEYS = [f"key-{n:02d}" for n in range(6)]
GENERATED = {"id"}  # each database numbers its append-only rows itself


@pytest.fixture
def state_db():
    with pg_database() as (_, engine):
        yield engine


@pytest.fixture
def stores(warehouse, state_db) -> Stores:
    both = open_stores(warehouse.engine, state_db)
    ensure_stores(both)
    return both


def seed(stores: Stores, keys=KEYS) -> None:
    """A run's audit in the state store: its row and batch, events, attempts, reads, a dry run's events."""
    state, now = stores.state, utcnow()
    runs.start_run(state, RUN, DAY, "lead_events_sync")
    runs.start_batch(state, RUN, 0, "worker-a")
    with state.begin() as conn:
        conn.execute(insert(deliveries), [dict(
            event_key=k, source="signups", partition_date=DAY, tracking="non_deferred", status="pending",
            attempts=1, created_at=now, updated_at=now) for k in keys])
        conn.execute(insert(attempts), [dict(event_key=k, attempt=1, run_id=RUN, sent_at=now, outcome="delivered")
                                        for k in keys])
        conn.execute(insert(source_reads), [dict(
            run_id=RUN, partition_date=DAY, source=source, read_at=now, lookback=False, rows_read=3, events=3,
            repeats=0, missing=0) for source in ("signups", "verifications")])
        conn.execute(insert(dry_run_events), [dict(
            run_id="manual__dry", event_key=k, partition_date=DAY, source="signups", tracking="non_deferred",
            status="pending", would_send=True) for k in keys])


def _plain(value):
    return as_utc(value) if isinstance(value, datetime) else value


def audit(engine) -> dict[str, list[tuple]]:
    """Every audit row, but the ids each database generates, in a stable order."""
    out = {}
    with engine.connect() as conn:
        for table in AUDIT_TABLES:
            columns = [c for c in table.columns if c.name not in GENERATED]
            rows = conn.execute(select(*columns)).all()
            out[table.name] = sorted((tuple(_plain(v) for v in row) for row in rows), key=repr)
    return out


def counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in AUDIT_TABLES}


def test_copying_twice_writes_each_row_once(stores):
    seed(stores)
    total = sum(counts(stores.state).values())
    assert publish.publish_audit(stores) == total
    assert audit(stores.warehouse) == audit(stores.state)
    assert publish.publish_audit(stores) == 0  # nothing changed since
    # The warehouse committed a copy that the state store never marked (a crash in between): the
    # next copy writes every row again, and the warehouse still holds each once.
    with stores.state.begin() as conn:
        for table in AUDIT_TABLES:
            conn.execute(text(f"UPDATE {table.name} SET published_seq = NULL"))
    assert publish.publish_audit(stores) == total
    assert counts(stores.warehouse) == counts(stores.state)
    assert audit(stores.warehouse) == audit(stores.state)


def test_a_changed_row_replaces_the_warehouses_copy(stores):
    seed(stores)
    publish.publish_audit(stores)
    before = counts(stores.warehouse)
    with stores.state.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.event_key == KEYS[0]).values(
            status="delivered", http_status=200, delivered_at=utcnow()))
    runs.finish_batch(stores.state, RUN, 0, runs.SEND_OK, SendReport(requests=6, delivered=6))
    runs.set_send_result(stores.state, RUN, runs.SEND_OK, None)
    assert publish.publish_audit(stores) == 3  # the event, the batch and the run's row
    assert counts(stores.warehouse) == before
    assert audit(stores.warehouse) == audit(stores.state)
    with stores.warehouse.connect() as conn:
        status = conn.execute(select(deliveries.c.status).where(deliveries.c.event_key == KEYS[0])).scalar()
        assert status == "delivered"
        assert conn.execute(select(send_batches.c.result)).scalar() == runs.SEND_OK
        assert conn.execute(select(sync_runs.c.send_result)).scalar() == runs.SEND_OK


def test_a_copy_in_several_chunks_keeps_every_row(stores, monkeypatch):
    # A dry run's events are replaced as a whole: its later chunks must not delete what the
    # earlier chunks of the same copy wrote.
    monkeypatch.setattr(publish, "CHUNK", 4)
    keys = [f"key-{n:02d}" for n in range(10)]
    seed(stores, keys)
    publish.publish_audit(stores)
    assert counts(stores.warehouse) == counts(stores.state)
    assert counts(stores.warehouse)[dry_run_events.name] == len(keys)
    assert audit(stores.warehouse) == audit(stores.state)

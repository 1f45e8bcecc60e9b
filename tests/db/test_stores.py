"""A separate state store (connection lead_sync_state): the warehouse sees reads of its sources and
one audit copy per batch, and auditors find the same rows there as without a state store."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, select, text

from cutmeshort_sandbox import SandboxServer
from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.db.schema import attempts, deliveries, send_batches, source_reads, sync_runs
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.read.config import load_config
from lead_sync.audit.publish import publish_audit
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.db.stores import StateStoreError, Stores, ensure_stores, open_stores

from tests.support.dagrun import run_dag
from tests.support import (TOKEN, Warehouse, allow_connections, pg_commits, pg_database, pg_url, signups,
                     verifications)
from tests.support.seeding import DAY, PARTITION, signup, verification

RUN = "manual__state_store"


@pytest.fixture
def state_db():
    with pg_database() as (_, engine):
        yield engine


@pytest.fixture
def other_pg_warehouse():
    with pg_database() as (name, engine):
        yield Warehouse("postgres", pg_url(name), engine)


def _seed_sources(wh: Warehouse) -> None:
    wh.create_sources()
    wh.add(signups, *(signup(n, n) for n in range(1, 13)), signup(20, 30, deferred=True),
           {**signup(21, 31), "click_id": None}, signup(22, 32))
    wh.add(verifications, verification(20), verification(21, 40))


def _run(stores: Stores, sandbox, wh: Warehouse, measure: bool = False) -> dict:
    """A whole run through the core: extract, plan, every batch, the summary. With `measure`, the
    warehouse's commits during sending (its engine is disposed around it, which flushes each
    connection's statistics)."""
    ensure_stores(stores)  # as each task does before its stage
    stages.extract_and_map(stores, load_config(), PARTITION, RUN)
    batches = stages.plan_send(stores, RUN, 120, batch_size=4, max_batches=16)
    stores.warehouse.dispose()
    before = pg_commits(wh.url.database)
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as client:
        limiter = SharedRateLimiter(stores.state, "state-store-bucket", 600)
        for batch in batches:
            stages.send_open_events(stores, client, limiter, RetryPolicy(2, 0.05, 0.2), RUN, 120,
                                      "cutmeshort_default", batch, f"worker-{batch.batch % 2}")
    stores.warehouse.dispose()
    sent_commits = pg_commits(wh.url.database) - before
    summary = runs.summarise(stores, RUN, DAY)
    return {"batches": len(batches), "commits": sent_commits, "summary": summary}


# What an auditor compares: every audit row but the moments it was written.
MOMENTS = {"created_at", "updated_at", "first_attempt_at", "last_attempt_at", "delivered_at", "retry_since",
           "next_attempt_at", "sent_at", "latency_ms", "started_at", "finished_at", "read_at", "id",
           "send_deadline", "inflight_until", "inflight_run_id",
           "response"}  # the API's answer carries its own clock


def _audit(engine) -> dict:
    def rows(table, *order):
        with engine.connect() as conn:
            found = conn.execute(select(table).order_by(*order)).mappings().all()
        return [{k: v for k, v in r.items() if k not in MOMENTS} for r in found]

    with engine.connect() as conn:
        daily = [tuple(r) for r in conn.execute(text(
            "SELECT partition_date, source, event_name, status, events, requests FROM lead_event_daily "
            "ORDER BY source, event_name, status"))]
        reconciliation = [tuple(r) for r in conn.execute(text(
            "SELECT partition_date, source, source_rows, delivered, rejected, failed, skipped, pending, repeat, "
            "no_longer_in_source, unaccounted, read_by_run FROM lead_event_reconciliation "
            "ORDER BY partition_date, source"))]
    return {
        "deliveries": rows(deliveries, deliveries.c.event_key),
        "attempts": rows(attempts, attempts.c.event_key, attempts.c.attempt),
        "runs": rows(sync_runs, sync_runs.c.run_id),
        "batches": rows(send_batches, send_batches.c.batch),
        "reads": rows(source_reads, source_reads.c.source),
        "daily": daily,
        "reconciliation": reconciliation,
    }


def _sandbox():
    server = SandboxServer(host="127.0.0.1", port=0, token=TOKEN, rate_limit_per_minute=600)
    server.set_faults({"permanent_errors": {"22": 422}})
    return server


def test_with_a_state_store_the_warehouse_commits_once_per_batch_and_holds_the_same_audit(
        pg_warehouse, other_pg_warehouse, state_db):
    # Without a state store: everything in the warehouse, as by default.
    _seed_sources(other_pg_warehouse)
    with _sandbox() as plain_api:
        plain_engine = create_engine(other_pg_warehouse.url)
        plain = _run(Stores(plain_engine, plain_engine), plain_api, other_pg_warehouse)
        plain_engine.dispose()
        plain_requests = len(plain_api.requests())
    # With one: the same sources, the same answers.
    _seed_sources(pg_warehouse)
    # The warehouse engine as Airflow's hook builds it (no pre-ping: a ping would be a transaction).
    warehouse = create_engine(pg_warehouse.url)
    stores = open_stores(warehouse, state_db)
    with _sandbox() as api:
        split = _run(stores, api, pg_warehouse)
        assert len(api.requests()) == plain_requests == 15

    assert split["batches"] == plain["batches"] == 4
    # One audit copy per batch; without a state store, several transactions per event.
    print(f"\nwarehouse commits while sending {split['batches']} batches of {plain_requests} requests: "
          f"{split['commits']} with a state store, {plain['commits']} without")
    assert 1 <= split["commits"] <= split["batches"], split
    assert plain["commits"] > 2 * plain_requests, plain
    assert (split["summary"].outcome, split["summary"].counts) == (plain["summary"].outcome, plain["summary"].counts)
    assert split["summary"].counts == {"delivered": 14, "rejected": 1, "skipped": 2}
    audit = _audit(pg_warehouse.engine)
    assert audit == _audit(other_pg_warehouse.engine)
    assert len(audit["attempts"]) == 15 and len(audit["batches"]) == 4
    # The state store keeps the outbox and the rate-limit window; the warehouse has none of them.
    with pg_warehouse.engine.connect() as conn:
        tables = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert {"lead_event_outbox", "lead_event_rate_slots", "lead_event_alert_state"}.isdisjoint(tables)
    warehouse.dispose()


def test_an_audit_copy_that_fails_is_written_by_the_next_one(pg_warehouse, state_db, sandbox):
    _seed_sources(pg_warehouse)
    stores = open_stores(pg_warehouse.engine, state_db)
    ensure_stores(stores)
    stages.extract_and_map(stores, load_config(), PARTITION, RUN)
    (batch,) = stages.plan_send(stores, RUN, 120, batch_size=500, max_batches=16)
    sandbox.set_faults({"permanent_errors": {"22": 422}})
    # The warehouse goes away while the batch sends: the state store records every outcome, the
    # batch's copy fails and says so, and nothing the API answered is lost.
    allow_connections(pg_warehouse.url.database, False)
    try:
        with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as client:
            limiter = SharedRateLimiter(stores.state, "state-store-bucket", 600)
            report = stages.send_open_events(stores, client, limiter, RetryPolicy(2, 0.05, 0.2), RUN, 120,
                                               "cutmeshort_default", batch, "worker-a")
    finally:
        allow_connections(pg_warehouse.url.database, True)
    assert report.delivered == 14 and report.rejected == 1
    with pg_warehouse.engine.connect() as conn:
        assert conn.execute(select(attempts.c.event_key)).first() is None  # not copied yet
    # The summary's copy writes what was missing.
    summary = runs.summarise(stores, RUN, DAY)
    assert summary.counts == {"delivered": 14, "rejected": 1, "skipped": 2}
    wh = _audit(pg_warehouse.engine)
    assert len(wh["attempts"]) == 15 and {r["status"] for r in wh["deliveries"]} == {"delivered", "rejected", "skipped"}
    assert wh["runs"][0]["outcome"] == "success" and wh["batches"][0]["delivered"] == 14
    assert publish_audit(stores) == 0  # nothing left to copy
    assert len(sandbox.requests()) == 15


def test_a_copy_repeated_after_a_crash_writes_each_row_once(pg_warehouse, state_db, sandbox):
    _seed_sources(pg_warehouse)
    stores = open_stores(pg_warehouse.engine, state_db)
    ensure_stores(stores)
    stages.extract_and_map(stores, load_config(), PARTITION, RUN)
    tables = ("lead_event_deliveries", "lead_event_sync_runs", "lead_event_source_reads")

    def counts() -> list[int]:
        with pg_warehouse.engine.connect() as conn:
            return [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables]

    copied = counts()
    assert copied[:2] == [17, 1] and copied[2] > 0
    # The warehouse committed a copy but the state store never marked it (a crash in between).
    with state_db.begin() as conn:
        for table in tables:
            conn.execute(text(f"UPDATE {table} SET published_seq = NULL"))
    assert publish_audit(stores) == sum(copied)
    assert counts() == copied


def test_a_state_store_must_be_another_postgresql_database(pg_warehouse, tmp_path):
    sqlite = create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with pytest.raises(StateStoreError, match="'lead_sync_state' must be a PostgreSQL database"):
        open_stores(pg_warehouse.engine, sqlite)
    same = create_engine(pg_url(pg_warehouse.url.database))
    try:
        with pytest.raises(StateStoreError, match="is the warehouse's own database"):
            open_stores(pg_warehouse.engine, same)
    finally:
        same.dispose()
    assert not open_stores(pg_warehouse.engine, None).separate


def _conn_json(database: str) -> str:
    return Warehouse("postgres", pg_url(database), None).airflow_conn


def test_the_dag_keeps_its_state_in_lead_sync_state_when_that_connection_exists(
        airflow_db, pg_warehouse, state_db, sandbox, monkeypatch):
    _seed_sources(pg_warehouse)
    sandbox.set_faults({"permanent_errors": {"22": 422}})
    monkeypatch.setenv("AIRFLOW_CONN_LEAD_SYNC_STATE", _conn_json(state_db.url.database))
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": str(DAY)}) == "success"
    assert pg_warehouse.status_counts() == {"delivered": 14, "rejected": 1, "skipped": 2}
    assert len(pg_warehouse.attempts()) == len(sandbox.requests()) == 15
    with state_db.connect() as conn:  # the state, the outbox and the rate-limit window are here
        assert conn.execute(text("SELECT count(*) FROM lead_event_rate_slots")).scalar() == 15
        assert conn.execute(text("SELECT count(*) FROM lead_event_deliveries")).scalar() == 17
    # A rerun sends nothing, as without a state store.
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": str(DAY)}) == "success"
    assert len(sandbox.requests()) == 15


def test_the_dag_refuses_a_state_store_that_is_not_postgresql(airflow_db, pg_warehouse, sandbox, monkeypatch,
                                                               tmp_path, caplog, capfd):
    _seed_sources(pg_warehouse)
    monkeypatch.setenv("AIRFLOW_CONN_LEAD_SYNC_STATE",
                       json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "state.db")}))
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": str(DAY)}) == "failed"
    out, err = capfd.readouterr()
    assert "connection 'lead_sync_state' must be a PostgreSQL database (it is sqlite)" in caplog.text + out + err
    assert sandbox.requests() == []


def test_ensuring_the_stores_again_only_reads_and_puts_back_a_lost_mark(pg_warehouse, state_db):
    from sqlalchemy import event

    stores = open_stores(pg_warehouse.engine, state_db)
    ensure_stores(stores)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement.lstrip().split(None, 1)[0].upper())

    for engine in (stores.state, stores.warehouse):
        event.listen(engine, "before_cursor_execute", seen)
    try:
        # Every task ensures the stores first: once they are there, that is catalog reads only (a
        # CREATE OR REPLACE TRIGGER would lock its audit table against the senders writing it).
        ensure_stores(stores)
        assert statements and set(statements) <= {"SELECT", "WITH"}, statements
        with state_db.begin() as conn:
            conn.execute(text("DROP TRIGGER lead_event_deliveries_changed ON lead_event_deliveries"))
        ensure_stores(stores)
    finally:
        for engine in (stores.state, stores.warehouse):
            event.remove(engine, "before_cursor_execute", seen)
    with state_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgname = 'lead_event_deliveries_changed'")
                            ).scalar() == 1

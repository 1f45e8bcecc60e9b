"""The audit schema: created when missing, and brought up to date when made by an earlier version."""
from __future__ import annotations

from sqlalchemy import inspect

from lead_sync.db.schema import ensure_schema


def test_tables_made_by_an_earlier_version_get_the_new_columns_and_indexes(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    with engine.begin() as conn:  # as the previous version left them
        conn.exec_driver_sql("DROP INDEX ix_lead_event_deliveries_partition")
        for table, column in (("lead_event_deliveries", "retry_since"), ("lead_event_deliveries", "next_attempt_at"),
                              ("lead_event_sync_runs", "dag_id")):
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.exec_driver_sql("INSERT INTO lead_event_sync_runs (run_id, partition_date, started_at, outcome) "
                             "VALUES ('old', '2026-11-20', '2026-11-21 00:00:00', 'success')")
    ensure_schema(engine)
    found = inspect(engine)
    assert {"retry_since", "next_attempt_at"} <= {c["name"] for c in found.get_columns("lead_event_deliveries")}
    assert "dag_id" in {c["name"] for c in found.get_columns("lead_event_sync_runs")}
    assert "ix_lead_event_deliveries_partition" in {i["name"] for i in found.get_indexes("lead_event_deliveries")}
    with engine.connect() as conn:  # rows kept, new column empty
        assert conn.exec_driver_sql("SELECT run_id, dag_id FROM lead_event_sync_runs").all() == [("old", None)]
    ensure_schema(engine)  # nothing left to add: a no-op

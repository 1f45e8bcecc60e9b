"""The delivery audit schema: what the pipeline keeps in the warehouse.

`lead_event_deliveries` is also the state of each event (the pipeline resumes from it);
`lead_event_outbox` holds the exact body of each event still to be sent, because the
audit copy of a payload is redacted. The rate-limit tables let every sender in a
deployment share one request budget.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

from sqlalchemy import (
    BigInteger,
    Boolean,
    inspect,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

metadata = MetaData()
TS = DateTime(timezone=True)

deliveries = Table(
    "lead_event_deliveries",
    metadata,
    Column("event_key", String(64), primary_key=True),
    Column("source", String(100), nullable=False),
    Column("partition_date", Date, nullable=False),
    Column("customer_external_id", String(255)),
    Column("event_name", String(255)),
    Column("tracking", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("reason", Text),
    Column("notes", Text),
    Column("payload", Text),  # JSON as sent, names and emails hashed
    Column("payload_sha256", String(64)),
    Column("event_time", TS),
    Column("attempts", Integer, nullable=False, default=0),
    Column("http_status", Integer),
    Column("response", Text),  # the API's last answer, truncated
    Column("first_attempt_at", TS),
    Column("last_attempt_at", TS),
    Column("delivered_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("last_run_id", String(250)),
    # Set while a request for this event may be on the wire: a lease, so that two
    # senders never send one event at once and a dead sender's request is detected.
    Column("inflight_run_id", String(250)),
    Column("inflight_until", TS),
    # The sender holding the lease: it keeps it between the retries of one run, so that another
    # sender (another batch of the same run) does not try the event meanwhile.
    Column("inflight_sender", String(64)),
    # Retrying across runs: give_up_after_hours counts from retry_since (the first attempt,
    # or the re-opening of a failed event); an event left open after a run's attempts
    # waits until next_attempt_at before another run tries it.
    Column("retry_since", TS),
    Column("next_attempt_at", TS),
)
Index("ix_lead_event_deliveries_status", deliveries.c.status, deliveries.c.partition_date)
Index("ix_lead_event_deliveries_partition", deliveries.c.partition_date)
Index("ix_lead_event_deliveries_customer", deliveries.c.customer_external_id, deliveries.c.tracking)
Index("ix_lead_event_deliveries_run", deliveries.c.last_run_id)
# The send order of open events: a claim reads the first few of them, not every open one.
Index("ix_lead_event_deliveries_sendable", deliveries.c.event_time, deliveries.c.event_key,
      postgresql_where=deliveries.c.status == "pending", sqlite_where=deliveries.c.status == "pending")

attempts = Table(
    "lead_event_delivery_attempts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_key", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("run_id", String(250)),
    Column("sent_at", TS, nullable=False),
    Column("http_status", Integer),
    Column("latency_ms", Integer),
    Column("outcome", String(20), nullable=False),
    Column("error", Text),
)
Index("ix_lead_event_delivery_attempts_key", attempts.c.event_key, attempts.c.attempt)
Index("ix_lead_event_delivery_attempts_run", attempts.c.run_id)

sync_runs = Table(
    "lead_event_sync_runs",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("dag_id", String(250)),
    Column("partition_date", Date, nullable=False),
    Column("started_at", TS, nullable=False),
    Column("finished_at", TS),
    Column("events_read", Integer),
    Column("repeats", Integer),
    Column("requests_sent", Integer),
    Column("pending", Integer),
    Column("delivered", Integer),
    Column("rejected", Integer),
    Column("failed", Integer),
    Column("skipped", Integer),
    Column("send_result", String(40)),
    Column("outcome", String(20), nullable=False),
    Column("message", Text),
    Column("dry_run", Boolean),  # conf {"dry_run": true}: read and mapped, nothing sent or changed
    Column("would_send", Integer),  # a dry run: the events a real run would send now
    Column("send_batches", Integer),  # mapped send tasks planned for the run
    Column("send_deadline", TS),  # every batch of the run stops sending then (its time budget)
)

# One row per mapped send task of a run: where it ran, when it ended and what it did. A batch
# planned but not finished (its worker died, it failed) fails the run's summary.
send_batches = Table(
    "lead_event_send_batches",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("batch", Integer, primary_key=True),
    Column("host", String(250)),  # of its last try; lead_event_delivery_attempts has every request
    Column("tries", Integer),  # Airflow's tries of the batch task that started (a retry after its worker died)
    Column("started_at", TS, nullable=False),
    Column("finished_at", TS),
    Column("result", String(40)),
    Column("requests", Integer),
    Column("delivered", Integer),
    Column("rejected", Integer),
    Column("failed", Integer),
    Column("left_open", Integer),
)

# What a dry run found: every event it mapped, what a real run would make of it, its body redacted.
dry_run_events = Table(
    "lead_event_dry_run_events",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("event_key", String(64), primary_key=True),
    Column("partition_date", Date, nullable=False),
    Column("source", String(100), nullable=False),
    Column("customer_external_id", String(255)),
    Column("event_name", String(255)),
    Column("tracking", String(20), nullable=False),
    Column("status", String(20), nullable=False),  # as a real run would leave it before sending
    Column("would_send", Boolean, nullable=False),
    Column("reason", Text),
    Column("payload", Text),  # JSON, names and emails hashed
)

# What each run read, per partition and source: every source row is an event on record or a
# repeat (see lead_event_reconciliation).
source_reads = Table(
    "lead_event_source_reads",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("partition_date", Date, nullable=False),
    Column("source", String(100), nullable=False),
    Column("read_at", TS, nullable=False),
    Column("lookback", Boolean, nullable=False),  # a look-back read: only new rows were recorded
    Column("rows_read", Integer, nullable=False),
    Column("events", Integer, nullable=False),  # rows behind an event of this partition and source
    Column("repeats", Integer, nullable=False),  # rows whose event came from another row
    Column("missing", Integer, nullable=False),  # events on record that this read no longer yielded
)
Index("ix_lead_event_source_reads_partition", source_reads.c.partition_date, source_reads.c.source)

outbox = Table(
    "lead_event_outbox",
    metadata,
    Column("event_key", String(64), primary_key=True),
    Column("body", Text, nullable=False),
)

# Alerts raised and not yet recovered (see lead_sync.audit.alerts): one row per alert key.
alert_state = Table(
    "lead_event_alert_state",
    metadata,
    Column("alert", String(250), primary_key=True),
    Column("firing", Boolean, nullable=False),
    Column("since", TS),  # when the current state began (raised, or cleared)
    Column("notified_at", TS),  # when the message for it was sent
    Column("detail", Text),  # what the last message said, in one line
)

rate_buckets = Table(
    "lead_event_rate_buckets",
    metadata,
    Column("bucket", String(64), primary_key=True),
    Column("touched_at", Float, nullable=False),
)

rate_slots = Table(
    "lead_event_rate_slots",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("bucket", String(64), nullable=False),
    Column("granted_at", Float, nullable=False),  # epoch seconds
)
Index("ix_lead_event_rate_slots_bucket", rate_slots.c.bucket, rate_slots.c.granted_at)


# What auditors read: with a separate state store, these (and the views) are copied to the
# warehouse; the outbox, the rate-limit window and the alert state stay in the state store.
AUDIT_TABLES = (deliveries, attempts, sync_runs, source_reads, dry_run_events, send_batches)


def _complete(engine: Engine, tables: list[Table]) -> bool:
    """Whether every table, column, index and view is there, read in a few catalog queries
    (the usual case: every task checks at its start, and reflecting table by table costs tens
    of milliseconds on PostgreSQL)."""
    found = inspect(engine)
    names = [t.name for t in tables]
    columns = {key[1]: {c["name"] for c in cols} for key, cols in found.get_multi_columns(filter_names=names).items()}
    indexes = {key[1]: {i["name"] for i in found_indexes}
               for key, found_indexes in found.get_multi_indexes(filter_names=names).items()}
    return (all(t.name in columns and {c.name for c in t.columns} <= columns[t.name]
                and {i.name for i in t.indexes} <= indexes.get(t.name, set()) for t in tables)
            and set(VIEWS) <= set(found.get_view_names()))


def _add_missing_columns(engine: Engine, tables: list[Table]) -> None:
    """Tables made by an earlier version get the columns and indexes added since (all nullable)."""
    found = inspect(engine)
    for table in tables:
        if not found.has_table(table.name):
            continue
        have = {c["name"] for c in found.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        if missing:
            with engine.begin() as conn:
                for column in missing:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
        indexes = {i["name"] for i in found.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(engine, checkfirst=True)


# Views for auditors, next to the tables; their SQL is in sql/<name>.sql (portable SQL).
VIEWS = ("lead_event_daily", "lead_event_errors", "lead_event_reconciliation")
SQL_DIR = Path(__file__).resolve().parent / "sql"


def _create_missing_views(engine: Engine) -> None:
    have = set(inspect(engine).get_view_names())
    for name in VIEWS:
        if name not in have:
            with engine.begin() as conn:
                conn.exec_driver_sql((SQL_DIR / f"{name}.sql").read_text(encoding="utf-8"))


def drop_schema(engine: Engine) -> None:
    """Drop the audit views and tables (tests and benchmarks start from nothing)."""
    with engine.begin() as conn:
        for name in VIEWS:
            conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
    metadata.drop_all(engine)


def ensure_schema(engine: Engine, tables: Iterable[Table] | None = None) -> None:
    """Create whatever table (of `tables`, default all), column, index or view is missing; safe
    when several tasks race to do it, and only catalog reads when nothing is. The pipeline calls it
    through `lead_sync.db.stores.ensure_stores`, which knows which tables each store keeps."""
    tables = list(tables or metadata.sorted_tables)
    if _complete(engine, tables):
        return
    for attempt in range(3):
        try:
            metadata.create_all(engine, tables=tables, checkfirst=True)
            _add_missing_columns(engine, tables)
            _create_missing_views(engine)
            return
        except SQLAlchemyError:
            if attempt == 2:
                raise
            log.info("audit schema creation raced with another task; checking again")
            time.sleep(0.5)

"""Copying the audit from a separate state store to the warehouse, in one warehouse transaction.

Called at the end of each stage (extraction, each send batch, the summary). Each audit row
changed since it was last copied (`audit_seq` differs from `published_seq`, see
sql/state_store.sql) replaces the warehouse's row of the same key; only once the warehouse
has committed are the rows marked copied. A crash in between leaves them unmarked, and the
next copy writes them again: replacing by key makes that harmless.
"""
from __future__ import annotations

import logging
from typing import Iterator

from sqlalchemy import Table, column, delete, insert, select, text, tuple_
from sqlalchemy.engine import Connection

from lead_sync.db.locks import lock_for_transaction
from lead_sync.db.schema import AUDIT_TABLES, attempts, deliveries, dry_run_events, send_batches, source_reads, sync_runs
from lead_sync.db.stores import Stores
from lead_sync.db.upsert import UnsupportedDialect, upsert

log = logging.getLogger(__name__)

CHUNK = 2000

# The key a copied row replaces in the warehouse. Where that is the table's primary key, the
# row is upserted. Append-only tables have a generated id of their own in each database (and no
# unique key on what identifies the row), so their rows are deleted by what identifies them and
# inserted again; a dry run's events are replaced as a whole, as the dry run writes them (an
# event it no longer found must not stay behind).
REPLACE_BY: dict[Table, tuple[str, ...]] = {
    deliveries: ("event_key",),
    attempts: ("event_key", "attempt", "run_id", "outcome"),
    sync_runs: ("run_id",),
    source_reads: ("run_id", "partition_date", "source", "lookback"),
    dry_run_events: ("run_id",),
    send_batches: ("run_id", "batch"),
}
GENERATED = {attempts: "id", source_reads: "id"}
AUDIT_SEQ, PUBLISHED_SEQ = column("audit_seq"), column("published_seq")


def _changed(conn: Connection, table: Table) -> Iterator[list[dict]]:
    query = (select(*table.columns, AUDIT_SEQ).where(PUBLISHED_SEQ.is_distinct_from(AUDIT_SEQ))
             .order_by(AUDIT_SEQ).execution_options(yield_per=CHUNK))
    for part in conn.execute(query).mappings().partitions():
        yield [dict(r) for r in part]


def _replace(conn: Connection, table: Table, rows: list[dict], cleared: set[tuple]) -> None:
    """Write `rows` over the warehouse's rows of the same key. `cleared`: the keys this copy has
    deleted already, so that a later chunk of one copy does not delete what an earlier one wrote."""
    keys = REPLACE_BY[table]
    skip = {"audit_seq", GENERATED.get(table)}
    values = [{k: v for k, v in r.items() if k not in skip} for r in rows]
    if keys == tuple(c.name for c in table.primary_key.columns):
        try:
            upsert(conn, table, values)
            return
        except UnsupportedDialect:
            pass  # delete, then insert: one copy runs at a time (publish_audit's lock), nothing races it
    cols = [table.c[k] for k in keys]
    wanted = {tuple(r[k] for k in keys) for r in rows} - cleared
    if wanted and len(cols) == 1:
        conn.execute(delete(table).where(cols[0].in_([w[0] for w in wanted])))
    elif wanted:
        conn.execute(delete(table).where(tuple_(*cols).in_(list(wanted))))
    cleared |= wanted
    conn.execute(insert(table), values)


def _mark(conn: Connection, table: Table, marks: list[dict]) -> None:
    pk = [c.name for c in table.primary_key.columns]
    where = " AND ".join(f"{name} = :{name}" for name in pk)
    # This stage's own statement, as text: published_seq is only in the state store (sql/state_store_table.sql).
    for start in range(0, len(marks), CHUNK):
        conn.execute(text(f"UPDATE {table.name} SET published_seq = :audit_seq WHERE {where}"),
                     marks[start:start + CHUNK])


def publish_audit(stores: Stores) -> int:
    """Copy what changed in the state store's audit tables to the warehouse; returns the rows copied.

    Nothing to do when the warehouse keeps the state itself. One copy runs at a time (a lock in
    the state store), and it commits one warehouse transaction, or none when nothing changed.
    """
    if not stores.separate:
        return 0
    copied: dict[Table, list[dict]] = {}
    with stores.state.begin() as state:
        lock_for_transaction(state, "lead_sync_publish")
        warehouse = None
        try:
            for table in AUDIT_TABLES:
                pk = [c.name for c in table.primary_key.columns]
                cleared: set[tuple] = set()
                for rows in _changed(state, table):
                    if warehouse is None:
                        warehouse = stores.warehouse.connect()
                        warehouse.begin()
                    _replace(warehouse, table, rows, cleared)
                    copied.setdefault(table, []).extend({**{k: r[k] for k in pk}, "audit_seq": r["audit_seq"]}
                                                        for r in rows)
            if warehouse is not None:
                warehouse.commit()
        finally:
            if warehouse is not None:
                warehouse.close()
        for table, marks in copied.items():
            _mark(state, table, marks)
    total = sum(len(m) for m in copied.values())
    if total:
        log.info("audit copied to the warehouse: %s", ", ".join(f"{len(m)} {t.name}" for t, m in copied.items()))
    return total

"""The run's bookkeeping: its row in lead_event_sync_runs, its send batches, and its summary.

Every function here assumes the schema is there (`lead_sync.db.stores.ensure_stores`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import case, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine, RowMapping

from lead_sync.audit.publish import publish_audit
from lead_sync.clock import as_utc, utcnow
from lead_sync.db.schema import attempts, deliveries, dry_run_events, send_batches, sync_runs
from lead_sync.db.stores import Stores, as_stores
from lead_sync.db.upsert import upsert
from lead_sync.delivery.policy import SendReport
from lead_sync.events import DELIVERED, FAILED, REJECTED, STATUSES

# How sending ended (lead_event_sync_runs.send_result, lead_event_send_batches.result).
SEND_OK = "complete"
SEND_BUDGET = "budget_exhausted"
SEND_CREDENTIALS = "credentials_refused"
SEND_DRY_RUN = "dry_run"
# Worst last: with several batches, the run's row keeps the worst of them.
SEND_RESULTS = (SEND_OK, SEND_BUDGET, SEND_CREDENTIALS)

TOP_REASONS = 5


def start_run(engine: Engine, run_id: str, partition_day: date, dag_id: str | None = None,
              dry_run: bool = False) -> None:
    """The run's row, as a run starts it; a run id seen before (a retried or cleared task) starts
    its row again."""
    values = dict(run_id=run_id, dag_id=dag_id, partition_date=partition_day, started_at=utcnow(),
                  finished_at=None, outcome="running", send_result=None, message=None, dry_run=dry_run,
                  would_send=None)
    with engine.begin() as conn:
        upsert(conn, sync_runs, values)


def update_run(engine: Engine, run_id: str, **values: Any) -> None:
    """Set columns of the run's row (what the extraction read, the send plan)."""
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))


def run_deadline(engine: Engine, run_id: str) -> datetime | None:
    """When every batch of the run stops sending (set by the plan), if it was planned."""
    with engine.connect() as conn:
        return as_utc(conn.execute(select(sync_runs.c.send_deadline).where(sync_runs.c.run_id == run_id)).scalar())


def run_partition_day(engine: Engine, run_id: str) -> date | None:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs.c.partition_date).where(sync_runs.c.run_id == run_id)).scalar()


def start_batch(engine: Engine, run_id: str, batch: int, host: str | None) -> None:
    """A batch's row; a retried batch (Airflow's retry of the task) starts it again and counts the try."""
    values = dict(run_id=run_id, batch=batch, host=host, started_at=utcnow(), finished_at=None, result=None, tries=1)
    with engine.begin() as conn:
        upsert(conn, send_batches, values, set_={"tries": func.coalesce(send_batches.c.tries, 0) + 1})


def finish_batch(engine: Engine, run_id: str, batch: int, result: str, report: SendReport) -> None:
    with engine.begin() as conn:
        conn.execute(update(send_batches).where(send_batches.c.run_id == run_id, send_batches.c.batch == batch).values(
            finished_at=utcnow(), result=result, requests=report.requests, delivered=report.delivered,
            rejected=report.rejected, failed=report.failed, left_open=report.left_open))


def set_send_result(engine: Engine, run_id: str, result: str, message: str | None) -> None:
    """How sending ended, unless a batch of the run ended worse (see SEND_RESULTS)."""
    rank = case({r: n for n, r in enumerate(SEND_RESULTS)}, value=sync_runs.c.send_result, else_=-1)
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id, rank <= SEND_RESULTS.index(result))
                     .values(send_result=result, message=message))


@dataclass
class RunSummary:
    run_id: str
    dag_id: str
    partition_date: date
    counts: dict[str, int]  # events per status: the run's partition, or touched by the run
    requests_sent: int
    send_result: str | None
    outcome: str  # success | failed
    message: str | None
    decided: dict[str, int]  # events this run's requests settled: delivered, rejected, failed
    top_reasons: list[tuple[str, str, int]]  # (status, reason, events) of the counted events, most frequent first
    dry_run: bool = False

    def table(self) -> str:
        lines = [f"{self.dag_id} run {self.run_id} (partition {self.partition_date}): {self.outcome}"]
        lines += [f"  {status:<10} {self.counts.get(status, 0):>7}" for status in STATUSES]
        lines.append(f"  {'requests':<10} {self.requests_sent:>7}")
        if self.message:
            lines.append(f"  {self.message}")
        return "\n".join(lines)


def summarise(stores: Engine | Stores, run_id: str, partition_day: date, dag_id: str = "lead_events_sync",
              whole_partition: bool = True) -> RunSummary:
    """Counts per status of the events this run touched (and, with `whole_partition`, of its
    partition); closes the run row. A run fails when an event gave up in it, or sending did not end.
    Assumes the schema is there (`ensure_stores`)."""
    stores = as_stores(stores)
    try:
        return _summarise(stores.state, run_id, partition_day, dag_id, whole_partition)
    finally:
        publish_audit(stores)  # also what a batch that died before its own copy left behind


def _summarise(engine: Engine, run_id: str, partition_day: date, dag_id: str, whole_partition: bool) -> RunSummary:
    scope = deliveries.c.last_run_id == run_id
    if whole_partition:
        scope = or_(deliveries.c.partition_date == partition_day, scope)
    with engine.begin() as conn:
        run = conn.execute(select(sync_runs).where(sync_runs.c.run_id == run_id)).mappings().first()
        if run is not None and run["dry_run"]:
            return _summarise_dry_run(conn, run, dag_id)
        rows = conn.execute(select(deliveries.c.status, func.count()).where(scope).group_by(deliveries.c.status)).all()
        counts = {status: int(n) for status, n in rows}
        reasons = conn.execute(
            select(deliveries.c.status, deliveries.c.reason, func.count().label("n"))
            .where(scope, deliveries.c.status != DELIVERED, deliveries.c.reason.is_not(None))
            .group_by(deliveries.c.status, deliveries.c.reason)
            .order_by(func.count().desc(), deliveries.c.status, deliveries.c.reason)
            .limit(TOP_REASONS)
        ).all()
        sent = conn.execute(select(func.count()).select_from(attempts).where(
            attempts.c.run_id == run_id, attempts.c.outcome != "unknown")).scalar_one()
        decided = dict(conn.execute(
            select(attempts.c.outcome, func.count(attempts.c.event_key.distinct()))
            .where(attempts.c.run_id == run_id, attempts.c.outcome.in_((DELIVERED, REJECTED, FAILED)))
            .group_by(attempts.c.outcome)
        ).all())
        send_result = run["send_result"] if run else None
        message = run["message"] if run else None
        gave_up = decided.get(FAILED, 0)  # failed in an earlier run: counted, but not this run's failure
        planned = (run["send_batches"] or 0) if run else 0
        finished = conn.execute(select(func.count()).select_from(send_batches).where(
            send_batches.c.run_id == run_id, send_batches.c.finished_at.is_not(None))).scalar_one()
        if send_result == SEND_CREDENTIALS:
            outcome = "failed"
        elif finished < planned:
            outcome, message = "failed", (f"{planned - finished} of {planned} send batch(es) did not finish (see their "
                                          "task logs); their events stay pending and lead_events_drain sends them")
        elif send_result is None:
            outcome, message = "failed", message or "sending did not complete (see the send task's log)"
        elif gave_up:
            outcome, message = "failed", (f"{gave_up} event(s) gave up after give_up_after_hours of retries: "
                                          "status failed; a run of their partition re-opens them")
        else:
            outcome = "success"
        values = dict(dag_id=dag_id, finished_at=utcnow(), requests_sent=int(sent), outcome=outcome, message=message,
                      **{s: counts.get(s, 0) for s in STATUSES})
        if run is None:
            conn.execute(insert(sync_runs).values(run_id=run_id, partition_date=partition_day,
                                                  started_at=utcnow(), send_result=send_result, **values))
        else:
            conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))
    return RunSummary(run_id, dag_id, partition_day, counts, int(sent), send_result, outcome, message,
                      {k: int(v) for k, v in decided.items()}, [(s, r, int(n)) for s, r, n in reasons])


def _summarise_dry_run(conn: Connection, run: RowMapping, dag_id: str) -> RunSummary:
    """A dry run's summary: what a real run would make of the events, from lead_event_dry_run_events."""
    scope = dry_run_events.c.run_id == run["run_id"]
    counts = {s: int(n) for s, n in conn.execute(
        select(dry_run_events.c.status, func.count()).where(scope).group_by(dry_run_events.c.status)).all()}
    reasons = conn.execute(
        select(dry_run_events.c.status, dry_run_events.c.reason, func.count())
        .where(scope, dry_run_events.c.reason.is_not(None))
        .group_by(dry_run_events.c.status, dry_run_events.c.reason)
        .order_by(func.count().desc(), dry_run_events.c.status, dry_run_events.c.reason).limit(TOP_REASONS)
    ).all()
    message = f"dry run: {run['would_send'] or 0} event(s) would be sent now; nothing was sent or changed"
    conn.execute(update(sync_runs).where(sync_runs.c.run_id == run["run_id"]).values(
        dag_id=dag_id, finished_at=utcnow(), requests_sent=0, send_result=SEND_DRY_RUN, outcome="success",
        message=message, **{s: counts.get(s, 0) for s in STATUSES}))
    return RunSummary(run["run_id"], dag_id, run["partition_date"], counts, 0, SEND_DRY_RUN, "success", message,
                      {}, [(s, r, int(n)) for s, r, n in reasons], dry_run=True)

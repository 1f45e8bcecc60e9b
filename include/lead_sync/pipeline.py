"""The run's stages as plain functions: extract-and-map, send, summarise."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.engine import Engine

from . import state
from .audit import attempts, deliveries, ensure_schema, sync_runs
from .client import CutMeShortClient
from .config import SyncConfig
from .delivery import CredentialsRefused, SendReport, Sender
from .events import FAILED, STATUSES
from .mapping import first_per_key, map_frame
from .partition import Partition
from .ratelimit import SharedRateLimiter
from .retry import RetryPolicy
from .sources import prepare_engine, read_source

log = logging.getLogger(__name__)

SEND_OK = "complete"
SEND_BUDGET = "budget_exhausted"
SEND_CREDENTIALS = "credentials_refused"


def start_run(engine: Engine, run_id: str, partition: Partition) -> None:
    now = state.utcnow()
    values = dict(partition_date=partition.day, started_at=now, finished_at=None, outcome="running",
                  send_result=None, message=None)
    with engine.begin() as conn:
        if conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values)).rowcount == 0:
            conn.execute(insert(sync_runs).values(run_id=run_id, **values))


def extract_and_map(engine: Engine, config: SyncConfig, partition: Partition, run_id: str) -> dict:
    """Read the partition, and every partition with open events, and record the mapped events."""
    prepare_engine(engine)
    ensure_schema(engine)
    start_run(engine, run_id, partition)
    names = [s.name for s in config.sources]
    days = sorted({partition.day} | state.open_partition_days(engine, names))
    totals: Counter = Counter()
    for day in days:
        part = Partition(day, config.zone)
        events = []
        for source in config.sources:
            events.extend(map_frame(source, read_source(engine, config, source, part), part))
        events, repeats = first_per_key(events)
        counts = state.reconcile(engine, events, day, names, run_id, config.verification_wait_days)
        counts["events_read"] += len(events) + repeats
        counts["repeats"] += repeats
        totals.update(counts)
        log.info("partition %s: %d events mapped (%s)", day, len(events), dict(counts))
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(
            events_read=totals["events_read"], repeats=totals["repeats"]))
    return {"partition_date": partition.day.isoformat(), "partitions_read": [d.isoformat() for d in days],
            **{k: int(v) for k, v in totals.items()}}


def send_open_events(engine: Engine, client: CutMeShortClient, limiter: SharedRateLimiter, policy: RetryPolicy,
                     run_id: str, time_budget_seconds: float, connection_name: str) -> SendReport:
    """Send what is open; record how sending ended on the run row, also when credentials are refused."""
    prepare_engine(engine)
    ensure_schema(engine)
    sender = Sender(engine, client, limiter, policy, run_id, time.time() + time_budget_seconds,
                    credentials_hint=connection_name)
    try:
        report = sender.run()
    except CredentialsRefused as exc:
        _set_send_result(engine, run_id, SEND_CREDENTIALS, str(exc))
        raise
    result = SEND_BUDGET if report.budget_exhausted else SEND_OK
    message = ("time budget used up: the rest stays pending for the next run"
               if report.budget_exhausted else None)
    _set_send_result(engine, run_id, result, message)
    return report


def _set_send_result(engine: Engine, run_id: str, result: str, message: str | None) -> None:
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(send_result=result, message=message))


@dataclass
class RunSummary:
    run_id: str
    partition_date: date
    counts: dict[str, int]
    requests_sent: int
    send_result: str | None
    outcome: str
    message: str | None

    def table(self) -> str:
        lines = [f"lead_events_sync run {self.run_id} (partition {self.partition_date}): {self.outcome}"]
        lines += [f"  {status:<10} {self.counts.get(status, 0):>7}" for status in STATUSES]
        lines.append(f"  {'requests':<10} {self.requests_sent:>7}")
        if self.message:
            lines.append(f"  {self.message}")
        return "\n".join(lines)


def summarise(engine: Engine, run_id: str, partition: Partition) -> RunSummary:
    """Counts per status of the events this run touched or that belong to its partition; closes the run row."""
    prepare_engine(engine)
    ensure_schema(engine)
    with engine.begin() as conn:
        rows = conn.execute(
            select(deliveries.c.status, func.count())
            .where(or_(deliveries.c.partition_date == partition.day, deliveries.c.last_run_id == run_id))
            .group_by(deliveries.c.status)
        ).all()
        counts = {status: int(n) for status, n in rows}
        sent = conn.execute(
            select(func.count()).select_from(attempts).where(attempts.c.run_id == run_id, attempts.c.outcome != "unknown")
        ).scalar_one()
        run = conn.execute(select(sync_runs).where(sync_runs.c.run_id == run_id)).mappings().first()
        send_result = run["send_result"] if run else None
        message = run["message"] if run else None
        failed_here = conn.execute(
            select(func.count()).select_from(deliveries)
            .where(deliveries.c.last_run_id == run_id, deliveries.c.status == FAILED)
        ).scalar_one()
        if send_result == SEND_CREDENTIALS:
            outcome = "failed"
        elif send_result is None:
            outcome, message = "failed", message or "sending did not complete (see the send task's log)"
        elif failed_here:
            outcome, message = "failed", f"{failed_here} event(s) failed after all attempts; the next run retries them"
        else:
            outcome = "success"
        values = dict(finished_at=state.utcnow(), requests_sent=int(sent), outcome=outcome, message=message,
                      **{s: counts.get(s, 0) for s in STATUSES})
        if run is None:
            conn.execute(insert(sync_runs).values(run_id=run_id, partition_date=partition.day,
                                                  started_at=state.utcnow(), send_result=send_result, **values))
        else:
            conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))
    return RunSummary(run_id, partition.day, counts, int(sent), send_result, outcome, message)

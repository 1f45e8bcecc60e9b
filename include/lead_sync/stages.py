"""The run's stages as plain functions: extract-and-map, send, summarise."""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import case, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from lead_sync.delivery import claims
from lead_sync.state import recording as state
from lead_sync.db.schema import attempts, deliveries, dry_run_events, ensure_schema, send_batches, sync_runs
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.clock import as_utc, utcnow
from lead_sync.read.config import SyncConfig
from lead_sync.delivery.sender import CredentialsRefused, SendReport, Sender
from lead_sync.events import DELIVERED, FAILED, REJECTED, STATUSES
from lead_sync.mapping.rows import ReadTally, map_rows
from lead_sync.read.partition import Partition, contiguous, days_window
from lead_sync.delivery.ratelimit import SharedRateLimiter, bucket_name
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.delivery.settings import ApiTarget
from lead_sync.audit.publish import publish_audit
from lead_sync.read.sources import read_source_rows
from lead_sync.db.stores import Stores, as_stores, ensure_stores

log = logging.getLogger(__name__)

SEND_OK = "complete"
SEND_BUDGET = "budget_exhausted"
SEND_CREDENTIALS = "credentials_refused"
SEND_DRY_RUN = "dry_run"


def start_run(engine: Engine, run_id: str, partition_day: date, dag_id: str | None = None,
              dry_run: bool = False) -> None:
    now = utcnow()
    values = dict(dag_id=dag_id, partition_date=partition_day, started_at=now, finished_at=None, outcome="running",
                  send_result=None, message=None, dry_run=dry_run, would_send=None)
    with engine.begin() as conn:
        if conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values)).rowcount == 0:
            conn.execute(insert(sync_runs).values(run_id=run_id, **values))


@dataclass(frozen=True)
class ReadPlan:
    """Which partitions a run reads, and how.

    `full`: every row is re-evaluated (the run's own partition, and partitions holding
    pending events). `lookback`: only rows not on record yet are mapped and recorded
    (late rows); what is on record there is passed over unread by the mapping.
    """

    home: date
    full: tuple[date, ...]
    lookback: tuple[date, ...]


def plan_read(engine: Engine, config: SyncConfig, partition: Partition) -> ReadPlan:
    names = [s.name for s in config.sources]
    full = {partition.day} | state.open_partition_days(engine, names)
    behind = {partition.day - timedelta(days=n) for n in range(1, config.lookback_days + 1)}
    return ReadPlan(partition.day, tuple(sorted(full)), tuple(sorted(behind - full)))


def account_reads(engine: Engine, run_id: str, day: date, lookback: bool, tallies: dict[str, ReadTally],
                  on_record: dict[str, str] | None = None, counted: dict[str, Counter] | None = None) -> list[dict]:
    """How every source row read for a partition is accounted for, per source.

    A row is either the row behind an event of this partition and source on record, or a
    repeat (its event came from another row, of this read, another day or another source).
    `missing`: events of this partition and source on record that the read no longer yielded.
    `on_record` (key -> source of the partition's events), when the caller knows it already;
    `counted` (found and missing per source), when the caller counted them already.
    """
    # Per source: its events on record that the read yielded, and those it did not.
    found, missing = (counted["found"], counted["missing"]) if counted else (Counter(), Counter())
    for key, source in (() if counted else on_record.items() if on_record is not None
                        else state.recorded_sources(engine, day)):
        tally = tallies.get(source)
        if tally is not None:
            (found if key in tally.keys else missing)[source] += 1
    rows = []
    for source, tally in tallies.items():
        events = found[source]
        rows.append(dict(run_id=run_id, partition_date=day, source=source, read_at=utcnow(), lookback=lookback,
                         rows_read=tally.rows, events=events, repeats=tally.rows - events,
                         missing=missing[source]))
    return rows


@state.gc_paused
def extract_and_map(stores: Engine | Stores, config: SyncConfig, partition: Partition, run_id: str,
                    dag_id: str | None = None, dry_run: bool = False) -> dict:
    """Read the partition, the look-back days before it and every partition with pending events;
    record the mapped events. The run's own partition re-opens its `failed` events.

    A dry run records nothing of the events: it writes what a real run would make of each
    (lead_event_dry_run_events) and how many it would send now (its lead_event_sync_runs row).
    """
    stores = as_stores(stores)
    ensure_stores(stores)
    engine = stores.state  # what is recorded; the sources are read from stores.warehouse
    start_run(engine, run_id, partition.day, dag_id, dry_run)
    plan = plan_read(engine, config, partition)
    names = [s.name for s in config.sources]
    parts = {day: Partition(day, config.zone) for day in plan.full + plan.lookback}
    # The look-back passes over what is on record for its days: key -> source, read once.
    known_sources = {day: state.recorded_keys(engine, day) for day in plan.lookback}
    known = {day: set(keys) for day, keys in known_sources.items()}
    tallies: dict[str, dict[date, ReadTally]] = {s.name: {} for s in config.sources}
    totals: Counter = Counter()
    mapped = state.MappedEvents()  # until recorded, mapped events wait in a temporary file, not in memory
    for first, last in contiguous(list(parts)):
        window = days_window(first, last)
        days = {d: p for d, p in parts.items() if first <= d <= last}
        home = parts[plan.home] if first <= plan.home <= last else None
        for source in config.sources:
            for columns, rows in read_source_rows(stores.warehouse, config, source, window):
                events, passed = map_rows(source, columns, rows, days, home, known, tallies[source.name])
                totals["lookback_known"] += passed
                mapped.add_days(events)
    reads: list[dict] = []
    preview: list[state.Preview] | None = [] if dry_run else None
    for day in sorted(parts):
        lookback = day in known
        recorded: list[str] = []
        counted: dict[str, Counter] = {}  # how the partition on record stands against this read (closing counts it)
        if mapped.count(day) or not lookback:
            # The run's own partition leaves an event it would not change as it is: a rerun writes nothing.
            counts, events, repeats = state.record_mapped(
                engine, mapped, day, names, run_id, config.verification_wait_days, reopen=day == plan.home,
                close_missing=not lookback, preview=preview, keep_unchanged=day == plan.home,
                read={n: t[day].keys if day in t else set() for n, t in tallies.items()}, accounts=counted,
                keys=recorded if lookback else None)
            counts["events_read"] += events + repeats
            counts["repeats"] += repeats
            if lookback:
                counts["late_rows"] += counts["new"]
            totals.update(counts)
            log.info("partition %s%s: %d events mapped (%s)", day, " (look-back: new rows only)" if lookback else "",
                     events, dict(counts))
        if not dry_run:
            # A look-back day's record is what was known plus what this run just recorded.
            on_record = {**known_sources[day], **state.recorded_keys(engine, day, recorded)} if lookback else None
            reads += account_reads(engine, run_id, day, lookback,
                                   {n: t.get(day, ReadTally()) for n, t in tallies.items()}, on_record, counted)
    mapped.close()
    state.record_reads(engine, reads)
    if totals["new"] or totals["reopened"]:
        state.refresh_statistics(engine)
    values = dict(events_read=totals["events_read"], repeats=totals["repeats"])
    if dry_run:
        totals["would_send"] = state.record_preview(engine, run_id, preview)
        values.update(dry_run=True, would_send=totals["would_send"])
        log.info("dry run: %d event(s) would be sent now; nothing was sent or changed (lead_event_dry_run_events)",
                 totals["would_send"])
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))
    publish_audit(stores)
    return {"partition_date": partition.day.isoformat(), "partitions_read": [d.isoformat() for d in plan.full],
            "lookback_read": [d.isoformat() for d in plan.lookback],
            **{k: int(v) for k, v in totals.items()}}


@dataclass(frozen=True)
class Batch:
    """One mapped send task of a run: its number, and how many events it takes at most."""

    batch: int
    max_events: int


def plan_send(stores: Engine | Stores, run_id: str, time_budget_seconds: float, batch_size: int,
              max_batches: int) -> list[Batch]:
    """Split what is open into batches for mapped send tasks: a few events are one batch, a
    backlog at most `max_batches`. Every batch of the run stops at one deadline (its time budget).
    No batch when nothing is open: sending is then complete."""
    stores = as_stores(stores)
    ensure_stores(stores)
    engine = stores.state
    open_events = claims.count_to_send(engine)
    count = min(math.ceil(open_events / batch_size), max_batches)
    share = math.ceil(open_events / count) if count else 0
    values: dict = dict(send_batches=count, send_deadline=utcnow() + timedelta(seconds=time_budget_seconds))
    if not count:
        values.update(send_result=SEND_OK, message=None)
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))
    log.info("%d event(s) to send: %d batch(es) of up to %d", open_events, count, share)
    return [Batch(n, share) for n in range(count)]


def send_open_events(stores: Engine | Stores, client: CutMeShortClient, limiter: SharedRateLimiter, policy: RetryPolicy,
                     run_id: str, time_budget_seconds: float, connection_name: str,
                     batch: Batch | None = None, host: str | None = None, *, max_in_flight: int | None = None,
                     clock=time.time, sleep=time.sleep) -> SendReport:
    """Send what is open (a batch's share of it); record how sending ended, also when credentials are
    refused. With a separate state store, the batch's audit reaches the warehouse in one transaction.
    `max_in_flight`: requests on the wire at once (None: sized by the sender); `clock`/`sleep`: the
    wall clock the time budget and every wait are on."""
    stores = as_stores(stores)
    engine = stores.state
    ensure_schema(engine)
    try:
        return _send_open_events(engine, client, limiter, policy, run_id, time_budget_seconds, connection_name,
                                 batch, host, max_in_flight, clock, sleep)
    finally:
        try:
            publish_audit(stores)
        except SQLAlchemyError as exc:
            # Every outcome is safe in the state store: the next copy (the run's summary at the
            # latest) writes what this one could not.
            log.warning("the audit could not be copied to the warehouse now (%s); the next copy writes it",
                        str(exc).splitlines()[0])


def _send_open_events(engine: Engine, client: CutMeShortClient, limiter: SharedRateLimiter, policy: RetryPolicy,
                      run_id: str, time_budget_seconds: float, connection_name: str, batch: Batch | None,
                      host: str | None, max_in_flight: int | None = None, clock=time.time,
                      sleep=time.sleep) -> SendReport:
    deadline = clock() + time_budget_seconds
    run_deadline = _run_deadline(engine, run_id)
    if run_deadline is not None:
        deadline = min(deadline, run_deadline.timestamp())
    if batch is not None:
        _start_batch(engine, run_id, batch.batch, host)
    sender = Sender(engine, client, limiter, policy, run_id, deadline, credentials_hint=connection_name,
                    max_events=batch.max_events if batch is not None else None, max_in_flight=max_in_flight,
                    clock=clock, sleep=sleep)
    try:
        report = sender.run()
    except CredentialsRefused as exc:
        _set_send_result(engine, run_id, SEND_CREDENTIALS, str(exc))
        if batch is not None:
            _finish_batch(engine, run_id, batch.batch, SEND_CREDENTIALS, sender.report)
        raise
    result = SEND_BUDGET if report.budget_exhausted else SEND_OK
    message = ("time budget used up: the rest stays pending and lead_events_drain goes on sending it"
               if report.budget_exhausted else None)
    _set_send_result(engine, run_id, result, message)
    if batch is not None:
        _finish_batch(engine, run_id, batch.batch, result, report)
    return report


def send(stores: Engine | Stores, api: ApiTarget, run_id: str, time_budget_seconds: float,
         batch: Batch | None = None, host: str | None = None, client: CutMeShortClient | None = None) -> SendReport:
    """The send stage wired up: the deployment's shared rate limit, the client (the hook's, else
    one made from `api`, which this closes), the retry policy."""
    settings = api.settings
    stores = as_stores(stores)
    limiter = SharedRateLimiter(stores.state, bucket_name(api.base_url, api.token), settings.rate_limit_per_minute)
    with client or api.client() as client:
        return send_open_events(stores, client, limiter, settings.retry_policy, run_id, time_budget_seconds,
                                api.connection_name, batch, host, max_in_flight=settings.max_in_flight)


def _run_deadline(engine: Engine, run_id: str):
    with engine.connect() as conn:
        return as_utc(conn.execute(select(sync_runs.c.send_deadline).where(sync_runs.c.run_id == run_id)).scalar())


def _start_batch(engine: Engine, run_id: str, batch: int, host: str | None) -> None:
    """A batch's row; a retried batch (Airflow's retry of the task) starts it again and counts the try."""
    values = dict(host=host, started_at=utcnow(), finished_at=None, result=None)
    with engine.begin() as conn:
        if not conn.execute(update(send_batches).where(send_batches.c.run_id == run_id,
                                                       send_batches.c.batch == batch)
                            .values(tries=func.coalesce(send_batches.c.tries, 0) + 1, **values)).rowcount:
            conn.execute(insert(send_batches).values(run_id=run_id, batch=batch, tries=1, **values))


def _finish_batch(engine: Engine, run_id: str, batch: int, result: str, report: SendReport) -> None:
    with engine.begin() as conn:
        conn.execute(update(send_batches).where(send_batches.c.run_id == run_id, send_batches.c.batch == batch).values(
            finished_at=utcnow(), result=result, requests=report.requests, delivered=report.delivered,
            rejected=report.rejected, failed=report.failed, left_open=report.left_open))


# How sending ended, worst last: with several batches, the run's row keeps the worst of them.
SEND_RESULTS = (SEND_OK, SEND_BUDGET, SEND_CREDENTIALS)


def _set_send_result(engine: Engine, run_id: str, result: str, message: str | None) -> None:
    rank = case({r: n for n, r in enumerate(SEND_RESULTS)}, value=sync_runs.c.send_result, else_=-1)
    with engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id, rank <= SEND_RESULTS.index(result))
                     .values(send_result=result, message=message))


def _summarise_dry_run(conn, run, dag_id: str) -> RunSummary:
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


def run_partition_day(engine: Engine, run_id: str) -> date | None:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs.c.partition_date).where(sync_runs.c.run_id == run_id)).scalar()


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


TOP_REASONS = 5


def summarise(stores: Engine | Stores, run_id: str, partition_day: date, dag_id: str = "lead_events_sync",
              whole_partition: bool = True) -> RunSummary:
    """Counts per status of the events this run touched (and, with `whole_partition`, of its
    partition); closes the run row. A run fails when an event gave up in it, or sending did not end."""
    stores = as_stores(stores)
    ensure_stores(stores)
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
        sent = conn.execute(
            select(func.count()).select_from(attempts).where(attempts.c.run_id == run_id, attempts.c.outcome != "unknown")
        ).scalar_one()
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
